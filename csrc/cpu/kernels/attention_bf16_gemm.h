// The bf16 "broadcast GEMM" of the prefill attention's bf16_dot mode (AVX512_BF16):
//   C[r, lanes] = (cscale ? C[r, lanes] * cscale[lanes] : 0) + sum_p A(r, p) . B[p, lanes]
// where A(r, p) = a[r * ars + p * aks] and B[p, lane] are bf16 pairs held in uint32 (the
// even element in the low half), multiplied exactly and summed in fp32 by vdpbf16ps:
// twice the multiply-adds of an fp32 FMA per instruction, half the bytes per operand.
// Used as S^T = K Q^T (rows: keys, pairs along head_dim) and O^T = V^T P^T (rows:
// head_dim, pairs along keys), queries along the lanes, as gemm() in attention_common.h.
#pragma once

#include "attention_common.h"

#if defined(FED_ISA_AVX512)
namespace fastencdec::cpu::FED_ISA_NS {

template <int R, int IV>
__attribute__((target("avx512bf16"))) inline void gemm_tile_bf16(
    const uint32_t* a, int64_t ars, int64_t aks, const uint32_t* b, int64_t ldb, int64_t kp,
    float* c, int64_t ldc, const float* cscale) {
  __m512 acc[R][IV];
  if (cscale != nullptr) {
    for (int iv = 0; iv < IV; ++iv) {
      const __m512 s = _mm512_loadu_ps(cscale + 16 * iv);
      for (int r = 0; r < R; ++r)
        acc[r][iv] = _mm512_mul_ps(_mm512_loadu_ps(c + r * ldc + 16 * iv), s);
    }
  } else {
    for (int r = 0; r < R; ++r)
      for (int iv = 0; iv < IV; ++iv) acc[r][iv] = _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < kp; ++p) {
    __m512i bv[IV];
    for (int iv = 0; iv < IV; ++iv) bv[iv] = _mm512_loadu_si512(b + p * ldb + 16 * iv);
    const uint32_t* ap = a + p * aks;
    for (int r = 0; r < R; ++r) {
      const __m512i av = _mm512_set1_epi32(static_cast<int>(ap[r * ars]));
      for (int iv = 0; iv < IV; ++iv)
        acc[r][iv] = _mm512_dpbf16_ps(acc[r][iv], (__m512bh)av, (__m512bh)bv[iv]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int iv = 0; iv < IV; ++iv) _mm512_storeu_ps(c + r * ldc + 16 * iv, acc[r][iv]);
}

template <int R, int IV = 4>
__attribute__((target("avx512bf16"))) inline void gemm_tile_bf16_vecs(
    int iv, const uint32_t* a, int64_t ars, int64_t aks, const uint32_t* b, int64_t ldb,
    int64_t kp, float* c, int64_t ldc, const float* cs) {
  if constexpr (IV > 1)
    if (iv != IV) return gemm_tile_bf16_vecs<R, IV - 1>(iv, a, ars, aks, b, ldb, kp, c, ldc, cs);
  gemm_tile_bf16<R, IV>(a, ars, aks, b, ldb, kp, c, ldc, cs);
}

template <int R = 6>
__attribute__((target("avx512bf16"))) inline void gemm_tile_bf16_any(
    int r, int iv, const uint32_t* a, int64_t ars, int64_t aks, const uint32_t* b, int64_t ldb,
    int64_t kp, float* c, int64_t ldc, const float* cs) {
  if constexpr (R > 1)
    if (r != R) return gemm_tile_bf16_any<R - 1>(r, iv, a, ars, aks, b, ldb, kp, c, ldc, cs);
  gemm_tile_bf16_vecs<R>(iv, a, ars, aks, b, ldb, kp, c, ldc, cs);
}

// Over `rows` rows and `nvec` 16-lane vectors, in 6 x 4 register tiles (24
// accumulators + 4 B vectors + 1 broadcast of the 32 zmm registers).
__attribute__((target("avx512bf16"))) inline void gemm_bf16(
    const uint32_t* a, int64_t ars, int64_t aks, const uint32_t* b, int64_t ldb, int64_t kp,
    float* c, int64_t ldc, int64_t rows, int64_t nvec, const float* cscale) {
  constexpr int kRows = 6, kVecs = 4;
  for (int64_t iv0 = 0; iv0 < nvec; iv0 += kVecs) {
    const int ivn = static_cast<int>(std::min<int64_t>(kVecs, nvec - iv0));
    for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
      const int rn = static_cast<int>(std::min<int64_t>(kRows, rows - r0));
      gemm_tile_bf16_any(rn, ivn, a + r0 * ars, ars, aks, b + iv0 * 16, ldb, kp,
                         c + r0 * ldc + iv0 * 16, ldc, cscale ? cscale + iv0 * 16 : nullptr);
    }
  }
}

// 16 bf16 pairs (uint32, RNE) from two fp32 vectors: pair i = (lo[i], hi[i]).
__attribute__((target("avx512bf16"))) inline __m512i pack_bf16_pairs(__m512 lo, __m512 hi) {
  const __m512i halves = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // [lo 0..15 | hi 0..15]
  const __m512i interleave = _mm512_set_epi16(
      31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
      23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(interleave, halves);
}

}  // namespace fastencdec::cpu::FED_ISA_NS
#endif
