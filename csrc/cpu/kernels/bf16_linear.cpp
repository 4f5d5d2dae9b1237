// The bf16 linear layer (fastencdec.models.quantize.Bf16Linear):
//   y[m, n] = act(sum_k x[m, k] w[n, k] + bias[n])   x, w, bias bf16; y bf16 or fp32
// Products of two bf16 values are exact in fp32 and the sums run in fp32, a k pair at a
// time (the odd k first, then the even one: the order of AVX512_BF16's vdpbf16ps, which
// every path here keeps), so a row's result never depends on the other rows, the
// blocking or the thread count.
//
// The weights are packed like the int8 kernel's (kernels.h): panels of 32 output
// columns, 128 bytes per 2 k (each column's pair side by side), read front to back as
// one stream with output columns along the vector lanes (no horizontal sums). Decoding
// is weight streaming, and oneDNN's bf16 GEMV reaches ~2/3 of the machine's read
// bandwidth at batch 1 (bench/bench_linear_cpu.py).
// Inner products: vdpbf16ps where the CPU has AVX512_BF16; elsewhere each 32-bit pair
// splits into two fp32 lanes by a shift and a mask (a bf16 is the top half of its fp32)
// and goes through FMAs (AVX-512, AVX2, NEON, scalar).
#include <algorithm>
#include <cstring>
#include <vector>

#include "../gelu.h"
#include "../isa.h"
#include "../kernels.h"
#include "../parallel.h"
#include "../storage.h"
#include "../vec.h"

namespace fastencdec::cpu::FED_ISA_NS {

namespace {

constexpr int kPanel = 32;  // output columns per panel

// out[j] = act(acc[j] + bias[j]) for j < n, stored as bf16 or fp32. A short tail goes
// through the same vector code on padded copies, so every element is computed alike.
void epilogue(const float* acc, int64_t n, const uint16_t* bias, bool gelu, void* out,
              bool out_f32) {
  constexpr int W = VecF::kWidth;
  auto one = [&](const float* a, const uint16_t* b, float* of, uint16_t* ob) {
    VecF v = VecF::load(a);
    if (b) v = v + StoreBF16::load(b);
    if (gelu) v = gelu_tanh(v);
    if (of) v.store(of);
    else StoreBF16::store(ob, v);
  };
  float* of = out_f32 ? static_cast<float*>(out) : nullptr;
  uint16_t* ob = out_f32 ? nullptr : static_cast<uint16_t*>(out);
  int64_t j = 0;
  for (; j + W <= n; j += W)
    one(acc + j, bias ? bias + j : nullptr, of ? of + j : nullptr, ob ? ob + j : nullptr);
  if (j < n) {
    float a[W] = {}, o[W];
    uint16_t b[W] = {}, h[W];
    const int64_t rest = n - j;
    std::copy(acc + j, acc + n, a);
    if (bias) std::copy(bias + j, bias + n, b);
    one(a, bias ? b : nullptr, of ? o : nullptr, ob ? h : nullptr);
    if (of) std::copy(o, o + rest, of + j);
    else std::copy(h, h + rest, ob + j);
  }
}

// -- inner kernels --------------------------------------------------------------------
// dot<MC>: out[i * 32 + c] = sum_k x[i * xs + k] * W[c, k] for i < MC and the 32 columns
// c of the panel at w ([Kp][32][2] bf16: for each k pair, 64 values).
#if defined(FED_ISA_AVX512)
template <int MC>
__attribute__((target("avx512bf16"))) void dot_bf16(const uint16_t* x, int64_t xs,
                                                   const uint16_t* w, int64_t Kp, float* out) {
  __m512 acc[MC][2];
  for (int i = 0; i < MC; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int64_t q = 0; q < Kp; ++q) {
    const __m512i w0 = _mm512_loadu_si512(w + 64 * q);
    const __m512i w1 = _mm512_loadu_si512(w + 64 * q + 32);
    for (int i = 0; i < MC; ++i) {
      int32_t pair;
      std::memcpy(&pair, x + i * xs + 2 * q, 4);
      const __m512i xb = _mm512_set1_epi32(pair);
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], (__m512bh)xb, (__m512bh)w0);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], (__m512bh)xb, (__m512bh)w1);
    }
  }
  for (int i = 0; i < MC; ++i) {
    _mm512_storeu_ps(out + i * 32, acc[i][0]);
    _mm512_storeu_ps(out + i * 32 + 16, acc[i][1]);
  }
}
#endif

// W bf16 pairs (2W values) -> the W even-k values and the W odd-k values as fp32.
inline void split_pairs(const uint16_t* p, VecF& even, VecF& odd) {
#if defined(FED_ISA_AVX512)
  const __m512i v = _mm512_loadu_si512(p);
  even = VecF(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
  odd = VecF(_mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int(0xFFFF0000u)))));
#elif defined(FED_ISA_AVX2)
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even = VecF(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
  odd = VecF(_mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int(0xFFFF0000u)))));
#elif defined(FED_ISA_NEON)
  const uint32x4_t v = vreinterpretq_u32_u16(vld1q_u16(p));
  even = VecF(vreinterpretq_f32_u32(vshlq_n_u32(v, 16)));
  odd = VecF(vreinterpretq_f32_u32(vandq_u32(v, vdupq_n_u32(0xFFFF0000u))));
#else
  even = VecF(bf16_to_float(p[0]));
  odd = VecF(bf16_to_float(p[1]));
#endif
}

#if defined(FED_ISA_AVX512)
constexpr int kMaxM = 8;  // 8 x 2 accumulators + 2 weights + 1 broadcast
#elif defined(FED_ISA_AVX2) || defined(FED_ISA_NEON)
constexpr int kMaxM = 2;  // 2 x (32 / W) accumulators: 8 of 16 ymm, 16 of 32 q registers
#else
constexpr int kMaxM = 1;
#endif

