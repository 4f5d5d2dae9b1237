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
#include <algorithm>
#include <cstring>

#include "../rope_table.h"
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
  const int64_t target = std::max<int64_t>(W, std::min<int64_t>(128, 4096 / p.head_dim) / W * W);
  plan.block_q = std::max<int64_t>(1, std::min<int64_t>(target / plan.group, p.q_len));
  plan.lanes = round_up(plan.block_q * plan.group, W);
  plan.n_blocks = ceil_div(p.q_len, plan.block_q);
  return plan;
}

struct PrefillScratch {
  float *qt, *ot, *st, *kt, *vt, *m, *l, *alpha, *limit, *row;
  int64_t* kidx;
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
  s.row = c.take<float>(D);
  s.kidx = c.take<int64_t>(kTileKeys);
  return s;
}

template <class S>
void prefill_item(const AttentionProblem& p, const RopeTable& rope, const PrefillPlan& plan,
                  const PrefillScratch& sc, int64_t b, int64_t g, int64_t qb) {
  using T = typename S::T;
  constexpr int64_t W = VecF::kWidth;
  const int64_t Lq = p.q_len, Lk = p.kv_len, Hq = p.q_heads, Hkv = p.kv_heads, D = p.head_dim;
  const int64_t G = plan.group, M = plan.lanes;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  T* out = static_cast<T*>(p.out);

  const int64_t t0 = qb * plan.block_q;
  const int64_t nt = std::min(plan.block_q, Lq - t0);
  const int64_t n_lanes = nt * G;
  const int64_t nvec = ceil_div(n_lanes, W);
  const int64_t len = p.kv_seqlens ? p.kv_seqlens[b] : Lk;
  const int64_t offset = len - Lq;  // causal: token t sees keys j <= t + offset

  // Q^T [D, M]: lane = token * G + head, RoPE'd, rounded like the reference, and
  // pre-multiplied by scale * log2(e).
  const float qscale = p.scale * kLog2e;
  for (int64_t tt = 0; tt < nt; ++tt) {
    for (int64_t h = 0; h < G; ++h) {
      const int64_t lane = tt * G + h;
      load_row<S>(q + (((b * Lq) + t0 + tt) * Hq + g * G + h) * D, sc.row, D);
      if (rope.enabled()) {
        rope_row(sc.row, rope.c(b, t0 + tt), rope.s(b, t0 + tt), D / 2);
        round_row<S>(sc.row, D);
      }
      for (int64_t d = 0; d < D; ++d) sc.qt[d * M + lane] = sc.row[d] * qscale;
    }
  }
  for (int64_t d = 0; d < D; ++d)
    for (int64_t lane = n_lanes; lane < nvec * W; ++lane) sc.qt[d * M + lane] = 0.f;
  for (int64_t lane = 0; lane < nvec * W; ++lane) {
    sc.limit[lane] = lane < n_lanes ? static_cast<float>(t0 + lane / G + offset) : -1.f;
    sc.m[lane] = kNegInf;
    sc.l[lane] = 0.f;
  }
  std::memset(sc.ot, 0, sizeof(float) * D * M);

  int64_t key_end = len;
  if (p.causal) key_end = std::min(key_end, t0 + nt + offset);  // last token's limit + 1
  const int64_t min_limit = t0 + offset;                          // first token's limit
  const bool* mask_row = p.key_mask ? p.key_mask + b * Lk : nullptr;
  const VecF neg_inf = VecF::set1(kNegInf);

  for (int64_t j0 = 0; j0 < key_end; j0 += kTileKeys) {
    const int64_t nk = collect_keys(j0, std::min(j0 + kTileKeys, key_end), mask_row, sc.kidx);
    if (nk == 0) continue;  // fully padded tile

    for (int64_t jj = 0; jj < nk; ++jj) {
      const int64_t j = sc.kidx[jj];
      const int64_t src = ((b * Lk + j) * Hkv + g) * D;
      float* krow = sc.kt + jj * D;
      load_row<S>(k + src, krow, D);
      if (rope.enabled()) {
        rope_row(krow, rope.c(b, j), rope.s(b, j), D / 2);
        round_row<S>(krow, D);
      }
      load_row<S>(v + src, sc.vt + jj * D, D);
    }

    gemm(sc.kt, D, 1, sc.qt, M, D, sc.st, M, nk, nvec, nullptr);  // S^T = Kt Q^T

    if (p.causal && sc.kidx[nk - 1] > min_limit) {  // the tile crosses the diagonal
      for (int64_t jj = 0; jj < nk; ++jj) {
        if (sc.kidx[jj] <= min_limit) continue;
        const VecF key = VecF::set1(static_cast<float>(sc.kidx[jj]));
        float* srow = sc.st + jj * M;
        for (int64_t iv = 0; iv < nvec; ++iv) {
          const VecF lim = VecF::load(sc.limit + iv * W);
          VecF::if_le(key, lim, VecF::load(srow + iv * W), neg_inf).store(srow + iv * W);
        }
      }
    }

    // Online softmax, one lane vector at a time down the key rows.
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
        pr.store(sp);
        sum = sum + pr;
      }
      VecF::fmadd(VecF::load(sc.l + iv * W), alpha, sum).store(sc.l + iv * W);
      m_new.store(sc.m + iv * W);
      alpha.store(sc.alpha + iv * W);
    }

    gemm(sc.vt, 1, D, sc.st, M, nk, sc.ot, M, D, nvec, sc.alpha);  // O^T = O^T*alpha + Vt^T P^T
  }

  // out = O / l; a query that saw no key (l == 0) gets 0. NaN l stays NaN.
  for (int64_t tt = 0; tt < nt; ++tt) {
    for (int64_t h = 0; h < G; ++h) {
      const int64_t lane = tt * G + h;
      const float l = sc.l[lane];
      const float inv = 1.f / l;
      for (int64_t d = 0; d < D; ++d) sc.row[d] = l == 0.f ? 0.f : sc.ot[d * M + lane] * inv;
      store_row<S>(sc.row, out + (((b * Lq) + t0 + tt) * Hq + g * G + h) * D, D);
    }
  }
}

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

  parallel_for_dynamic(items, threads, [&](int64_t item, int tid) {
    Carver c(buffer.data() + per_thread * tid);
    const PrefillScratch sc = carve(c, p, plan);
    // Items are listed block-major; causal blocks late in the sequence see the
    // most keys, so they go first for better load balance.
    const int64_t rank = item / groups, bg = item % groups;
    const int64_t qb = p.causal ? plan.n_blocks - 1 - rank : rank;
    prefill_item<S>(p, rope, plan, sc, bg / p.kv_heads, bg % p.kv_heads, qb);
  });
}

template void attention_prefill<StoreF32>(const AttentionProblem&, const RopeTable&);
template void attention_prefill<StoreBF16>(const AttentionProblem&, const RopeTable&);
template void attention_prefill<StoreF16>(const AttentionProblem&, const RopeTable&);

}  // namespace fastencdec::cpu::FED_ISA_NS
