// The int8 linear layer (fastencdec.models.quantize.Int8Linear):
//   y[m, n] = act(acc[m, n] * (s[m] * ws[n]) + bias[n]),  acc = sum_k xq[m, k] * w[n, k]
// with w int8 per output channel (scale ws[n]) and each input row quantised on its own
// symmetric grid:
//   s[m] = max_k |x[m, k]| / 127,  xq[m, k] = round_half_even(x[m, k] * (127 / max)) in
//   [-127, 127]; a zero row gets s = 0 (y = bias), a row holding NaN/Inf s = NaN (y NaN).
// acc is an exact int32 sum and the epilogue is elementwise, so a row's result never
// depends on the other rows, the blocking or the thread count.
//
// The weights are packed in panels of 32 output columns (kernels.h): for each 4 k, 128
// bytes hold the 32 columns' 4 weights, so a panel is read front to back as one stream
// and the vector lanes are output columns (no horizontal sums). Reading 4 rows of the
// plain [N, K] layout side by side streamed from DRAM at ~2/3 of that speed (2-thread
// AVX-512 microbenchmark here: 13-15 vs 19-23 GB/s), and decoding is weight streaming.
// Inner products: AVX512-VNNI vpdpbusd (u8 x s8; the weights read as w + 128, corrected
// by 128 * each x row's sum) where the CPU has it, else int16 multiply-add into int32
// (AVX-512BW / AVX2 vpmaddwd, NEON smull + sadalp): exact, no saturation.
// One kernel serves decoding (a few rows: one pass over the weights) and the encoder
// (hundreds of rows: 8-row tiles, ~256 KiB of rows kept in L2 while the panels stream).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../gelu.h"
#include "../isa.h"
#include "../kernels.h"
#include "../parallel.h"
#include "../vec.h"

namespace fastencdec::cpu::FED_ISA_NS {

namespace {

inline VecF load_i32(const int32_t* p) {
#if defined(FED_ISA_AVX512)
  return VecF(_mm512_cvtepi32_ps(_mm512_loadu_si512(p)));
#elif defined(FED_ISA_AVX2)
  return VecF(_mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#elif defined(FED_ISA_NEON)
  return VecF(vcvtq_f32_s32(vld1q_s32(p)));
#else
  return VecF(static_cast<float>(*p));
#endif
}

inline int32_t round_clamp(float v) {  // round half to even (the vector converts do too)
  const float r = std::nearbyint(v);
  return static_cast<int32_t>(std::min(127.0f, std::max(-127.0f, r)));
}

// Quantises one row; returns its scale s. Vector lanes and the scalar tail round alike
// (one IEEE multiply, then round-half-even), so the layout of the loop never matters.
template <typename Q>
float quantize_row(const float* x, int64_t K, Q* q) {
  constexpr int W = VecF::kWidth;
  const VecF zero = VecF::zero();
  VecF vmax = zero, probe = zero;  // max() may drop NaN lanes: x * 0 finds NaN and Inf
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    const VecF v = VecF::load(x + k);
    vmax = VecF::max(vmax, VecF::max(v, zero - v));
    probe = VecF::fmadd(v, zero, probe);
  }
  float amax = vmax.reduce_max(), probe_sum = probe.reduce_add();
  for (; k < K; ++k) {
    amax = std::fmax(amax, std::fabs(x[k]));
    probe_sum += x[k] * 0.0f;
  }
  const bool finite = probe_sum == 0.0f && std::isfinite(amax);
  if (!finite || !(amax > 0.0f)) {
    std::fill(q, q + K, Q(0));
    return finite ? 0.0f : std::numeric_limits<float>::quiet_NaN();
  }
  const float inv = 127.0f / amax;
  k = 0;
#if defined(FED_ISA_AVX512)
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  for (; k + 16 <= K; k += 16) {
    __m512i i = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + k), _mm512_set1_ps(inv)));
    i = _mm512_min_epi32(hi, _mm512_max_epi32(lo, i));
    if constexpr (sizeof(Q) == 1)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtepi32_epi8(i));
    else
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k), _mm512_cvtepi32_epi16(i));
  }
#elif defined(FED_ISA_AVX2) || defined(FED_ISA_NEON)
  alignas(32) int32_t lanes[W];
  for (; k + W <= K; k += W) {
#if defined(FED_ISA_AVX2)
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes),
                       _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k),
                                                        _mm256_set1_ps(inv))));
#else
    vst1q_s32(lanes, vcvtnq_s32_f32(vmulq_f32(vld1q_f32(x + k), vdupq_n_f32(inv))));
