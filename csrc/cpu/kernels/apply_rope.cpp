// RoPE (rotate-half) applied to fp32 [rows, heads, head_dim], one kernel source
// compiled per ISA. cos/sin are computed once per row (token) in double and
// shared by its heads; rows are split across threads.
#include <cmath>

#include "../buffer.h"
#include "../kernels.h"
#include "../parallel.h"
#include "../vec.h"

namespace fastencdec::cpu::FED_ISA_NS {

void apply_rope(const float* x, float* out, const int64_t* positions, const double* inv_freq,
                int64_t rows, int64_t heads, int64_t head_dim, int num_threads) {
  const int64_t half = head_dim / 2;
  // Per-thread cos/sin rows, allocated before the parallel region (no std::vector
  // here: its instantiations would be shared with other ISAs' objects).
  const int threads = used_threads(rows, num_threads);
  Buffer buffer(sizeof(float) * 2 * half * threads);
  parallel_for_tid(rows, threads, [&](int64_t begin, int64_t end, int tid) {
    float* cos_v = reinterpret_cast<float*>(buffer.data()) + 2 * half * tid;
    float* sin_v = cos_v + half;
    for (int64_t r = begin; r < end; ++r) {
      const double pos = static_cast<double>(positions[r]);
      for (int64_t i = 0; i < half; ++i) {
        const double angle = pos * inv_freq[i];
        cos_v[i] = static_cast<float>(std::cos(angle));
        sin_v[i] = static_cast<float>(std::sin(angle));
      }
      for (int64_t h = 0; h < heads; ++h) {
        const float* xr = x + (r * heads + h) * head_dim;
        float* orow = out + (r * heads + h) * head_dim;
        int64_t i = 0;
        for (; i + VecF::kWidth <= half; i += VecF::kWidth) {
          const VecF x1 = VecF::load(xr + i), x2 = VecF::load(xr + half + i);
          const VecF c = VecF::load(cos_v + i), s = VecF::load(sin_v + i);
          const VecF o1 = VecF::fnmadd(x2, s, x1 * c);  // x1*c - x2*s
          const VecF o2 = VecF::fmadd(x1, s, x2 * c);   // x2*c + x1*s
          o1.store(orow + i);
          o2.store(orow + half + i);
        }
        for (; i < half; ++i) {
          const float x1 = xr[i], x2 = xr[half + i];
          orow[i] = x1 * cos_v[i] - x2 * sin_v[i];
          orow[half + i] = x2 * cos_v[i] + x1 * sin_v[i];
        }
      }
    }
  });
}

}  // namespace fastencdec::cpu::FED_ISA_NS
