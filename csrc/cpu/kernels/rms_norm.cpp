// RMSNorm over the last dimension, in fp32 registers:
//   out[r, :] = x[r, :] * (1 / sqrt(mean(x[r, :]^2) + eps)) * weight
// x and out share a storage dtype (fp32, bf16 or fp16; out rounded once), weight is
// fp32. One pass to sum the squares, one to scale: two reads of the row instead of
// the five passes (and three temporaries) of the eager torch expression. Rows are
// split across threads.
#include <cmath>

#include "../kernels.h"
#include "../parallel.h"
#include "../storage.h"

namespace fastencdec::cpu::FED_ISA_NS {

namespace {

template <class S>
void run(const RmsNormProblem& p) {
  using T = typename S::T;
  constexpr int W = VecF::kWidth;
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  const float* w = p.weight;
  const int64_t D = p.dim;
  parallel_for_tid(p.rows, p.num_threads, [&](int64_t begin, int64_t end, int) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * D;
      T* orow = out + r * D;
      VecF acc = VecF::zero();
      int64_t i = 0;
      for (; i + W <= D; i += W) {
        const VecF v = S::load(xr + i);
        acc = VecF::fmadd(v, v, acc);
      }
      float sum = acc.reduce_add();
      for (; i < D; ++i) {
        const float v = S::to_float(xr[i]);
        sum += v * v;
      }
      const float inv = 1.0f / std::sqrt(sum / static_cast<float>(D) + p.eps);
      const VecF s = VecF::set1(inv);
      i = 0;
      for (; i + W <= D; i += W) S::store(orow + i, (S::load(xr + i) * s) * VecF::load(w + i));
      for (; i < D; ++i) orow[i] = S::from_float((S::to_float(xr[i]) * inv) * w[i]);
    }
  });
}

}  // namespace

void rms_norm(const RmsNormProblem& p) {
  if (p.rows == 0 || p.dim == 0) return;
  switch (p.storage) {
    case Storage::kBF16: return run<StoreBF16>(p);
    case Storage::kF16: return run<StoreF16>(p);
    default: return run<StoreF32>(p);
  }
}

}  // namespace fastencdec::cpu::FED_ISA_NS