#endif
    for (int j = 0; j < W; ++j) q[k + j] = static_cast<Q>(std::min(127, std::max(-127, lanes[j])));
  }
#endif
  for (; k < K; ++k) q[k] = static_cast<Q>(round_clamp(x[k] * inv));
  return amax / 127.0f;
}

// out[j] = act(acc[j] * (s * ws[j]) + bias[j]) for j < n. A short tail goes through the
// same vector code on padded copies, so every element is computed the same way.
void epilogue(const int32_t* acc, int64_t n, float s, const float* ws, const float* bias,
              bool gelu, float* out) {
  constexpr int W = VecF::kWidth;
  const VecF sv = VecF::set1(s);
  auto one = [&](const int32_t* a, const float* w, const float* b, float* o) {
    VecF v = VecF::fmadd(load_i32(a), sv * VecF::load(w), b ? VecF::load(b) : VecF::zero());
    if (gelu) v = gelu_tanh(v);
    v.store(o);
  };
  int64_t j = 0;
  for (; j + W <= n; j += W) one(acc + j, ws + j, bias ? bias + j : nullptr, out + j);
  if (j < n) {
    int32_t a[W] = {};
    float w[W] = {}, b[W] = {}, o[W];
    const int64_t rest = n - j;
    std::copy(acc + j, acc + n, a);
    std::copy(ws + j, ws + n, w);
    if (bias) std::copy(bias + j, bias + n, b);
    one(a, w, bias ? b : nullptr, o);
    std::copy(o, o + rest, out + j);
  }
}

// -- inner kernels --------------------------------------------------------------------
// dot<MC>: out[i * 32 + c] = sum_k x[i * xs + k] * W[c, k] for i < MC and the 32 columns
// c of the panel at w ([Kq][32][4] bytes: for each 4 k, two 64-byte halves v = 0, 1 of
// 16 columns). Lanes are output columns, so nothing is reduced across lanes.
constexpr int NV = 2;  // 64-byte halves (16 int32 lanes each) of a panel's 128 bytes
#if defined(FED_ISA_AVX512)
// AVX512-VNNI: vpdpbusd multiplies u8 x s8 in fours into int32 lanes. The weights are
// the u8 operand (w + 128: a XOR per 64 bytes loaded) and x the s8 one, so each row's
// quad can be a broadcast memory operand of vpdpbusd itself; 128 * the row's sum of xq
// (x_sums128) comes off at the end.
template <int MC>
__attribute__((target("avx512vnni"))) void dot_vnni(const int8_t* x, int64_t xs,
                                                   const int8_t* w, int64_t Kq,
                                                   const int32_t* x_sums128,
                                                   int32_t* out) {
  __m512i acc[MC][NV];
  for (int i = 0; i < MC; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_si512();
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t q = 0; q < Kq; ++q) {
    __m512i wv[NV];
    for (int v = 0; v < NV; ++v)
      wv[v] = _mm512_xor_si512(_mm512_loadu_si512(w + 64 * v + 128 * q), flip);
    for (int i = 0; i < MC; ++i) {
      int32_t quad;
      std::memcpy(&quad, x + i * xs + 4 * q, 4);
      const __m512i xb = _mm512_set1_epi32(quad);
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_dpbusd_epi32(acc[i][v], wv[v], xb);
    }
  }
  for (int i = 0; i < MC; ++i) {
    const __m512i corr = _mm512_set1_epi32(x_sums128[i]);
    for (int v = 0; v < NV; ++v)
      _mm512_storeu_si512(out + i * 32 + 16 * v, _mm512_sub_epi32(acc[i][v], corr));
  }
}

#if defined(__GNUC__)
// The full 8-row tile (the encoder's GEMMs spend their time here). GCC 12 compiles the
// intrinsic loop above with a register copy per vpdpbusd and a vpbroadcastd per row;
// here each accumulator is a named register updated in place and each row's quad is
// vpdpbusd's own {1to16} broadcast operand.
#define FED_DPBUSD(acc, w, p)                                              \
  __asm__("vpdpbusd %2%{1to16%}, %1, %0"                                  \
          : "+v"(acc)                                                      \
          : "v"(w), "m"(*reinterpret_cast<const int32_t*>(p)))
