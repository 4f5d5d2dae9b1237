// Attention for a few query rows per K/V head (decode against a KV cache, and
// cross-attention of one new token): head_dim along SIMD lanes.
//
// With one query per head there is nothing to put along lanes but D, so scores
// are dot products: four keys at a time, reduced together with hsum4. All query
// heads of a GQA group (and the T new tokens) share each K/V row read. Online
// softmax over tiles of kTileKeys keys keeps everything in registers/L1; fp32
// caches are read in place, bf16/fp16 tiles are widened into an L1 buffer first.
//
// When there are fewer (batch row, K/V head) pairs than threads can share evenly,
// the key range is split too: each split leaves a partial (max, sum, unnormalised
// output) and a second pass merges them.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "attention_common.h"

namespace fastencdec::cpu::FED_ISA_NS {

namespace {

constexpr int64_t kMinSplitKeys = 256;  // a split smaller than this costs more than it saves

// Splits per (b, g) so that items spread evenly over the threads.
int64_t choose_splits(int64_t groups, int64_t keys, int threads) {
  if (threads <= 1) return 1;
  const int64_t max_splits = std::min<int64_t>(64, std::max<int64_t>(1, keys / kMinSplitKeys));
  int64_t best = 1;
  double best_eff = 0.0;
  for (int64_t s = 1; s <= max_splits; ++s) {
    const int64_t n = groups * s;
    const double eff = static_cast<double>(n) / static_cast<double>(ceil_div(n, threads) * threads);
    if (eff > best_eff + 1e-9) {
      best = s;
      best_eff = eff;
    }
    if (eff > 0.999) break;
  }
  return best;
}

// s[r, 0..3] = q_r . k_x for RQ query rows and four key rows (dp: padded head dim).
template <int RQ>
inline void qk4(const float* q, int64_t ldq, const float* const* k4, int64_t dp, float* s,
                int64_t lds) {
  constexpr int W = VecF::kWidth;
  VecF acc[RQ][4];
  for (int r = 0; r < RQ; ++r)
    for (int x = 0; x < 4; ++x) acc[r][x] = VecF::zero();
  for (int64_t d = 0; d < dp; d += W) {
    const VecF k0 = VecF::load(k4[0] + d), k1 = VecF::load(k4[1] + d);
    const VecF k2 = VecF::load(k4[2] + d), k3 = VecF::load(k4[3] + d);
    for (int r = 0; r < RQ; ++r) {
      const VecF qv = VecF::load(q + r * ldq + d);
      acc[r][0] = VecF::fmadd(qv, k0, acc[r][0]);
      acc[r][1] = VecF::fmadd(qv, k1, acc[r][1]);
      acc[r][2] = VecF::fmadd(qv, k2, acc[r][2]);
      acc[r][3] = VecF::fmadd(qv, k3, acc[r][3]);
    }
  }
  for (int r = 0; r < RQ; ++r) VecF::hsum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3], s + r * lds);
}

inline void qk4_rows(int rows, const float* q, int64_t ldq, const float* const* k4, int64_t dp,
                     float* s, int64_t lds) {
  if constexpr (kDecodeQkRows >= 4)
    if (rows == 4) return qk4<4>(q, ldq, k4, dp, s, lds);
  if constexpr (kDecodeQkRows >= 3)
    if (rows == 3) return qk4<3>(q, ldq, k4, dp, s, lds);
  if (rows == 2) return qk4<2>(q, ldq, k4, dp, s, lds);
  qk4<1>(q, ldq, k4, dp, s, lds);
}

// o[r, dofs + 0 .. NV*W) = o * alpha[r] + sum_j p[r, j] * v_j[dofs + ...] for RP rows.
template <int RP, int NV>
inline void pv(const float* p, int64_t ldp, const float* const* vrow, int64_t nk, int64_t dofs,
               float* o, int64_t ldo, const float* alpha) {
  constexpr int W = VecF::kWidth;
  VecF acc[RP][NV];
  for (int r = 0; r < RP; ++r) {
    const VecF a = VecF::set1(alpha[r]);
    for (int x = 0; x < NV; ++x) acc[r][x] = VecF::load(o + r * ldo + x * W) * a;
  }
  for (int64_t j = 0; j < nk; ++j) {
    const float* vr = vrow[j] + dofs;
    VecF vv[NV];
    for (int x = 0; x < NV; ++x) vv[x] = VecF::load(vr + x * W);
    for (int r = 0; r < RP; ++r) {
      const VecF pj = VecF::set1(p[r * ldp + j]);
      for (int x = 0; x < NV; ++x) acc[r][x] = VecF::fmadd(pj, vv[x], acc[r][x]);
    }
  }
  for (int r = 0; r < RP; ++r)
    for (int x = 0; x < NV; ++x) acc[r][x].store(o + r * ldo + x * W);
}