// The FMA path: x arrives as fp32 (converted once per row), the weights are split.
template <int MC>
void dot(const float* x, int64_t xs, const uint16_t* w, int64_t Kp, float* out) {
  constexpr int W = VecF::kWidth, NV = kPanel / W;
  VecF acc[MC][NV];
  for (int i = 0; i < MC; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = VecF::zero();
  for (int64_t q = 0; q < Kp; ++q) {
    for (int v = 0; v < NV; ++v) {
      VecF even, odd;
      split_pairs(w + 64 * q + 2 * W * v, even, odd);
      for (int i = 0; i < MC; ++i) {
        const float* xi = x + i * xs + 2 * q;
        acc[i][v] = VecF::fmadd(VecF::set1(xi[1]), odd, acc[i][v]);
        acc[i][v] = VecF::fmadd(VecF::set1(xi[0]), even, acc[i][v]);
      }
    }
  }
  for (int i = 0; i < MC; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v].store(out + i * 32 + v * W);
}

// Run-time tile height (mc in [1, MaxM]) to the compiled kernels.
template <typename X, int MaxM, int MC, typename Kernel>
void dot_any(int mc, const X* x, int64_t xs, const uint16_t* w, int64_t Kp, float* out,
             const Kernel& kernel) {
  if constexpr (MC <= MaxM) {
    if (mc != MC) return dot_any<X, MaxM, MC + 1>(mc, x, xs, w, Kp, out, kernel);
    return kernel(std::integral_constant<int, MC>(), x, xs, w, Kp, out);
  }
}

// -- the driver -----------------------------------------------------------------------
// X: the row layout the inner kernel reads (bf16 pairs, or fp32), rows padded with
// zeros to whole k pairs (padded weights are 0 too, so padding never counts).
template <typename X, int MaxM, typename Kernel>
void run(const Bf16LinearProblem& p, const Kernel& kernel) {
  const int64_t M = p.rows, N = p.out_features, K = p.in_features;
  const int64_t Kp = (K + 1) / 2, panel_elems = Kp * 64;
  const X* rows = nullptr;
  int64_t xs = 0;
  std::vector<X> copy;
  if constexpr (std::is_same_v<X, uint16_t>) {
    if (K % 2 == 0) {  // rows already hold whole pairs: read them in place
      rows = p.x;
      xs = K;
    }
  }
  if (rows == nullptr) {
    xs = 2 * Kp;
    copy.resize(static_cast<size_t>(M * xs));
    parallel_for_tid(M, M * K < (1 << 16) ? 1 : p.num_threads, [&](int64_t b, int64_t e, int) {
      for (int64_t m = b; m < e; ++m) {
        X* row = copy.data() + m * xs;
        if constexpr (std::is_same_v<X, float>) load_row<StoreBF16>(p.x + m * K, row, K);
        else std::copy(p.x + m * K, p.x + (m + 1) * K, row);
        std::fill(row + K, row + xs, X(0));
      }
    });
    rows = copy.data();
  }

  const int64_t panels = (N + kPanel - 1) / kPanel;
  // Rows of x per pass over the weights, whole tiles of them: ~256 KiB stay in L2
  // while the weight panels stream past (one pass when decoding).
  const int64_t m_block =
      std::max<int64_t>(1, (256 << 10) / std::max<int64_t>(1, xs * int64_t(sizeof(X))) / MaxM) * MaxM;
  // Below ~64 KiB of weights (x rows) a second thread costs more to wake than it saves.
  const int threads = N * K * std::min<int64_t>(M, 8) < (1 << 15) ? 1 : p.num_threads;
  const int64_t out_elem = p.out_f32 ? 4 : 2;
  parallel_for_tid(panels, threads, [&](int64_t u0, int64_t u1, int) {
    float tile[MaxM * kPanel];
    for (int64_t mb = 0; mb < M; mb += m_block) {
      const int64_t me = std::min(M, mb + m_block);
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t n0 = kPanel * u;
        const int64_t cols = std::min<int64_t>(kPanel, N - n0);
        const uint16_t* w = p.weight + u * panel_elems;
        for (int64_t m0 = mb; m0 < me; m0 += MaxM) {
          const int mc = static_cast<int>(std::min<int64_t>(MaxM, me - m0));
          dot_any<X, MaxM, 1>(mc, rows + m0 * xs, xs, w, Kp, tile, kernel);
          for (int i = 0; i < mc; ++i)
            epilogue(tile + i * kPanel, cols, p.bias ? p.bias + n0 : nullptr, p.gelu,
                     static_cast<char*>(p.out) + ((m0 + i) * N + n0) * out_elem, p.out_f32);
        }
      }
    }
  });
}

}  // namespace

void bf16_linear(const Bf16LinearProblem& p) {
  if (p.rows <= 0 || p.out_features <= 0) return;
#if defined(FED_ISA_AVX512)
  constexpr int kMaxMDot = 8;  // 8 x 2 accumulators + 2 weights + 1 broadcast
  if (use_bf16_dot())
    return run<uint16_t, kMaxMDot>(p, [](auto mc, const uint16_t* x, int64_t xs, const uint16_t* w,
                                  int64_t Kp, float* out) {
      dot_bf16<decltype(mc)::value>(x, xs, w, Kp, out);
    });
#endif
  run<float, kMaxM>(p, [](auto mc, const float* x, int64_t xs, const uint16_t* w, int64_t Kp,
                          float* out) { dot<decltype(mc)::value>(x, xs, w, Kp, out); });
}

}  // namespace fastencdec::cpu::FED_ISA_NS