template <>
__attribute__((target("avx512vnni"))) void dot_vnni<8>(const int8_t* x, int64_t xs,
                                                      const int8_t* w, int64_t Kq,
                                                      const int32_t* x_sums128,
                                                      int32_t* out) {
  __m512i a00 = _mm512_setzero_si512(), a01 = a00, a10 = a00, a11 = a00, a20 = a00,
          a21 = a00, a30 = a00, a31 = a00, a40 = a00, a41 = a00, a50 = a00, a51 = a00,
          a60 = a00, a61 = a00, a70 = a00, a71 = a00;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const int8_t *x0 = x, *x1 = x + xs, *x2 = x + 2 * xs, *x3 = x + 3 * xs, *x4 = x + 4 * xs,
               *x5 = x + 5 * xs, *x6 = x + 6 * xs, *x7 = x + 7 * xs;
  for (int64_t q = 0; q < Kq; ++q, w += 128) {
    const __m512i w0 = _mm512_xor_si512(_mm512_loadu_si512(w), flip);
    const __m512i w1 = _mm512_xor_si512(_mm512_loadu_si512(w + 64), flip);
    const int64_t o = 4 * q;
    FED_DPBUSD(a00, w0, x0 + o); FED_DPBUSD(a01, w1, x0 + o);
    FED_DPBUSD(a10, w0, x1 + o); FED_DPBUSD(a11, w1, x1 + o);
    FED_DPBUSD(a20, w0, x2 + o); FED_DPBUSD(a21, w1, x2 + o);
    FED_DPBUSD(a30, w0, x3 + o); FED_DPBUSD(a31, w1, x3 + o);
    FED_DPBUSD(a40, w0, x4 + o); FED_DPBUSD(a41, w1, x4 + o);
    FED_DPBUSD(a50, w0, x5 + o); FED_DPBUSD(a51, w1, x5 + o);
    FED_DPBUSD(a60, w0, x6 + o); FED_DPBUSD(a61, w1, x6 + o);
    FED_DPBUSD(a70, w0, x7 + o); FED_DPBUSD(a71, w1, x7 + o);
  }
  const __m512i acc[8][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31},
                             {a40, a41}, {a50, a51}, {a60, a61}, {a70, a71}};
  for (int i = 0; i < 8; ++i) {
    const __m512i corr = _mm512_set1_epi32(x_sums128[i]);
    for (int v = 0; v < NV; ++v)
      _mm512_storeu_si512(out + i * 32 + 16 * v, _mm512_sub_epi32(acc[i][v], corr));
  }
}
#undef FED_DPBUSD
#endif
#endif

