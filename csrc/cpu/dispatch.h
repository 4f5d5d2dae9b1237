// Calls the kernel compiled for the active ISA (isa.h).
#pragma once

#include "isa.h"
#include "kernels.h"

#if defined(FED_HAVE_AVX2)
#define FED_CASE_AVX2(FN, ...) \
  case Isa::kAvx2: return ::fastencdec::cpu::avx2::FN(__VA_ARGS__);
#else
#define FED_CASE_AVX2(FN, ...)
#endif
#if defined(FED_HAVE_AVX512)
#define FED_CASE_AVX512(FN, ...) \
  case Isa::kAvx512: return ::fastencdec::cpu::avx512::FN(__VA_ARGS__);
#else
#define FED_CASE_AVX512(FN, ...)
#endif
#if defined(FED_HAVE_NEON)
#define FED_CASE_NEON(FN, ...) \
  case Isa::kNeon: return ::fastencdec::cpu::neon::FN(__VA_ARGS__);
#else
#define FED_CASE_NEON(FN, ...)
#endif

// FED_DISPATCH(apply_rope, args...) runs fastencdec::cpu::<active isa>::apply_rope(args...).
#define FED_DISPATCH(FN, ...)                                         \
  do {                                                                \
    using ::fastencdec::cpu::Isa;                                     \
    switch (::fastencdec::cpu::active_isa()) {                        \
      FED_CASE_AVX512(FN, __VA_ARGS__)                                \
      FED_CASE_AVX2(FN, __VA_ARGS__)                                  \
      FED_CASE_NEON(FN, __VA_ARGS__)                                  \
      default: return ::fastencdec::cpu::scalar::FN(__VA_ARGS__);     \
    }                                                                 \
  } while (0)