template <int RP>
inline void pv_vecs(int nv, const float* p, int64_t ldp, const float* const* vrow, int64_t nk,
                    int64_t dofs, float* o, int64_t ldo, const float* alpha) {
  switch (nv) {
    case 4: return pv<RP, 4>(p, ldp, vrow, nk, dofs, o, ldo, alpha);
    case 3: return pv<RP, 3>(p, ldp, vrow, nk, dofs, o, ldo, alpha);
    case 2: return pv<RP, 2>(p, ldp, vrow, nk, dofs, o, ldo, alpha);
    default: return pv<RP, 1>(p, ldp, vrow, nk, dofs, o, ldo, alpha);
  }
}

inline void pv_any(int rows, int nv, const float* p, int64_t ldp, const float* const* vrow,
                   int64_t nk, int64_t dofs, float* o, int64_t ldo, const float* alpha) {
  static_assert(kDecodePvVecs == 4, "pv_vecs handles up to 4 vectors");
  if constexpr (kDecodePvRows >= 6)
    if (rows == 6) return pv_vecs<6>(nv, p, ldp, vrow, nk, dofs, o, ldo, alpha);
  if constexpr (kDecodePvRows >= 5)
    if (rows == 5) return pv_vecs<5>(nv, p, ldp, vrow, nk, dofs, o, ldo, alpha);
  if constexpr (kDecodePvRows >= 4)
    if (rows == 4) return pv_vecs<4>(nv, p, ldp, vrow, nk, dofs, o, ldo, alpha);
  if constexpr (kDecodePvRows >= 3)
    if (rows == 3) return pv_vecs<3>(nv, p, ldp, vrow, nk, dofs, o, ldo, alpha);
  if (rows == 2) return pv_vecs<2>(nv, p, ldp, vrow, nk, dofs, o, ldo, alpha);
  pv_vecs<1>(nv, p, ldp, vrow, nk, dofs, o, ldo, alpha);
}

struct DecodePlan {
  int64_t group, rows, dp, splits;
  bool direct;  // fp32 rows with D % W == 0 are used in place, no packing
};

struct DecodeScratch {
  float *q, *o, *s, *m, *l, *alpha, *kt, *vt;
  int64_t *kidx, *limit;
  const float **krow, **vrow;
};

DecodeScratch carve(Carver& c, const DecodePlan& plan) {
  const int64_t M = plan.rows, Dp = plan.dp;
  DecodeScratch s{};
  s.q = c.take<float>(M * Dp);
  s.o = c.take<float>(M * Dp);
  s.s = c.take<float>(M * kTileKeys);
  s.m = c.take<float>(M);
  s.l = c.take<float>(M);
  s.alpha = c.take<float>(M);
  s.kt = c.take<float>(plan.direct ? 0 : kTileKeys * Dp);
  s.vt = c.take<float>(plan.direct ? 0 : kTileKeys * Dp);
  s.kidx = c.take<int64_t>(kTileKeys);
  s.limit = c.take<int64_t>(M);
  s.krow = c.take<const float*>(kTileKeys);
  s.vrow = c.take<const float*>(kTileKeys);
  return s;
}

// Output rows r = t * G + h of (b, g): o / l, or 0 for a row that saw no key.
template <class S>
void write_rows(const AttentionProblem& p, const DecodePlan& plan, int64_t b, int64_t g,
                const float* o, const float* l, float* row) {
  using T = typename S::T;
  T* out = static_cast<T*>(p.out);
  const int64_t D = p.head_dim, G = plan.group;
  for (int64_t r = 0; r < plan.rows; ++r) {
    const int64_t t = r / G, h = r % G;
    const float inv = 1.f / l[r];
    for (int64_t d = 0; d < D; ++d) row[d] = l[r] == 0.f ? 0.f : o[r * plan.dp + d] * inv;
    store_row<S>(row, out + ((b * p.q_len + t) * p.q_heads + g * G + h) * D, D);
  }
}

