// One decode step's KV-cache update: RoPE on the new q and k at positions
// cache_seqlens[b] + t, rotated k and v written into the caches in place, rotated
// q written to q_out. Rotated values are rounded once, to the storage dtype.
#include <cstring>

#include "../rope_table.h"
#include "attention_common.h"

namespace fastencdec::cpu::FED_ISA_NS {

namespace {

template <class S>
void append(const AppendKvCacheProblem& p) {
  using T = typename S::T;
  const int64_t B = p.batch, Tn = p.new_len, Hq = p.q_heads, Hkv = p.kv_heads, D = p.head_dim;
  const int64_t n = B * Tn, half = D / 2;
  const bool rope = p.inv_freq != nullptr;
  const int threads = used_threads(n, p.num_threads);

  // Layout: positions [n], cos/sin [n, half], table scratch, one fp32 row per thread.
  const int64_t table_scratch = rope ? rope_table_scratch_doubles(half, threads) : 0;
  Carver measure;
  measure.take<int64_t>(n);
  measure.take<float>(rope ? 2 * n * half : 0);
  measure.take<double>(table_scratch);
  measure.take<float>(threads * D);
  Buffer buffer(measure.bytes());
  Carver c(buffer.data());
  int64_t* pos = c.take<int64_t>(n);
  float* cos_t = c.take<float>(rope ? 2 * n * half : 0);
  float* sin_t = cos_t + n * half;
  double* tmp = c.take<double>(table_scratch);
  float* rows = c.take<float>(threads * D);

  for (int64_t i = 0; i < n; ++i) pos[i] = p.cache_seqlens[i / Tn] + i % Tn;
  if (rope) rope_table(pos, n, p.inv_freq, half, cos_t, sin_t, tmp, threads);

  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  T* q_out = static_cast<T*>(p.q_out);
  T* k_cache = static_cast<T*>(p.k_cache);
  T* v_cache = static_cast<T*>(p.v_cache);
  parallel_for_tid(n, threads, [&](int64_t begin, int64_t end, int tid) {
    float* row = rows + tid * D;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / Tn;
      const int64_t dst = (b * p.max_len + pos[i]) * Hkv * D;  // cache row of token i
      const float* cs = cos_t + i * half;
      const float* sn = sin_t + i * half;
      if (rope && q_out != nullptr) {
        for (int64_t h = 0; h < Hq; ++h) {
          load_row<S>(q + (i * Hq + h) * D, row, D);
          rope_row(row, cs, sn, half);
          store_row<S>(row, q_out + (i * Hq + h) * D, D);
        }
      }
      for (int64_t h = 0; h < Hkv; ++h) {
        if (rope) {
          load_row<S>(k + (i * Hkv + h) * D, row, D);
          rope_row(row, cs, sn, half);
          store_row<S>(row, k_cache + dst + h * D, D);
        } else {
          std::memcpy(k_cache + dst + h * D, k + (i * Hkv + h) * D, sizeof(T) * D);
        }
      }
      std::memcpy(v_cache + dst, v + i * Hkv * D, sizeof(T) * Hkv * D);
    }
  });
}

}  // namespace

void append_kv_cache(const AppendKvCacheProblem& p) {
  if (p.batch == 0 || p.new_len == 0 || p.head_dim == 0) return;
  switch (p.storage) {
    case Storage::kBF16: return append<StoreBF16>(p);
    case Storage::kF16: return append<StoreF16>(p);
    default: return append<StoreF32>(p);
  }
}

}  // namespace fastencdec::cpu::FED_ISA_NS
