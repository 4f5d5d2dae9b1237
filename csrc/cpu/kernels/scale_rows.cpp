// Row preparation and epilogue of the int8 linear layer (fastencdec.models.quantize.Int8Linear):
// fbgemm's dynamic int8 linear quantises its input per tensor, so every row is first
// scaled to max |x| = 1 and one anchor row spanning [-1, 1] is appended: each row then
// lands on the same fixed grid whatever the other rows hold.
//   r[m] = max_k |x[m, k]|;  xs[m, :] = x[m, :] / r[m]  (0 when r is 0, NaN or Inf)
//   xs[M, :] = [-1, 1, 0, ...]   (needs K >= 2; the caller handles K == 1)
// Two passes over a row instead of the five of the eager expression, no temporaries.
#include <cmath>
#include <limits>

#include "../kernels.h"
#include "../parallel.h"
#include "../vec.h"

namespace fastencdec::cpu::FED_ISA_NS {

void scale_rows(const ScaleRowsProblem& p) {
  constexpr int W = VecF::kWidth;
  const int64_t M = p.rows, K = p.dim;
  parallel_for_tid(M, p.num_threads, [&](int64_t begin, int64_t end, int) {
    for (int64_t m = begin; m < end; ++m) {
      const float* x = p.x + m * K;
      float* xs = p.xs + m * K;
      // max() may drop NaN lanes: x * 0 (NaN for NaN and Inf) finds non-finite values
      const VecF zero = VecF::zero();
      VecF vmax = zero, probe = zero;
      int64_t k = 0;
      for (; k + W <= K; k += W) {
        const VecF v = VecF::load(x + k);
        vmax = VecF::max(vmax, VecF::max(v, zero - v));
        probe = VecF::fmadd(v, zero, probe);
      }
      float r = vmax.reduce_max(), probe_sum = probe.reduce_add();
      for (; k < K; ++k) {
        r = std::fmax(r, std::fabs(x[k]));
        probe_sum += x[k] * 0.0f;
      }
      if (probe_sum != 0.0f) r = std::numeric_limits<float>::quiet_NaN();
      p.r[m] = r;
      if (!(r > 0.0f) || !std::isfinite(r)) {
        for (k = 0; k < K; ++k) xs[k] = 0.0f;
        continue;
      }
      const VecF inv = VecF::set1(1.0f / r);
      k = 0;
      for (; k + W <= K; k += W) (VecF::load(x + k) * inv).store(xs + k);
      for (; k < K; ++k) xs[k] = x[k] / r;
    }
  });
  float* anchor = p.xs + M * K;
  for (int64_t k = 0; k < K; ++k) anchor[k] = 0.0f;
  anchor[0] = -1.0f;
  if (K > 1) anchor[1] = 1.0f;
}

namespace {

// GELU with the tanh approximation, as torch's gelu(approximate="tanh"):
//   0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))),  tanh(u) = 1 - 2 / (exp(2u) + 1)
// (exp2 saturates, so large |u| give exactly +-1; NaN stays NaN).
inline VecF gelu_tanh(VecF x) {
  const VecF u = VecF::set1(0.7978845608028654f) *
                 VecF::fmadd(VecF::set1(0.044715f) * x, x * x, x);
  const VecF e = VecF::exp2(u * VecF::set1(2.0f * 1.4426950408889634f));
  const VecF t = VecF::set1(1.0f) - VecF::set1(2.0f) / (e + VecF::set1(1.0f));
  return VecF::set1(0.5f) * x * (VecF::set1(1.0f) + t);
}

inline float gelu_tanh(float x) {
  const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
  return 0.5f * x * (1.0f + std::tanh(u));
}

}  // namespace

void rescale_rows(const RescaleRowsProblem& p) {
  constexpr int W = VecF::kWidth;
  const int64_t M = p.rows, N = p.dim;
  const int threads = M * N < 32768 ? 1 : p.num_threads;  // small: no fork/join
  parallel_for_tid(M, threads, [&](int64_t begin, int64_t end, int) {
    for (int64_t m = begin; m < end; ++m) {
      float* y = p.y + m * N;
      const VecF r = VecF::set1(p.r[m]);
      int64_t n = 0;
      for (; n + W <= N; n += W) {
        VecF v = VecF::load(y + n) * r;
        if (p.bias) v = v + VecF::load(p.bias + n);
        if (p.gelu) v = gelu_tanh(v);
        v.store(y + n);
      }
      for (; n < N; ++n) {
        float v = y[n] * p.r[m];
        if (p.bias) v += p.bias[n];
        y[n] = p.gelu ? gelu_tanh(v) : v;
      }
    }
  });
}

}  // namespace fastencdec::cpu::FED_ISA_NS
