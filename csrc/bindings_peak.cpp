// The machine's multiply-accumulate ceiling for the instructions the kernels are built
// on, measured: benchmarks report their GEMM rates as a fraction of it (as GPU
// benchmarks report a fraction of the datasheet's FLOP/s; a VM's CPU has no datasheet).
// Each thread runs 12 independent accumulator chains of one instruction on registers
// (no memory traffic), so the rate is the issue limit of the vector units.
#include <pybind11/pybind11.h>

#include <chrono>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "array_args.h"
#include "cpu/isa.h"
#include "cpu/parallel.h"

namespace py = pybind11;

namespace fastencdec::bind {

namespace {

#if defined(__x86_64__) && defined(__GNUC__)
// 12 instructions of `op` on zmm0-11 from zmm12, zmm13: MACs per instruction given.
#define FED_TWELVE(op)                                                                   \
  op " %%zmm12, %%zmm13, %%zmm0\n" op " %%zmm12, %%zmm13, %%zmm1\n" op                  \
     " %%zmm12, %%zmm13, %%zmm2\n" op " %%zmm12, %%zmm13, %%zmm3\n" op                  \
     " %%zmm12, %%zmm13, %%zmm4\n" op " %%zmm12, %%zmm13, %%zmm5\n" op                  \
     " %%zmm12, %%zmm13, %%zmm6\n" op " %%zmm12, %%zmm13, %%zmm7\n" op                  \
     " %%zmm12, %%zmm13, %%zmm8\n" op " %%zmm12, %%zmm13, %%zmm9\n" op                  \
     " %%zmm12, %%zmm13, %%zmm10\n" op " %%zmm12, %%zmm13, %%zmm11\n"
#define FED_LOOP(op)                                                                     \
  for (int64_t i = 0; i < n; ++i)                                                        \
    __asm__ volatile(FED_TWELVE(op)::: "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5",   \
                     "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11");

// Runs n rounds of 12 instructions; returns the instruction count.
int64_t run_rounds(const std::string& kind, int64_t n) {
  if (kind == "int8") {
    FED_LOOP("vpdpbusd")
  } else if (kind == "bf16") {
    FED_LOOP("vdpbf16ps")
  } else {
    FED_LOOP("vfmadd231ps")
  }
  return 12 * n;
}
#endif

// MACs per 512-bit instruction: vpdpbusd 16 lanes x 4, vdpbf16ps 16 x 2, vfmadd 16.
int64_t macs_per_instruction(const std::string& kind) {
  return kind == "int8" ? 64 : kind == "bf16" ? 32 : 16;
}

py::object dot_peak(const std::string& kind, int num_threads, double seconds) {
  if (kind != "int8" && kind != "bf16" && kind != "fp32")
    throw py::value_error("dot_peak: kind must be 'int8', 'bf16' or 'fp32', got '" + kind + "'");
  check_threads(num_threads);
  if (!(seconds > 0.0 && seconds <= 10.0))
    throw py::value_error("dot_peak: seconds must lie in (0, 10]");
#if defined(__x86_64__) && defined(__GNUC__)
  // The instruction the kernels use on this CPU (the active path), else no ceiling.
  const bool have = cpu::active_isa() == cpu::Isa::kAvx512 &&
                    (kind == "fp32" || (kind == "int8" ? cpu::use_vnni() : cpu::use_bf16_dot()));
  if (!have) return py::none();
  // Calibrate a round count that takes ~seconds on one thread, then run it everywhere.
  using clock = std::chrono::steady_clock;
  int64_t n = 1 << 16;
  double took = 0.0;
  {
    py::gil_scoped_release release;
    for (;;) {
      const auto t0 = clock::now();
      run_rounds(kind, n);
      took = std::chrono::duration<double>(clock::now() - t0).count();
      if (took > 0.02 || n > (int64_t(1) << 40)) break;
      n *= 4;
    }
    n = static_cast<int64_t>(n * (seconds / took)) + 1;
    const auto t0 = clock::now();
    cpu::parallel_for_tid(num_threads, num_threads,
                          [&](int64_t, int64_t, int) { run_rounds(kind, n); });
    took = std::chrono::duration<double>(clock::now() - t0).count();
  }
  const double instructions = 12.0 * static_cast<double>(n) * num_threads;
  return py::float_(instructions * macs_per_instruction(kind) / took / 1e9);
#else
  return py::none();
#endif
}

}  // namespace

void register_dot_peak(py::module_& m) {
  m.def("dot_peak", &dot_peak, py::arg("kind"), py::arg("num_threads"), py::arg("seconds"),
        "Measured multiply-accumulate ceiling in GMAC/s over num_threads threads for the "
        "instruction the kernels use: 'int8' AVX512-VNNI vpdpbusd, 'bf16' AVX512_BF16 "
        "vdpbf16ps, 'fp32' AVX-512 vfmadd231ps (512-bit registers only, no memory "
        "traffic; ~seconds per call). None where the active path does not use it "
        "(not AVX-512, or VNNI / BF16 absent or switched off).");
}

}  // namespace fastencdec::bind
