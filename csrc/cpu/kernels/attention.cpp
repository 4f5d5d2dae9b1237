// Entry point of the attention kernels: builds the RoPE cos/sin table for fused
// RoPE, then picks a strategy by how many query rows share one K/V head:
//   many (prefill, encoder, cross-attention over a target) -> attention_prefill
//   a few (decode, cross-attention of one new token)       -> attention_decode
#include "../rope_table.h"
#include "attention_common.h"

namespace fastencdec::cpu::FED_ISA_NS {

namespace {

template <class S>
void run(const AttentionProblem& p, const RopeTable& rope) {
  const int64_t rows = p.q_heads / p.kv_heads * p.q_len;
  if (!rope.enabled() && rows <= kDecodeMaxRows)
    attention_decode<S>(p);
  else
    attention_prefill<S>(p, rope);
}

}  // namespace

void attention_forward(const AttentionProblem& p) {
  if (p.batch == 0 || p.q_len == 0 || p.q_heads == 0 || p.head_dim == 0) return;
  RopeTable rope;
  Buffer table;
  if (p.positions != nullptr) {
    const int64_t half = p.head_dim / 2, n = p.pos_batch * p.q_len;
    const int64_t scratch = rope_table_scratch_doubles(half, p.num_threads);
    table.reset(sizeof(float) * 2 * n * half + sizeof(double) * scratch);
    float* cos_t = reinterpret_cast<float*>(table.data());
    float* sin_t = cos_t + n * half;
    double* tmp = reinterpret_cast<double*>(sin_t + n * half);
    rope_table(p.positions, n, p.inv_freq, half, cos_t, sin_t, tmp, p.num_threads);
    rope = RopeTable{cos_t, sin_t, half, p.pos_batch > 1 ? p.q_len : 0};
  }
  switch (p.storage) {
    case Storage::kBF16: return run<StoreBF16>(p, rope);
    case Storage::kF16: return run<StoreF16>(p, rope);
    default: return run<StoreF32>(p, rope);
  }
}

}  // namespace fastencdec::cpu::FED_ISA_NS
