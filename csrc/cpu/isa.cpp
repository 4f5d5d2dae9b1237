#include "isa.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <string>

namespace fastencdec::cpu {

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    case Isa::kNeon: return "neon";
    default: return "scalar";
  }
}

const char* compiled_isas() {
#if defined(FED_HAVE_AVX512)
  return "scalar,avx2,avx512";
#elif defined(FED_HAVE_AVX2)
  return "scalar,avx2";
#elif defined(FED_HAVE_NEON)
  return "scalar,neon";
#else
  return "scalar";
#endif
}

static bool compiled(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return true;
#if defined(FED_HAVE_AVX2)
    case Isa::kAvx2: return true;
#endif
#if defined(FED_HAVE_AVX512)
    case Isa::kAvx512: return true;
#endif
#if defined(FED_HAVE_NEON)
    case Isa::kNeon: return true;
#endif
    default: return false;
  }
}

bool cpu_supports(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return true;
#if defined(__x86_64__) || defined(_M_X64)
    case Isa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#endif
#if defined(__aarch64__)
    case Isa::kNeon: return true;  // Advanced SIMD is mandatory on ARMv8-A.
#endif
    default: return false;
  }
}

static Isa detect() {
  const Isa order[] = {Isa::kAvx512, Isa::kAvx2, Isa::kNeon, Isa::kScalar};
  Isa best = Isa::kScalar;
  for (Isa isa : order) {
    if (compiled(isa) && cpu_supports(isa)) { best = isa; break; }
  }
  const char* env = std::getenv("FASTENCDEC_CPU_ISA");
  if (env == nullptr || *env == '\0') return best;
  const std::string want(env);
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512, Isa::kNeon}) {
    if (want == isa_name(isa)) {
      if (!compiled(isa) || !cpu_supports(isa))
        throw std::invalid_argument("FASTENCDEC_CPU_ISA=" + want +
                                    " is not available on this CPU/build (compiled: " +
                                    compiled_isas() + ")");
      if (static_cast<int>(isa) > static_cast<int>(best) && best != Isa::kNeon)
        throw std::invalid_argument("FASTENCDEC_CPU_ISA=" + want + " is above the best "
                                    "supported ISA " + isa_name(best));
      return isa;
    }
  }
  throw std::invalid_argument("FASTENCDEC_CPU_ISA must be one of scalar, avx2, avx512, neon; got " +
                              want);
}

static std::atomic<int> g_isa{-1};

Isa active_isa() {
  int v = g_isa.load();
  if (v < 0) {
    v = static_cast<int>(detect());
    g_isa.store(v);
  }
  return static_cast<Isa>(v);
}

static std::atomic<int> g_vnni{-1};

bool use_vnni() {
  int v = g_vnni.load();
  if (v < 0) {
#if defined(__x86_64__) || defined(_M_X64)
    const char* env = std::getenv("FASTENCDEC_CPU_VNNI");
    v = active_isa() == Isa::kAvx512 && __builtin_cpu_supports("avx512vnni") &&
        !(env != nullptr && std::string(env) == "0");
#else
    v = 0;
#endif
    g_vnni.store(v);
  }
  return v != 0;
}

static std::atomic<int> g_bf16_dot{-1};

bool use_bf16_dot() {
  int v = g_bf16_dot.load();
  if (v < 0) {
#if defined(__x86_64__) || defined(_M_X64)
    const char* env = std::getenv("FASTENCDEC_CPU_BF16DOT");
    v = active_isa() == Isa::kAvx512 && __builtin_cpu_supports("avx512bf16") &&
        !(env != nullptr && std::string(env) == "0");
#else
    v = 0;
#endif
    g_bf16_dot.store(v);
  }
  return v != 0;
}

void reset_isa() {
  g_isa.store(-1);
  g_vnni.store(-1);
  g_bf16_dot.store(-1);
}

}  // namespace fastencdec::cpu
