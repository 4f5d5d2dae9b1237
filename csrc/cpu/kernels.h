// Declarations of the per-ISA CPU kernels. Each kernel source in kernels/ is
// compiled once per ISA into namespace fastencdec::cpu::<isa>; dispatch.h picks one.
// The problem structs are plain data shared by every ISA; the bindings fill and
// check them (shapes, dtypes, index ranges) before a kernel sees them.
#pragma once

#include <cstdint>

namespace fastencdec::cpu {

// Element type of q/k/v/caches/outputs in memory; compute is always fp32.
enum class Storage : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// Softmax attention of q [B, Lq, Hq, D] against k/v [B, Lk, Hkv, D] (all in one
// storage dtype, C-contiguous), output [B, Lq, Hq, D]. Query head h reads K/V head
// h / (Hq / Hkv). Key j is visible to query t of batch row b when
//   j < len_b (len_b = kv_seqlens[b], or Lk without it),
//   key_mask[b, j] (when given), and
//   j <= t + len_b - Lq (when causal: bottom-right aligned, = j <= t for Lq == Lk).
// A query with no visible key gets 0.
struct AttentionProblem {
  Storage storage = Storage::kF32;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  int64_t batch = 0, q_len = 0, kv_len = 0, q_heads = 0, kv_heads = 0, head_dim = 0;
  const bool* key_mask = nullptr;       // [B, Lk] or null
  const int64_t* kv_seqlens = nullptr;  // [B], values in [0, Lk], or null
  bool causal = false;
  float scale = 1.f;
  // Fused RoPE on q and k (self-attention, Lq == Lk): token positions
  // [pos_batch, Lq] with pos_batch 1 (shared) or B; inv_freq [D / 2]. Null: no RoPE.
  const int64_t* positions = nullptr;
  int64_t pos_batch = 0;
  const double* inv_freq = nullptr;
  // bf16 operands: q and k (after RoPE), v and the softmax probabilities rounded to bf16,
  // products summed in fp32 (as flash attention on GPUs; AVX512_BF16 vdpbf16ps where
  // the CPU has it, FMAs on the rounded values elsewhere). The softmax itself, its row
  // sums and the output stay fp32. Honoured by the many-queries (prefill) strategy; the
  // few-queries (decode) one computes in fp32.
  bool bf16_dot = false;
  int num_threads = 1;
};

// One decode step's cache update: rotate q [B, T, Hq, D] and k [B, T, Hkv, D] at
// positions cache_seqlens[b] + t (when inv_freq is set), write rotated q to q_out and
// k, v into rows cache_seqlens[b] + t of k_cache/v_cache [B, Lmax, Hkv, D].
// Requires cache_seqlens[b] + T <= Lmax.
struct AppendKvCacheProblem {
  Storage storage = Storage::kF32;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* q_out = nullptr;  // null: q is not needed (no RoPE)
  void* k_cache = nullptr;
  void* v_cache = nullptr;
  const int64_t* cache_seqlens = nullptr;
  int64_t batch = 0, new_len = 0, q_heads = 0, kv_heads = 0, head_dim = 0, max_len = 0;
  const double* inv_freq = nullptr;  // [D / 2]; null: no RoPE
  int num_threads = 1;
};

// RMSNorm of x [rows, dim] (storage dtype) with an fp32 weight [dim] into out
// (same shape and storage; may not alias x partially). Compute in fp32.
struct RmsNormProblem {
  Storage storage = Storage::kF32;
  const void* x = nullptr;
  void* out = nullptr;
  const float* weight = nullptr;
  int64_t rows = 0, dim = 0;
  float eps = 1e-6f;
  int num_threads = 1;
};

// The int8 linear layer (kernels/int8_linear.cpp): out [rows, out_features] fp32 =
//   act(acc[m, n] * (s[m] * weight_scale[n]) + bias[n]),  acc = sum_k xq[m, k] * w[n, k]
// where each row of x [rows, in_features] fp32 is quantised on its own symmetric grid:
// s[m] = max |x[m, :]| / 127 (0 for a zero row, NaN for a row holding NaN/Inf) and
// xq = round_half_even(x * 127 / max) in [-127, 127]; acc is an exact int32 sum.
// weight: int8 [ceil(N / 32), ceil(K / 4), 32, 4] panels, weight[p, q, c, r] =
// W[32 p + c, 4 q + r] (zero padded): one panel of 32 output columns is read front to
// back, 128 bytes per 4 k.
// in_features <= kInt8MaxK keeps every int32 partial sum exact.
constexpr int64_t kInt8MaxK = 65536;
struct Int8LinearProblem {
  const float* x = nullptr;
  const int8_t* weight = nullptr;
  const float* weight_scale = nullptr;    // [out_features]
  const float* bias = nullptr;            // [out_features] or null
  float* out = nullptr;
  int64_t rows = 0, in_features = 0, out_features = 0;
  bool gelu = false;  // GELU-tanh after the bias
  int num_threads = 1;
};

// The bf16 linear layer (kernels/bf16_linear.cpp): out [rows, out_features] =
//   act(sum_k x[m, k] w[n, k] + bias[n])
// with x [rows, in_features], w and bias bf16; each product is exact in fp32 and the
// sum runs in fp32, k pair by k pair (k odd, then k even, as AVX512_BF16's vdpbf16ps
// adds them; every ISA path keeps that order). out is bf16 (rounded once, to nearest
// even) or fp32. Rows are computed independently of each other and of the blocking
// and thread count. weight: bf16 [ceil(N / 32), ceil(K / 2), 32, 2] panels,
// weight[p, q, c, r] = W[32 p + c, 2 q + r] (zero padded): a panel of 32 output
// columns is read front to back, 128 bytes per 2 k.
struct Bf16LinearProblem {
  const uint16_t* x = nullptr;       // bf16 bits [rows, in_features]
  const uint16_t* weight = nullptr;  // bf16 bits, panels as above
  const uint16_t* bias = nullptr;    // bf16 bits [out_features] or null
  void* out = nullptr;               // [rows, out_features]: bf16 bits or fp32
  bool out_f32 = false;
  int64_t rows = 0, in_features = 0, out_features = 0;
  bool gelu = false;  // GELU-tanh after the bias (in fp32, before the output rounding)
  int num_threads = 1;
};

}  // namespace fastencdec::cpu

#define FED_DECLARE_KERNELS(NS)                                                          \
  namespace fastencdec::cpu::NS {                                                        \
  /* x, out: [rows, heads, head_dim] fp32 contiguous; positions: [rows] int64;          \
     inv_freq: [head_dim / 2]. out may alias x. */                                       \
  void apply_rope(const float* x, float* out, const int64_t* positions,                  \
                  const double* inv_freq, int64_t rows, int64_t heads, int64_t head_dim,  \
                  int num_threads);                                                      \
  /* Self-, cross- and cache-decode attention (AttentionProblem). */                     \
  void attention_forward(const AttentionProblem& problem);                               \
  /* RoPE + KV-cache append (AppendKvCacheProblem). */                                        \
  void append_kv_cache(const AppendKvCacheProblem& problem);                                  \
  /* RMSNorm over the last dimension (RmsNormProblem). */                                \
  void rms_norm(const RmsNormProblem& problem);                                          \
  /* The int8 linear layer: row quantisation, GEMM/GEMV and epilogue in one call. */  \
  void int8_linear(const Int8LinearProblem& problem);                                    \
  /* The bf16 linear layer: GEMM/GEMV and epilogue in one call. */                     \
  void bf16_linear(const Bf16LinearProblem& problem);                                    \
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
