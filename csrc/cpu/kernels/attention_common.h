// Pieces shared by the attention kernels (compiled per ISA, see vec.h):
// tile sizes, the RoPE table view, visible-key lists and a register-blocked
// "broadcast GEMM" micro-kernel.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

#include "../buffer.h"
#include "../kernels.h"
#include "../parallel.h"
#include "../storage.h"
#include "../vec.h"

namespace fastencdec::cpu::FED_ISA_NS {

constexpr float kLog2e = 1.4426950408889634f;  // softmax runs in base 2: exp(x) = 2^(x log2 e)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Keys per tile: the unit of K/V packing, masking and tile skipping.
constexpr int64_t kTileKeys = 64;

// Register blocking of gemm_tile: rows x lane-vectors accumulators.
#if defined(FED_ISA_AVX512) || defined(FED_ISA_NEON)
constexpr int kGemmRows = 6, kGemmVecs = 4;  // 24 of 32 vector registers
#elif defined(FED_ISA_AVX2)
constexpr int kGemmRows = 6, kGemmVecs = 2;  // 12 of 16
#else
constexpr int kGemmRows = 4, kGemmVecs = 4;
#endif

// Decode kernel: rows (query heads x new tokens) per Q.K block, and rows x
// vectors per P.V block; plus the largest group for which decoding (keys split
// over lanes of D) beats the prefill kernel (queries over lanes).
#if defined(FED_ISA_AVX512)
constexpr int kDecodeQkRows = 4, kDecodePvRows = 6, kDecodePvVecs = 4;
constexpr int64_t kDecodeMaxRows = 8;
#elif defined(FED_ISA_NEON)
constexpr int kDecodeQkRows = 4, kDecodePvRows = 6, kDecodePvVecs = 4;
constexpr int64_t kDecodeMaxRows = 4;
#elif defined(FED_ISA_AVX2)
constexpr int kDecodeQkRows = 2, kDecodePvRows = 2, kDecodePvVecs = 4;
constexpr int64_t kDecodeMaxRows = 4;
#else
constexpr int kDecodeQkRows = 4, kDecodePvRows = 4, kDecodePvVecs = 4;
constexpr int64_t kDecodeMaxRows = 4;
#endif

// cos/sin per token for fused RoPE: row (b * batch_stride + t), half values each.
struct RopeTable {
  const float* cos = nullptr;
  const float* sin = nullptr;
  int64_t half = 0;
  int64_t batch_stride = 0;  // 0: positions shared by the batch
  bool enabled() const { return cos != nullptr; }
  const float* c(int64_t b, int64_t t) const { return cos + (b * batch_stride + t) * half; }
  const float* s(int64_t b, int64_t t) const { return sin + (b * batch_stride + t) * half; }
};

// Keys in [j0, j1) that the padding mask keeps (all when mask_row is null).
// Masked keys are dropped from the tile, so padding costs nothing downstream.
inline int64_t collect_keys(int64_t j0, int64_t j1, const bool* mask_row, int64_t* kidx) {
  int64_t n = 0;
  if (mask_row == nullptr) {
    for (int64_t j = j0; j < j1; ++j) kidx[n++] = j;
  } else {
    for (int64_t j = j0; j < j1; ++j)
      if (mask_row[j]) kidx[n++] = j;
  }
  return n;
}

// C[r, lanes] = (cscale ? C[r, lanes] * cscale[lanes] : 0) + sum_k A(r, k) * B[k, lanes]
// for R rows and IV lane vectors, A(r, k) = a[r * ars + k * aks] broadcast.
// Used as S^T = K Q^T (rows: keys, k: head dim) and O^T = V^T P^T (rows: head dim,
// k: keys) with queries along the lanes.
template <int R, int IV>
inline void gemm_tile(const float* a, int64_t ars, int64_t aks, const float* b, int64_t ldb,
                      int64_t kdim, float* c, int64_t ldc, const float* cscale) {
  constexpr int W = VecF::kWidth;
  VecF acc[R][IV];
  if (cscale != nullptr) {
    for (int iv = 0; iv < IV; ++iv) {
      const VecF s = VecF::load(cscale + iv * W);
      for (int r = 0; r < R; ++r) acc[r][iv] = VecF::load(c + r * ldc + iv * W) * s;
    }
  } else {
    for (int r = 0; r < R; ++r)
      for (int iv = 0; iv < IV; ++iv) acc[r][iv] = VecF::zero();
  }
  for (int64_t k = 0; k < kdim; ++k) {
    VecF bv[IV];
    for (int iv = 0; iv < IV; ++iv) bv[iv] = VecF::load(b + k * ldb + iv * W);
    const float* ak = a + k * aks;
    for (int r = 0; r < R; ++r) {
      const VecF av = VecF::set1(ak[r * ars]);
      for (int iv = 0; iv < IV; ++iv) acc[r][iv] = VecF::fmadd(av, bv[iv], acc[r][iv]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int iv = 0; iv < IV; ++iv) acc[r][iv].store(c + r * ldc + iv * W);
}

template <int R>
inline void gemm_tile_vecs(int iv, const float* a, int64_t ars, int64_t aks, const float* b,
                           int64_t ldb, int64_t kdim, float* c, int64_t ldc, const float* cs) {
  if constexpr (kGemmVecs >= 4)
    if (iv == 4) return gemm_tile<R, 4>(a, ars, aks, b, ldb, kdim, c, ldc, cs);
  if constexpr (kGemmVecs >= 3)
    if (iv == 3) return gemm_tile<R, 3>(a, ars, aks, b, ldb, kdim, c, ldc, cs);
  if constexpr (kGemmVecs >= 2)
    if (iv == 2) return gemm_tile<R, 2>(a, ars, aks, b, ldb, kdim, c, ldc, cs);
  gemm_tile<R, 1>(a, ars, aks, b, ldb, kdim, c, ldc, cs);
}

inline void gemm_tile_any(int r, int iv, const float* a, int64_t ars, int64_t aks, const float* b,
                          int64_t ldb, int64_t kdim, float* c, int64_t ldc, const float* cs) {
  // r <= kGemmRows always; the constexpr guards only avoid needless instantiations.
  if constexpr (kGemmRows >= 6)
    if (r == 6) return gemm_tile_vecs<6>(iv, a, ars, aks, b, ldb, kdim, c, ldc, cs);
  if constexpr (kGemmRows >= 5)
    if (r == 5) return gemm_tile_vecs<5>(iv, a, ars, aks, b, ldb, kdim, c, ldc, cs);
  switch (r) {
    case 4: return gemm_tile_vecs<4>(iv, a, ars, aks, b, ldb, kdim, c, ldc, cs);
    case 3: return gemm_tile_vecs<3>(iv, a, ars, aks, b, ldb, kdim, c, ldc, cs);
    case 2: return gemm_tile_vecs<2>(iv, a, ars, aks, b, ldb, kdim, c, ldc, cs);
    default: return gemm_tile_vecs<1>(iv, a, ars, aks, b, ldb, kdim, c, ldc, cs);
  }
}

// Full product over `rows` rows and `nvec` lane vectors, blocked for registers.
// Lane blocks are the outer loop so a B panel stays in L1 across row blocks.
inline void gemm(const float* a, int64_t ars, int64_t aks, const float* b, int64_t ldb,
                 int64_t kdim, float* c, int64_t ldc, int64_t rows, int64_t nvec,
                 const float* cscale) {
  constexpr int W = VecF::kWidth;
  for (int64_t iv0 = 0; iv0 < nvec; iv0 += kGemmVecs) {
    const int ivn = static_cast<int>(std::min<int64_t>(kGemmVecs, nvec - iv0));
    for (int64_t r0 = 0; r0 < rows; r0 += kGemmRows) {
      const int rn = static_cast<int>(std::min<int64_t>(kGemmRows, rows - r0));
      gemm_tile_any(rn, ivn, a + r0 * ars, ars, aks, b + iv0 * W, ldb, kdim, c + r0 * ldc + iv0 * W,
                    ldc, cscale ? cscale + iv0 * W : nullptr);
    }
  }
}

// The two strategies (attention.cpp chooses): queries along SIMD lanes for many
// query rows per K/V head, head_dim along lanes for a few (decode).
template <class S>
void attention_prefill(const AttentionProblem& p, const RopeTable& rope);
template <class S>
void attention_decode(const AttentionProblem& p);

}  // namespace fastencdec::cpu::FED_ISA_NS