// One (b, g, key range) item: leaves unnormalised o, running max m and sum l.
template <class S>
void decode_item(const AttentionProblem& p, const DecodePlan& plan, const DecodeScratch& sc,
                 int64_t b, int64_t g, int64_t split) {
  using T = typename S::T;
  constexpr int64_t W = VecF::kWidth;
  const int64_t Lq = p.q_len, Lk = p.kv_len, Hq = p.q_heads, Hkv = p.kv_heads, D = p.head_dim;
  const int64_t G = plan.group, M = plan.rows, Dp = plan.dp;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);

  const int64_t len = p.kv_seqlens ? p.kv_seqlens[b] : Lk;
  const int64_t offset = len - Lq;
  const float qscale = p.scale * kLog2e;
  for (int64_t r = 0; r < M; ++r) {
    const int64_t t = r / G, h = r % G;
    float* qr = sc.q + r * Dp;
    load_row<S>(q + ((b * Lq + t) * Hq + g * G + h) * D, qr, D);
    for (int64_t d = 0; d < D; ++d) qr[d] *= qscale;
    for (int64_t d = D; d < Dp; ++d) qr[d] = 0.f;
    sc.limit[r] = p.causal ? t + offset : INT64_MAX;
    sc.m[r] = kNegInf;
    sc.l[r] = 0.f;
  }
  std::memset(sc.o, 0, sizeof(float) * M * Dp);

  // Keys [k0, k1) of this split; split boundaries fall on tile boundaries.
  const int64_t chunk = round_up(ceil_div(len, plan.splits), kTileKeys);
  const int64_t k0 = split * chunk, k1 = std::min(len, k0 + chunk);
  const bool* mask_row = p.key_mask ? p.key_mask + b * Lk : nullptr;
  const VecF neg_inf = VecF::set1(kNegInf);

  for (int64_t j0 = k0; j0 < k1; j0 += kTileKeys) {
    const int64_t nk = collect_keys(j0, std::min(j0 + kTileKeys, k1), mask_row, sc.kidx);
    if (nk == 0) continue;
    for (int64_t jj = 0; jj < nk; ++jj) {
      const int64_t src = ((b * Lk + sc.kidx[jj]) * Hkv + g) * D;
      if (plan.direct) {
        sc.krow[jj] = reinterpret_cast<const float*>(k + src);
        sc.vrow[jj] = reinterpret_cast<const float*>(v + src);
      } else {
        float* kr = sc.kt + jj * Dp;
        float* vr = sc.vt + jj * Dp;
        load_row<S>(k + src, kr, D);
        load_row<S>(v + src, vr, D);
        for (int64_t d = D; d < Dp; ++d) kr[d] = vr[d] = 0.f;
        sc.krow[jj] = kr;
        sc.vrow[jj] = vr;
      }
    }

    // Scores, four keys at a time (a short last group repeats its last key).
    for (int64_t jj = 0; jj < nk; jj += 4) {
      const float* k4[4];
      for (int x = 0; x < 4; ++x) k4[x] = sc.krow[std::min(jj + x, nk - 1)];
      for (int64_t r0 = 0; r0 < M; r0 += kDecodeQkRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kDecodeQkRows, M - r0));
        qk4_rows(rows, sc.q + r0 * Dp, Dp, k4, Dp, sc.s + r0 * kTileKeys + jj, kTileKeys);
      }
    }

    // Causal limits, padding up to a whole vector, and the online softmax per row.
    const int64_t nkp = round_up(nk, W);
    for (int64_t r = 0; r < M; ++r) {
      float* sr = sc.s + r * kTileKeys;
      if (sc.limit[r] < sc.kidx[nk - 1])
        for (int64_t jj = 0; jj < nk; ++jj)
          if (sc.kidx[jj] > sc.limit[r]) sr[jj] = kNegInf;
      for (int64_t jj = nk; jj < nkp; ++jj) sr[jj] = kNegInf;
      VecF vmax = neg_inf;
      for (int64_t jj = 0; jj < nkp; jj += W) vmax = VecF::max(vmax, VecF::load(sr + jj));
      const float m_old = sc.m[r];
      const float m_new = std::max(m_old, vmax.reduce_max());
      const float m_use = m_new == kNegInf ? 0.f : m_new;  // no key seen yet: avoid -inf - -inf
      const VecF mv = VecF::set1(m_use);
      VecF sum = VecF::zero();
      for (int64_t jj = 0; jj < nkp; jj += W) {
        const VecF pr = VecF::exp2(VecF::load(sr + jj) - mv);
        pr.store(sr + jj);
        sum = sum + pr;
      }
      const float alpha = std::exp2(m_old - m_use);
      sc.alpha[r] = alpha;
      sc.l[r] = sc.l[r] * alpha + sum.reduce_add();
      sc.m[r] = m_new;
    }

    for (int64_t r0 = 0; r0 < M; r0 += kDecodePvRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kDecodePvRows, M - r0));
      for (int64_t d0 = 0; d0 < Dp; d0 += kDecodePvVecs * W) {
        const int nv = static_cast<int>(std::min<int64_t>(kDecodePvVecs, (Dp - d0) / W));
        pv_any(rows, nv, sc.s + r0 * kTileKeys, kTileKeys, sc.vrow, nk, d0, sc.o + r0 * Dp + d0,
               Dp, sc.alpha + r0);
      }
    }
  }
}

}  // namespace

