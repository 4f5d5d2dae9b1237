// parallel_for over [0, n) in contiguous chunks, one per thread (OpenMP when
// built with it, serial otherwise). The callable gets (begin, end).
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace fastencdec::cpu {

template <typename F>
inline void parallel_for(int64_t n, int num_threads, const F& body) {
  if (n <= 0) return;
  int threads = std::max(1, std::min<int>(num_threads, static_cast<int>(std::min<int64_t>(n, 1 << 20))));
#if defined(_OPENMP)
  if (threads > 1) {
#pragma omp parallel num_threads(threads)
    {
      const int t = omp_get_thread_num();
      const int nt = omp_get_num_threads();
      const int64_t chunk = (n + nt - 1) / nt;
      const int64_t begin = std::min<int64_t>(n, t * chunk);
      const int64_t end = std::min<int64_t>(n, begin + chunk);
      if (begin < end) body(begin, end);
    }
    return;
  }
#endif
  body(0, n);
}

inline bool openmp_enabled() {
#if defined(_OPENMP)
  return true;
#else
  return false;
#endif
}

}  // namespace fastencdec::cpu
