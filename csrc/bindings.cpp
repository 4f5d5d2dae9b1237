// pybind11 module fastencdec._C: the CPU kernels. The Python side (fastencdec.ops)
// validates torch tensors first; these bindings check again what memory safety
// depends on, release the GIL, and dispatch to the ISA chosen at run time.
#include <pybind11/pybind11.h>

#include <cmath>
#include <stdexcept>
#include <thread>
#include <vector>

#include "array_args.h"
#include "cpu/dispatch.h"
#include "cpu/isa.h"
#include "cpu/parallel.h"

namespace py = pybind11;
using fastencdec::bind::checked_data;
using fastencdec::bind::expect_dim;

namespace {

void rope_apply_impl(const float* x, float* out, const int64_t* pos, const double* inv_freq,
                     int64_t rows, int64_t heads, int64_t head_dim, int threads) {
  FED_DISPATCH(rope_apply, x, out, pos, inv_freq, rows, heads, head_dim, threads);
}

void rope_apply(py::array x, py::array positions, double base, py::array out, int num_threads) {
  float* xd = checked_data<float>(x, "x", 3, false);
  const int64_t* pd = checked_data<int64_t>(positions, "positions", 1, false);
  float* od = checked_data<float>(out, "out", 3, true);
  const int64_t rows = x.shape(0), heads = x.shape(1), head_dim = x.shape(2);
  expect_dim(positions, "positions", 0, rows);
  for (int d = 0; d < 3; ++d) expect_dim(out, "out", d, x.shape(d));
  if (head_dim % 2) throw py::value_error("x: head_dim must be even for RoPE, got " +
                                          std::to_string(head_dim));
  if (!(base > 0.0) || !std::isfinite(base))
    throw py::value_error("base must be a finite positive number");
  if (num_threads < 1) throw py::value_error("num_threads must be >= 1");
  std::vector<double> inv_freq(head_dim / 2);
  for (int64_t i = 0; i < head_dim / 2; ++i)
    inv_freq[i] = std::pow(base, -static_cast<double>(2 * i) / static_cast<double>(head_dim));
  // Resolve the ISA (may throw on a bad FASTENCDEC_CPU_ISA) while holding the GIL.
  fastencdec::cpu::active_isa();
  py::gil_scoped_release release;
  rope_apply_impl(xd, od, pd, inv_freq.data(), rows, heads, head_dim, num_threads);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastencdec CPU kernels (C++17, OpenMP, run-time ISA dispatch)";
  m.def("rope_apply", &rope_apply, py::arg("x"), py::arg("positions"), py::arg("base"),
        py::arg("out"), py::arg("num_threads"),
        "RoPE (rotate-half) on fp32 x [rows, heads, head_dim] at int64 positions [rows]; "
        "writes out (may be x).");
  m.def("active_isa", [] { return std::string(fastencdec::cpu::isa_name(fastencdec::cpu::active_isa())); },
        "ISA the kernels run with (honours FASTENCDEC_CPU_ISA).");
  m.def("reset_isa", &fastencdec::cpu::reset_isa, "Re-read FASTENCDEC_CPU_ISA.");
  m.def("compiled_isas", [] { return std::string(fastencdec::cpu::compiled_isas()); });
  m.def("cpu_supports", [](const std::string& name) {
    for (auto isa : {fastencdec::cpu::Isa::kScalar, fastencdec::cpu::Isa::kAvx2,
                     fastencdec::cpu::Isa::kAvx512, fastencdec::cpu::Isa::kNeon})
      if (name == fastencdec::cpu::isa_name(isa)) return fastencdec::cpu::cpu_supports(isa);
    throw py::value_error("unknown ISA name: " + name);
  });
  m.def("openmp", &fastencdec::cpu::openmp_enabled, "Whether the module was built with OpenMP.");
  m.def("hardware_threads", [] { return static_cast<int>(std::thread::hardware_concurrency()); });
}