template <class S>
void attention_decode(const AttentionProblem& p) {
  constexpr int64_t W = VecF::kWidth;
  DecodePlan plan{};
  plan.group = p.q_heads / p.kv_heads;
  plan.rows = plan.group * p.q_len;
  plan.dp = round_up(p.head_dim, W);
  plan.direct = std::is_same_v<S, StoreF32> && p.head_dim % W == 0;
  int64_t max_len = p.kv_len;
  if (p.kv_seqlens) {
    max_len = 0;
    for (int64_t b = 0; b < p.batch; ++b) max_len = std::max(max_len, p.kv_seqlens[b]);
  }
  const int64_t groups = p.batch * p.kv_heads;
  plan.splits = choose_splits(groups, max_len, p.num_threads);
  const int64_t items = groups * plan.splits;
  const int threads = used_threads(items, p.num_threads);

  Carver measure;
  carve(measure, plan);
  const size_t per_thread = measure.bytes();
  const int64_t M = plan.rows, Dp = plan.dp;
  // Partials per item (split > 1 only): m, l [M] and o [M, Dp].
  const int64_t part_floats = plan.splits > 1 ? items * M * (Dp + 2) : 0;
  Buffer buffer(per_thread * threads + sizeof(float) * (part_floats + threads * Dp));
  float* parts = reinterpret_cast<float*>(buffer.data() + per_thread * threads);
  float* rows_out = parts + part_floats;  // one output row per thread

  parallel_for_dynamic(items, threads, [&](int64_t item, int tid) {
    Carver c(buffer.data() + per_thread * tid);
    const DecodeScratch sc = carve(c, plan);
    const int64_t bg = item / plan.splits, split = item % plan.splits;
    const int64_t b = bg / p.kv_heads, g = bg % p.kv_heads;
    decode_item<S>(p, plan, sc, b, g, split);
    if (plan.splits == 1) {
      write_rows<S>(p, plan, b, g, sc.o, sc.l, rows_out + tid * Dp);
    } else {
      float* part = parts + item * M * (Dp + 2);
      std::memcpy(part, sc.m, sizeof(float) * M);
      std::memcpy(part + M, sc.l, sizeof(float) * M);
      std::memcpy(part + 2 * M, sc.o, sizeof(float) * M * Dp);
    }
  });
  if (plan.splits == 1) return;

  // Merge the splits of each (b, g): rescale every partial to the common max.
  const int merge_threads = used_threads(groups, p.num_threads);
  Buffer merge(sizeof(float) * merge_threads * (M * Dp + M));
  parallel_for_tid(groups, merge_threads, [&](int64_t begin, int64_t end, int tid) {
    float* o = reinterpret_cast<float*>(merge.data()) + tid * (M * Dp + M);
    float* l = o + M * Dp;
    for (int64_t bg = begin; bg < end; ++bg) {
      const float* first = parts + bg * plan.splits * M * (Dp + 2);
      for (int64_t r = 0; r < M; ++r) {
        float m_max = kNegInf;
        for (int64_t s = 0; s < plan.splits; ++s) m_max = std::max(m_max, first[s * M * (Dp + 2) + r]);
        const float m_use = m_max == kNegInf ? 0.f : m_max;
        float* orow = o + r * Dp;
        std::memset(orow, 0, sizeof(float) * Dp);
        l[r] = 0.f;
        for (int64_t s = 0; s < plan.splits; ++s) {
          const float* part = first + s * M * (Dp + 2);
          const float w = std::exp2(part[r] - m_use);  // 0 for a split that saw no key
          l[r] += w * part[M + r];
          const VecF wv = VecF::set1(w);
          const float* po = part + 2 * M + r * Dp;
          for (int64_t d = 0; d < Dp; d += W)
            VecF::fmadd(wv, VecF::load(po + d), VecF::load(orow + d)).store(orow + d);
        }
      }
      write_rows<S>(p, plan, bg / p.kv_heads, bg % p.kv_heads, o, l, rows_out + tid * Dp);
    }
  });
}

template void attention_decode<StoreF32>(const AttentionProblem&);
template void attention_decode<StoreBF16>(const AttentionProblem&);
template void attention_decode<StoreF16>(const AttentionProblem&);

}  // namespace fastencdec::cpu::FED_ISA_NS
