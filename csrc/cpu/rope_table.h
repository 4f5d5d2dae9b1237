// cos/sin tables for rotate-half RoPE, and rotating an fp32 row with them.
//
// Angles are pos * inv_freq in double like the reference. Calling sin/cos for
// every (token, frequency) costs more than a short attention, so for long inputs
// a position p = 16 * hi + lo is split and cos/sin come from the angle-addition
// formula over two small tables (double precision, error ~1e-16, far below fp32
// rounding): sin/cos are evaluated per distinct hi (once per 16 consecutive
// positions) and for lo in [0, 16) only.
#pragma once

#include <cmath>
#include <cstdint>

#include "parallel.h"
#include "vec.h"

namespace fastencdec::cpu::FED_ISA_NS {

// cos_out/sin_out: [n, half] fp32 for positions pos[n]; lo_scratch: 2 * 16 * half
// doubles per thread, hi_scratch: 2 * half doubles per thread.
inline void rope_table(const int64_t* pos, int64_t n, const double* inv_freq, int64_t half,
                       float* cos_out, float* sin_out, double* scratch, int num_threads) {
  constexpr int64_t kLo = 16;
  const int64_t per_thread = 2 * kLo * half + 2 * half;
  parallel_for_tid(n, num_threads, [&](int64_t begin, int64_t end, int tid) {
    double* lo_cos = scratch + tid * per_thread;
    double* lo_sin = lo_cos + kLo * half;
    double* hi_cos = lo_sin + kLo * half;
    double* hi_sin = hi_cos + half;
    const bool split = end - begin >= 2 * kLo;  // else direct sin/cos is cheaper
    if (split) {
      for (int64_t lo = 0; lo < kLo; ++lo)
        for (int64_t i = 0; i < half; ++i) {
          const double a = static_cast<double>(lo) * inv_freq[i];
          lo_cos[lo * half + i] = std::cos(a);
          lo_sin[lo * half + i] = std::sin(a);
        }
    }
    int64_t cached_hi = INT64_MIN;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t p = pos[r];
      float* c = cos_out + r * half;
      float* s = sin_out + r * half;
      if (!split) {
        for (int64_t i = 0; i < half; ++i) {
          const double a = static_cast<double>(p) * inv_freq[i];
          c[i] = static_cast<float>(std::cos(a));
          s[i] = static_cast<float>(std::sin(a));
        }
        continue;
      }
      const int64_t hi = p >> 4, lo = p & (kLo - 1);  // p = 16 * hi + lo, lo >= 0
      if (hi != cached_hi) {
        for (int64_t i = 0; i < half; ++i) {
          const double a = static_cast<double>(hi * kLo) * inv_freq[i];
          hi_cos[i] = std::cos(a);
          hi_sin[i] = std::sin(a);
        }
        cached_hi = hi;
      }
      const double* lc = lo_cos + lo * half;
      const double* ls = lo_sin + lo * half;
      for (int64_t i = 0; i < half; ++i) {
        c[i] = static_cast<float>(hi_cos[i] * lc[i] - hi_sin[i] * ls[i]);
        s[i] = static_cast<float>(hi_sin[i] * lc[i] + hi_cos[i] * ls[i]);
      }
    }
  });
}

inline int64_t rope_table_scratch_doubles(int64_t half, int num_threads) {
  return static_cast<int64_t>(num_threads) * (2 * 16 * half + 2 * half);
}

// Rotate-half RoPE of one fp32 row x[0, 2 * half) in place.
inline void rope_row(float* x, const float* c, const float* s, int64_t half) {
  constexpr int W = VecF::kWidth;
  int64_t i = 0;
  for (; i + W <= half; i += W) {
    const VecF x1 = VecF::load(x + i), x2 = VecF::load(x + half + i);
    const VecF cv = VecF::load(c + i), sv = VecF::load(s + i);
    VecF::fnmadd(x2, sv, x1 * cv).store(x + i);        // x1*c - x2*s
    VecF::fmadd(x1, sv, x2 * cv).store(x + half + i);  // x2*c + x1*s
  }
  for (; i < half; ++i) {
    const float x1 = x[i], x2 = x[half + i];
    x[i] = x1 * c[i] - x2 * s[i];
    x[half + i] = x2 * c[i] + x1 * s[i];
  }
}

}  // namespace fastencdec::cpu::FED_ISA_NS