#if defined(FED_ISA_AVX512)
using XT = int16_t;  // AVX-512BW without VNNI: int16 pairs, vpmaddwd
constexpr int kMaxM = 4;
template <int MC>
void dot(const int16_t* x, int64_t xs, const int8_t* w, int64_t Kq, int32_t* out) {
  // A 32-byte half of a k-quad (8 columns x 4 k) widened to int16 and multiplied by
  // (x0, x1, x2, x3) in pairs gives each column's two partial sums in adjacent lanes.
  __m512i acc[MC][NV][2];
  for (int i = 0; i < MC; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v][0] = acc[i][v][1] = _mm512_setzero_si512();
  for (int64_t q = 0; q < Kq; ++q) {
    __m512i wv[NV][2];
    for (int v = 0; v < NV; ++v) {
      const int8_t* src = w + 64 * v + 128 * q;
      for (int h = 0; h < 2; ++h)
        wv[v][h] = _mm512_cvtepi8_epi16(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 32 * h)));
    }
    for (int i = 0; i < MC; ++i) {
      int64_t quad;
      std::memcpy(&quad, x + i * xs + 4 * q, 8);
      const __m512i xb = _mm512_set1_epi64(quad);
      for (int v = 0; v < NV; ++v)
        for (int h = 0; h < 2; ++h)
          acc[i][v][h] = _mm512_add_epi32(acc[i][v][h], _mm512_madd_epi16(xb, wv[v][h]));
    }
  }
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  for (int i = 0; i < MC; ++i)
    for (int v = 0; v < NV; ++v) {
      const __m512i lo = acc[i][v][0], hi = acc[i][v][1];
      _mm512_storeu_si512(out + i * 32 + 16 * v,
                          _mm512_add_epi32(_mm512_permutex2var_epi32(lo, even, hi),
                                           _mm512_permutex2var_epi32(lo, odd, hi)));
    }
}
#elif defined(FED_ISA_AVX2)
using XT = int16_t;
constexpr int kMaxM = 2;  // 16 ymm registers
template <int MC>
void dot(const int16_t* x, int64_t xs, const int8_t* w, int64_t Kq, int32_t* out) {
  // A 16-byte quarter of a k-quad (4 columns x 4 k) widened and multiplied in pairs:
  // two partial sums per column, adjacent.
  __m256i acc[MC][NV][4];
  for (int i = 0; i < MC; ++i)
    for (int v = 0; v < NV; ++v)
      for (int h = 0; h < 4; ++h) acc[i][v][h] = _mm256_setzero_si256();
  for (int64_t q = 0; q < Kq; ++q) {
    for (int v = 0; v < NV; ++v) {
      const int8_t* src = w + 64 * v + 128 * q;
      for (int h = 0; h < 4; ++h) {
        const __m256i wv =
            _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16 * h)));
        for (int i = 0; i < MC; ++i) {
          int64_t quad;
          std::memcpy(&quad, x + i * xs + 4 * q, 8);
          acc[i][v][h] = _mm256_add_epi32(acc[i][v][h],
                                          _mm256_madd_epi16(_mm256_set1_epi64x(quad), wv));
        }
      }
    }
  }
  for (int i = 0; i < MC; ++i)
    for (int v = 0; v < NV; ++v)
      for (int h = 0; h < 4; h += 2) {
        // hadd: [c0 c1 c4 c5 | c2 c3 c6 c7] -> columns in order
        const __m256i sums = _mm256_hadd_epi32(acc[i][v][h], acc[i][v][h + 1]);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i * 32 + 16 * v + 4 * h),
                            _mm256_permute4x64_epi64(sums, 0xD8));
      }
}
#elif defined(FED_ISA_NEON)
using XT = int8_t;
constexpr int kMaxM = 1;  // 16 of the 32 q registers hold one row's accumulators
template <int MC>
void dot(const int8_t* x, int64_t xs, const int8_t* w, int64_t Kq, int32_t* out) {
  // 8 bytes = 2 columns x 4 k, times (x0..x3, x0..x3): int16 products, pairwise into
  // int32 lanes [c0 k01, c0 k23, c1 k01, c1 k23].
  int32x4_t acc[MC][NV][8];
  for (int i = 0; i < MC; ++i)
    for (int v = 0; v < NV; ++v)
      for (int h = 0; h < 8; ++h) acc[i][v][h] = vdupq_n_s32(0);
  for (int64_t q = 0; q < Kq; ++q) {
    int8x8_t xb[MC];
    for (int i = 0; i < MC; ++i) {
      int32_t quad;
      std::memcpy(&quad, x + i * xs + 4 * q, 4);
      xb[i] = vreinterpret_s8_s32(vdup_n_s32(quad));
    }
    for (int v = 0; v < NV; ++v) {
      const int8_t* src = w + 64 * v + 128 * q;
      for (int h = 0; h < 8; ++h) {
        const int8x8_t wv = vld1_s8(src + 8 * h);
        for (int i = 0; i < MC; ++i) acc[i][v][h] = vpadalq_s16(acc[i][v][h], vmull_s8(wv, xb[i]));
      }
    }
  }
  for (int i = 0; i < MC; ++i)
    for (int v = 0; v < NV; ++v)
      for (int h = 0; h < 8; h += 2)  // [c0 c0 c1 c1] + [c2 c2 c3 c3] -> [c0 c1 c2 c3]
        vst1q_s32(out + i * 32 + 16 * v + 2 * h, vpaddq_s32(acc[i][v][h], acc[i][v][h + 1]));
}
#else
using XT = int16_t;
constexpr int kMaxM = 1;
template <int MC>
void dot(const int16_t* x, int64_t xs, const int8_t* w, int64_t Kq, int32_t* out) {
  for (int i = 0; i < MC; ++i)
    for (int v = 0; v < NV; ++v)
      for (int c = 0; c < 16; ++c) {
        int32_t sum = 0;
        const int8_t* col = w + 64 * v + 4 * c;
        for (int64_t q = 0; q < Kq; ++q)
          for (int r = 0; r < 4; ++r) sum += int32_t(x[i * xs + 4 * q + r]) * int32_t(col[128 * q + r]);
        out[i * 32 + 16 * v + c] = sum;
      }
}
#endif

