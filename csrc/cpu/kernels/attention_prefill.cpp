// Attention for many query rows per K/V head (prefill, encoder, cross-attention
// over a whole target): tiled online softmax with the queries along SIMD lanes.
//
// A work item is (batch row b, K/V head g, block of query tokens). Its lanes are
// the (token, head) pairs of the block for all G query heads of group g, so each
// K/V tile is read, converted and rotated once for the whole group. Per tile of
// kTileKeys keys:
//   Kt  = rotated K tile, row-major [keys, D]                (RoPE fused here)
//   S^T = Kt Q^T        [keys, lanes]   Q^T packed once per item, pre-scaled
//   masks, running max m, P^T = 2^(S^T - m), running sum l   (vertical: no shuffles)
//   O^T = O^T * alpha + Vt^T P^T        [D, lanes]
// Keys dropped by the padding mask never enter a tile; tiles above the causal
// diagonal are never visited. No [L, L] buffer exists.
// bf16_dot (kernels.h): with AVX512_BF16 the two products take bf16 pairs (Q^T, K, P^T,
// V^T packed as pairs, attention_bf16_gemm.h); elsewhere the same rounded operands go
// through the fp32 products.
#include <algorithm>
#include <cstring>
#include <vector>

#include "../isa.h"
#include "../rope_table.h"
#include "attention_bf16_gemm.h"
#include "attention_common.h"

