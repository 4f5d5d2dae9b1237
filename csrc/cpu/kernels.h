// Declarations of the per-ISA CPU kernels. Each kernel source in kernels/ is
// compiled once per ISA into namespace fastencdec::cpu::<isa>; dispatch.h picks one.
#pragma once

#include <cstdint>

#define FED_DECLARE_KERNELS(NS)                                                          \
  namespace fastencdec::cpu::NS {                                                        \
  /* x, out: [rows, heads, head_dim] fp32 contiguous; positions: [rows] int64;          \
     inv_freq: [head_dim / 2]. out may alias x. */                                       \
  void rope_apply(const float* x, float* out, const int64_t* positions,                  \
                  const double* inv_freq, int64_t rows, int64_t heads, int64_t head_dim,  \
                  int num_threads);                                                      \
  }

FED_DECLARE_KERNELS(scalar)
#if defined(FED_HAVE_AVX2)
FED_DECLARE_KERNELS(avx2)
#endif
#if defined(FED_HAVE_AVX512)
FED_DECLARE_KERNELS(avx512)
#endif
#if defined(FED_HAVE_NEON)
FED_DECLARE_KERNELS(neon)
#endif