// -- the driver -----------------------------------------------------------------------
// Quantised rows in the layout the kernels read, padded to whole k-quads (and 8 more
// entries: the int16 kernels read a quad as 8 bytes) with zeros: padded weights are 0
// too, so padding never counts (VNNI reads a padded weight as 0 + 128, times x = 0).
// x_sums128[m] = 128 * sum_k xq[m, k] (the VNNI kernel's offset correction).
template <typename X>
void prepare_rows(const float* x, int64_t M, int64_t K, int64_t xs, X* xq, float* s,
                  int32_t* x_sums128, int threads) {
  parallel_for_tid(M, M * K < (1 << 16) ? 1 : threads, [&](int64_t b, int64_t e, int) {
    for (int64_t m = b; m < e; ++m) {
      X* row = xq + m * xs;
      s[m] = quantize_row(x + m * K, K, row);
      std::fill(row + K, row + xs, X(0));
      int32_t sum = 0;
      for (int64_t k = 0; k < K; ++k) sum += row[k];
      x_sums128[m] = sum * 128;
    }
  });
}

// Run-time tile height (mc in [1, MaxM]) to the compiled kernels.
#if defined(FED_ISA_AVX512)
template <int MaxM, int MC = 1>
void dot_vnni_any(int mc, const int8_t* x, int64_t xs, const int8_t* w, int64_t Kq,
                  const int32_t* x_sums128, int32_t* out) {
  if constexpr (MC <= MaxM) {
    if (mc != MC) return dot_vnni_any<MaxM, MC + 1>(mc, x, xs, w, Kq, x_sums128, out);
    return dot_vnni<MC>(x, xs, w, Kq, x_sums128, out);
  }
}
#endif

template <int MaxM, int MC = 1>
void dot_any(int mc, const XT* x, int64_t xs, const int8_t* w, int64_t Kq, const int32_t*,
             int32_t* out) {
  if constexpr (MC <= MaxM) {
    if (mc != MC) return dot_any<MaxM, MC + 1>(mc, x, xs, w, Kq, nullptr, out);
    return dot<MC>(x, xs, w, Kq, out);
  }
}

template <typename X, int MaxM, typename Dot>
void run(const Int8LinearProblem& p, const Dot& dot_tile) {
  const int64_t M = p.rows, N = p.out_features, K = p.in_features;
  const int64_t Kq = (K + 3) / 4, xs = Kq * 4 + 8, panel_bytes = Kq * 128;
  std::vector<X> xq(static_cast<size_t>(M * xs));
  std::vector<float> s(static_cast<size_t>(M));
  std::vector<int32_t> x_sums128(static_cast<size_t>(M));
  prepare_rows(p.x, M, K, xs, xq.data(), s.data(), x_sums128.data(), p.num_threads);

  const int64_t panels = (N + 31) / 32;
  // Rows of x per pass over the weights: ~256 KiB of them stay in L2 while the
  // weight panels stream past (one pass when decoding).
  const int64_t m_block = std::max<int64_t>(MaxM, (256 << 10) / (xs * int64_t(sizeof(X))));
  // Below ~64 KiB of weights (x rows) a second thread costs more to wake than it saves.
  const int threads = N * K * std::min<int64_t>(M, 8) < (1 << 16) ? 1 : p.num_threads;
  parallel_for_tid(panels, threads, [&](int64_t u0, int64_t u1, int) {
    int32_t tile[MaxM * 32];
    for (int64_t mb = 0; mb < M; mb += m_block) {
      const int64_t me = std::min(M, mb + m_block);
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t n0 = 32 * u;
        const int64_t cols = std::min<int64_t>(32, N - n0);
        const int8_t* w = p.weight + u * panel_bytes;
        for (int64_t m0 = mb; m0 < me; m0 += MaxM) {
          const int mc = static_cast<int>(std::min<int64_t>(MaxM, me - m0));
          dot_tile(mc, xq.data() + m0 * xs, xs, w, Kq, x_sums128.data() + m0, tile);
          for (int i = 0; i < mc; ++i)
            epilogue(tile + i * 32, cols, s[m0 + i], p.weight_scale + n0,
                     p.bias ? p.bias + n0 : nullptr, p.gelu, p.out + (m0 + i) * N + n0);
        }
      }
    }
  });
}

}  // namespace

void int8_linear(const Int8LinearProblem& p) {
  if (p.rows <= 0 || p.out_features <= 0) return;
#if defined(FED_ISA_AVX512)
  constexpr int kMaxMVnni = 8;  // 8 x 2 accumulators + 2 weights + 1 broadcast
  if (use_vnni()) return run<int8_t, kMaxMVnni>(p, dot_vnni_any<kMaxMVnni>);
#endif
  run<XT, kMaxM>(p, dot_any<kMaxM>);
}

}  // namespace fastencdec::cpu::FED_ISA_NS