namespace fastencdec::cpu::FED_ISA_NS {

namespace {

struct PrefillPlan {
  int64_t group;     // query heads per K/V head
  int64_t block_q;   // query tokens per item
  int64_t lanes;     // padded lane count (multiple of the vector width)
  int64_t n_blocks;  // query blocks per (b, g)
};

PrefillPlan plan_prefill(const AttentionProblem& p) {
  constexpr int64_t W = VecF::kWidth;
  PrefillPlan plan{};
  plan.group = p.q_heads / p.kv_heads;
  // Q^T and O^T are [D, lanes]: keep each near 16 KiB so they stay in L1/L2.
  const int64_t budget = p.bf16_dot ? 8192 : 4096;  // bf16 Q^T pairs take half the bytes
  const int64_t target = std::max<int64_t>(W, std::min<int64_t>(128, budget / p.head_dim) / W * W);
  plan.block_q = std::max<int64_t>(1, std::min<int64_t>(target / plan.group, p.q_len));
  plan.lanes = round_up(plan.block_q * plan.group, W);
  plan.n_blocks = ceil_div(p.q_len, plan.block_q);
  return plan;
}

struct PrefillScratch {
  float *qt, *ot, *st, *kt, *vt, *m, *l, *alpha, *limit, *row;
  int64_t* kidx;
  uint32_t *qt2, *vt2, *pt2;  // bf16 pairs (the bf16_dot products)
};

PrefillScratch carve(Carver& c, const AttentionProblem& p, const PrefillPlan& plan) {
  const int64_t D = p.head_dim, M = plan.lanes;
  PrefillScratch s{};
  s.qt = c.take<float>(D * M);
  s.ot = c.take<float>(D * M);
  s.st = c.take<float>(kTileKeys * M);
  s.kt = c.take<float>(kTileKeys * D);
  s.vt = c.take<float>(kTileKeys * D);
  s.m = c.take<float>(M);
  s.l = c.take<float>(M);
  s.alpha = c.take<float>(M);
  s.limit = c.take<float>(M);
  s.row = c.take<float>(D + 1);
  s.kidx = c.take<int64_t>(kTileKeys);
  if (p.bf16_dot) {
    const int64_t Dh = (D + 1) / 2;
    s.qt2 = c.take<uint32_t>(Dh * M);
    s.vt2 = c.take<uint32_t>(kTileKeys / 2 * D);
    s.pt2 = c.take<uint32_t>(kTileKeys / 2 * M);
  }
  return s;
}

// What one work item covers: query tokens t0..t0+nt-1 of batch row b, their lanes
// (token, head) pairs, and the keys they may see.
struct ItemShape {
  int64_t t0, nt, n_lanes, nvec;
  int64_t key_end;    // keys at or past it are never visible to this block
  int64_t min_limit;  // the first token's causal limit (keys above it need masking)
  const bool* mask_row;
};

ItemShape item_shape(const AttentionProblem& p, const PrefillPlan& plan, int64_t b,
                     int64_t qb) {
  ItemShape s{};
  s.t0 = qb * plan.block_q;
  s.nt = std::min(plan.block_q, p.q_len - s.t0);
  s.n_lanes = s.nt * plan.group;
  s.nvec = ceil_div(s.n_lanes, int64_t(VecF::kWidth));
  const int64_t len = p.kv_seqlens ? p.kv_seqlens[b] : p.kv_len;
  const int64_t offset = len - p.q_len;  // causal: token t sees keys j <= t + offset
  s.key_end = p.causal ? std::min(len, s.t0 + s.nt + offset) : len;
  s.min_limit = s.t0 + offset;
  s.mask_row = p.key_mask ? p.key_mask + b * p.kv_len : nullptr;
  return s;
}

// Per-lane causal limits, running max m = -inf, running sum l = 0, O^T = 0.
void reset_state(const PrefillScratch& sc, const ItemShape& s, int64_t D, int64_t M,
                 int64_t G) {
  constexpr int64_t W = VecF::kWidth;
  for (int64_t lane = 0; lane < s.nvec * W; ++lane) {
    sc.limit[lane] = lane < s.n_lanes ? static_cast<float>(s.min_limit + lane / G) : -1.f;
    sc.m[lane] = kNegInf;
    sc.l[lane] = 0.f;
  }
  std::memset(sc.ot, 0, sizeof(float) * D * M);
}

// S^T rows of keys above a lane's causal limit -> -inf.
void mask_above_diagonal(const PrefillScratch& sc, const ItemShape& s, int64_t nk, int64_t M) {
  constexpr int64_t W = VecF::kWidth;
  const VecF neg_inf = VecF::set1(kNegInf);
  for (int64_t jj = 0; jj < nk; ++jj) {
    if (sc.kidx[jj] <= s.min_limit) continue;
    const VecF key = VecF::set1(static_cast<float>(sc.kidx[jj]));
    float* srow = sc.st + jj * M;
    for (int64_t iv = 0; iv < s.nvec; ++iv) {
      const VecF lim = VecF::load(sc.limit + iv * W);
      VecF::if_le(key, lim, VecF::load(srow + iv * W), neg_inf).store(srow + iv * W);
    }
  }
}

// Online softmax over a tile of S^T (base 2, already scaled), one lane vector at a time
// down the key rows: P^T replaces S^T (rounded to bf16 when kRoundP), l and m advance
// on the unrounded P, alpha = 2^(m_old - m_new) rescales O^T.
template <bool kRoundP>
void online_softmax(const PrefillScratch& sc, int64_t nk, int64_t nvec, int64_t M) {
  constexpr int64_t W = VecF::kWidth;
  const VecF neg_inf = VecF::set1(kNegInf);
  for (int64_t iv = 0; iv < nvec; ++iv) {
    VecF tile_max = neg_inf;
    for (int64_t jj = 0; jj < nk; ++jj)
      tile_max = VecF::max(tile_max, VecF::load(sc.st + jj * M + iv * W));
    const VecF m_old = VecF::load(sc.m + iv * W);
    const VecF m_new = VecF::max(m_old, tile_max);
    // Lanes that have seen no key yet keep m = -inf; subtract 0 there so that
    // 2^(-inf - m) is 0 rather than NaN.
    const VecF m_use = VecF::if_eq(m_new, neg_inf, VecF::zero(), m_new);
    const VecF alpha = VecF::exp2(m_old - m_use);
    VecF sum = VecF::zero();
    for (int64_t jj = 0; jj < nk; ++jj) {
      float* sp = sc.st + jj * M + iv * W;
      const VecF pr = VecF::exp2(VecF::load(sp) - m_use);
      if constexpr (kRoundP) StoreBF16::round(pr).store(sp);
      else pr.store(sp);
      sum = sum + pr;
    }
    VecF::fmadd(VecF::load(sc.l + iv * W), alpha, sum).store(sc.l + iv * W);
    m_new.store(sc.m + iv * W);
    alpha.store(sc.alpha + iv * W);
  }
}

// out = O / l; a query that saw no key (l == 0) gets 0. NaN l stays NaN.
template <class S>
void write_out(const AttentionProblem& p, const PrefillPlan& plan, const PrefillScratch& sc,
               const ItemShape& s, int64_t b, int64_t g) {
  const int64_t D = p.head_dim, G = plan.group, M = plan.lanes;
  auto* out = static_cast<typename S::T*>(p.out);
  for (int64_t tt = 0; tt < s.nt; ++tt) {
    for (int64_t h = 0; h < G; ++h) {
      const int64_t lane = tt * G + h;
      const float l = sc.l[lane];
      const float inv = 1.f / l;
      for (int64_t d = 0; d < D; ++d) sc.row[d] = l == 0.f ? 0.f : sc.ot[d * M + lane] * inv;
      store_row<S>(sc.row, out + (((b * p.q_len) + s.t0 + tt) * p.q_heads + g * G + h) * D, D);
    }
  }
}

// Query (token t, head h) of the item as fp32 in sc.row: RoPE'd and rounded like the
// reference (then to bf16 too when kBf16).
template <class S, bool kBf16>
void load_query(const AttentionProblem& p, const RopeTable& rope, const PrefillScratch& sc,
                int64_t b, int64_t t, int64_t head) {
  const auto* q = static_cast<const typename S::T*>(p.q);
  const int64_t D = p.head_dim;
  load_row<S>(q + ((b * p.q_len + t) * p.q_heads + head) * D, sc.row, D);
  if (rope.enabled()) {
    rope_row(sc.row, rope.c(b, t), rope.s(b, t), D / 2);
    round_row<S>(sc.row, D);
  }
  if constexpr (kBf16) round_row<StoreBF16>(sc.row, D);
}

// Key j of K/V head g into krow and its value into vrow (fp32; rounded to bf16 when kBf16).
template <class S, bool kBf16>
void load_key_value(const AttentionProblem& p, const RopeTable& rope, int64_t b, int64_t g,
                    int64_t j, float* krow, float* vrow) {
  const int64_t D = p.head_dim, src = ((b * p.kv_len + j) * p.kv_heads + g) * D;
  load_row<S>(static_cast<const typename S::T*>(p.k) + src, krow, D);
  if (rope.enabled()) {
    rope_row(krow, rope.c(b, j), rope.s(b, j), D / 2);
    round_row<S>(krow, D);
  }
  load_row<S>(static_cast<const typename S::T*>(p.v) + src, vrow, D);
  if constexpr (kBf16) {
    round_row<StoreBF16>(krow, D);
    round_row<StoreBF16>(vrow, D);
  }
}

// The fp32 products. kBf16Operands: q, k, v and P rounded to bf16 first (bf16_dot
// without AVX512_BF16).
template <class S, bool kBf16Operands>
void prefill_item(const AttentionProblem& p, const RopeTable& rope, const PrefillPlan& plan,
                  const PrefillScratch& sc, int64_t b, int64_t g, int64_t qb) {
  constexpr int64_t W = VecF::kWidth;
  const int64_t D = p.head_dim, G = plan.group, M = plan.lanes;
  const ItemShape s = item_shape(p, plan, b, qb);

  // Q^T [D, M]: lane = token * G + head, pre-multiplied by scale * log2(e).
  const float qscale = p.scale * kLog2e;
  for (int64_t tt = 0; tt < s.nt; ++tt) {
    for (int64_t h = 0; h < G; ++h) {
      const int64_t lane = tt * G + h;
      load_query<S, kBf16Operands>(p, rope, sc, b, s.t0 + tt, g * G + h);
      for (int64_t d = 0; d < D; ++d) sc.qt[d * M + lane] = sc.row[d] * qscale;
    }
  }
  for (int64_t d = 0; d < D; ++d)
    for (int64_t lane = s.n_lanes; lane < s.nvec * W; ++lane) sc.qt[d * M + lane] = 0.f;
  reset_state(sc, s, D, M, G);

  for (int64_t j0 = 0; j0 < s.key_end; j0 += kTileKeys) {
    const int64_t nk = collect_keys(j0, std::min(j0 + kTileKeys, s.key_end), s.mask_row, sc.kidx);
    if (nk == 0) continue;  // fully padded tile
    for (int64_t jj = 0; jj < nk; ++jj)
      load_key_value<S, kBf16Operands>(p, rope, b, g, sc.kidx[jj], sc.kt + jj * D,
                                       sc.vt + jj * D);
    gemm(sc.kt, D, 1, sc.qt, M, D, sc.st, M, nk, s.nvec, nullptr);  // S^T = Kt Q^T
    if (p.causal && sc.kidx[nk - 1] > s.min_limit) mask_above_diagonal(sc, s, nk, M);
    online_softmax<kBf16Operands>(sc, nk, s.nvec, M);
    gemm(sc.vt, 1, D, sc.st, M, nk, sc.ot, M, D, s.nvec, sc.alpha);  // O^T = O^T*alpha + Vt^T P^T
  }
  write_out<S>(p, plan, sc, s, b, g);
}

#if defined(FED_ISA_AVX512)
inline uint32_t bf16_pair(float lo, float hi) {
  return uint32_t(float_to_bf16(lo)) | (uint32_t(float_to_bf16(hi)) << 16);
}

// bf16_dot with AVX512_BF16: the operands packed as bf16 pairs, vdpbf16ps products.
// The keys and values of a (batch row, K/V head) are packed once for all its query
// blocks (PackedKv); an item packs its queries and, per tile, the probabilities.
//   Q^T [D/2, M] pairs along head_dim (unscaled: S^T is scaled in fp32 afterwards),
//   K   [keys, D/2] pairs along head_dim, V^T [keys/2, D] and P^T [keys/2, M] pairs
//   along keys; an odd head_dim or key count is padded with zeros.
struct PackedKv {
  int64_t n = 0;               // visible keys (padding mask and kv_seqlens applied)
  const int64_t* idx = nullptr;  // their indices, ascending
  const uint32_t* k = nullptr;   // [n, D/2]: RoPE'd, rounded like the reference, bf16
  const uint32_t* v = nullptr;   // [ceil(n / 2), D]: (V[2e, d], V[2e + 1, d])
};

struct PackedKvLayout {
  int64_t Dh, idx, k, v;  // element counts per group
  static PackedKvLayout of(const AttentionProblem& p) {
    const int64_t D = p.head_dim, Dh = (D + 1) / 2;
    return {Dh, p.kv_len, p.kv_len * Dh, (p.kv_len + 1) / 2 * D};
  }
  size_t bytes() const {
    Carver c;
    c.take<int64_t>(idx);
    c.take<uint32_t>(k);
    c.take<uint32_t>(v);
    return c.bytes();
  }
};

// Packs group (b, g) into base; row holds D + 1 floats of scratch, row2 2 (D + 1).
template <class S>
__attribute__((target("avx512bf16"))) PackedKv pack_kv(
    const AttentionProblem& p, const RopeTable& rope, const PackedKvLayout& lay,
    unsigned char* base, int64_t b, int64_t g, float* row, float* row2) {
  const int64_t D = p.head_dim, Dh = lay.Dh;
  Carver c(base);
  int64_t* idx = c.take<int64_t>(lay.idx);
  uint32_t* kp = c.take<uint32_t>(lay.k);
  uint32_t* vp = c.take<uint32_t>(lay.v);
  const int64_t len = p.kv_seqlens ? p.kv_seqlens[b] : p.kv_len;
  const int64_t n = collect_keys(0, len, p.key_mask ? p.key_mask + b * p.kv_len : nullptr, idx);
  float* const vrow[2] = {row2, row2 + D + 1};
  for (int64_t jj = 0; jj < n; jj += 2) {
    for (int64_t u = 0; u < 2; ++u) {
      if (jj + u == n) {  // an odd count: the last pair's partner is zero
        std::memset(vrow[u], 0, sizeof(float) * D);
        continue;
      }
      load_key_value<S, false>(p, rope, b, g, idx[jj + u], row, vrow[u]);
      auto* kbits = reinterpret_cast<uint16_t*>(kp + (jj + u) * Dh);
      store_row<StoreBF16>(row, kbits, D);
      if (D % 2) kbits[D] = 0;
    }
    uint32_t* dst = vp + jj / 2 * D;
    int64_t d = 0;
    for (; d + 16 <= D; d += 16)
      _mm512_storeu_si512(dst + d, pack_bf16_pairs(_mm512_loadu_ps(vrow[0] + d),
                                                   _mm512_loadu_ps(vrow[1] + d)));
    for (; d < D; ++d) dst[d] = bf16_pair(vrow[0][d], vrow[1][d]);
  }
  return PackedKv{n, idx, kp, vp};
}

template <class S>
__attribute__((target("avx512bf16"))) void prefill_item_pairs(
    const AttentionProblem& p, const RopeTable& rope, const PrefillPlan& plan,
    const PrefillScratch& sc, const PackedKv& kv, int64_t b, int64_t g, int64_t qb) {
  constexpr int64_t W = 16;
  const int64_t D = p.head_dim, Dh = (D + 1) / 2, G = plan.group, M = plan.lanes;
  const ItemShape s = item_shape(p, plan, b, qb);

  for (int64_t tt = 0; tt < s.nt; ++tt) {
    for (int64_t h = 0; h < G; ++h) {
      const int64_t lane = tt * G + h;
      load_query<S, false>(p, rope, sc, b, s.t0 + tt, g * G + h);
      sc.row[D] = 0.f;
      for (int64_t e = 0; e < Dh; ++e)
        sc.qt2[e * M + lane] = bf16_pair(sc.row[2 * e], sc.row[2 * e + 1]);
    }
  }
  for (int64_t e = 0; e < Dh; ++e)
    for (int64_t lane = s.n_lanes; lane < s.nvec * W; ++lane) sc.qt2[e * M + lane] = 0;
  reset_state(sc, s, D, M, G);
  const __m512 qscale = _mm512_set1_ps(p.scale * kLog2e);
  // visible keys before key_end (a causal block sees a prefix of them)
  const int64_t n_end = std::lower_bound(kv.idx, kv.idx + kv.n, s.key_end) - kv.idx;

  for (int64_t j0 = 0; j0 < n_end; j0 += kTileKeys) {  // j0 even: pairs never straddle
    const int64_t nk = std::min(kTileKeys, n_end - j0), nkh = (nk + 1) / 2;
    const int64_t* kidx = kv.idx + j0;
    const uint32_t* vpairs = kv.v + j0 / 2 * D;
    if (nk % 2 && j0 + nk < kv.n) {  // the last pair's partner is past key_end: drop it
      uint32_t* last = sc.vt2 + (nkh - 1) * D;
      std::memcpy(sc.vt2, vpairs, sizeof(uint32_t) * nkh * D);
      for (int64_t d = 0; d < D; ++d) last[d] &= 0xFFFFu;
      vpairs = sc.vt2;
    }
    gemm_bf16(kv.k + j0 * Dh, Dh, 1, sc.qt2, M, Dh, sc.st, M, nk, s.nvec, nullptr);  // S^T
    for (int64_t jj = 0; jj < nk; ++jj)
      for (int64_t iv = 0; iv < s.nvec; ++iv) {
        float* sp = sc.st + jj * M + iv * W;
        _mm512_storeu_ps(sp, _mm512_mul_ps(_mm512_loadu_ps(sp), qscale));
      }
    if (p.causal && kidx[nk - 1] > s.min_limit) {
      std::copy(kidx, kidx + nk, sc.kidx);
      mask_above_diagonal(sc, s, nk, M);
    }
    online_softmax<false>(sc, nk, s.nvec, M);
    if (nk % 2) std::memset(sc.st + nk * M, 0, sizeof(float) * M);  // P of the padding key
    for (int64_t e = 0; e < nkh; ++e)  // P^T pairs: (P[2e, lane], P[2e + 1, lane])
      for (int64_t iv = 0; iv < s.nvec; ++iv) {
        const float* p0 = sc.st + 2 * e * M + iv * W;
        _mm512_storeu_si512(sc.pt2 + e * M + iv * W,
                            pack_bf16_pairs(_mm512_loadu_ps(p0), _mm512_loadu_ps(p0 + M)));
      }
    gemm_bf16(vpairs, 1, D, sc.pt2, M, nkh, sc.ot, M, D, s.nvec, sc.alpha);  // O^T
  }
  write_out<S>(p, plan, sc, s, b, g);
}
#endif

}  // namespace

template <class S>
void attention_prefill(const AttentionProblem& p, const RopeTable& rope) {
  const PrefillPlan plan = plan_prefill(p);
  const int64_t groups = p.batch * p.kv_heads;
  const int64_t items = groups * plan.n_blocks;
  const int threads = used_threads(items, p.num_threads);
  Carver measure;
  carve(measure, p, plan);
  const size_t per_thread = measure.bytes();
  Buffer buffer(per_thread * threads);

#if defined(FED_ISA_AVX512)
  if (p.bf16_dot && use_bf16_dot()) {
    const PackedKvLayout lay = PackedKvLayout::of(p);
    const size_t per_group = lay.bytes();
    Buffer packed(per_group * groups);
    std::vector<PackedKv> kv(groups);
    parallel_for_dynamic(groups, used_threads(groups, p.num_threads), [&](int64_t bg, int tid) {
      Carver c(buffer.data() + per_thread * tid);
      const PrefillScratch sc = carve(c, p, plan);
      kv[bg] = pack_kv<S>(p, rope, lay, packed.data() + per_group * bg, bg / p.kv_heads,
                          bg % p.kv_heads, sc.row, sc.kt);
    });
    parallel_for_dynamic(items, threads, [&](int64_t item, int tid) {
      Carver c(buffer.data() + per_thread * tid);
      const PrefillScratch sc = carve(c, p, plan);
      const int64_t rank = item / groups, bg = item % groups;
      const int64_t qb = p.causal ? plan.n_blocks - 1 - rank : rank;
      prefill_item_pairs<S>(p, rope, plan, sc, kv[bg], bg / p.kv_heads, bg % p.kv_heads, qb);
    });
    return;
  }
#endif
  parallel_for_dynamic(items, threads, [&](int64_t item, int tid) {
    Carver c(buffer.data() + per_thread * tid);
    const PrefillScratch sc = carve(c, p, plan);
    // Items are listed block-major; causal blocks late in the sequence see the
    // most keys, so they go first for better load balance.
    const int64_t rank = item / groups, bg = item % groups;
    const int64_t qb = p.causal ? plan.n_blocks - 1 - rank : rank;
    const int64_t b = bg / p.kv_heads, g = bg % p.kv_heads;
    if (p.bf16_dot) prefill_item<S, true>(p, rope, plan, sc, b, g, qb);
    else prefill_item<S, false>(p, rope, plan, sc, b, g, qb);
  });
}

template void attention_prefill<StoreF32>(const AttentionProblem&, const RopeTable&);
template void attention_prefill<StoreBF16>(const AttentionProblem&, const RopeTable&);
template void attention_prefill<StoreF16>(const AttentionProblem&, const RopeTable&);

}  // namespace fastencdec::cpu::FED_ISA_NS
