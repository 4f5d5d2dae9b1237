// Thread-parallel loops over [0, n) (OpenMP when built with it, serial otherwise).
//   parallel_for_tid(n, threads, body(begin, end, tid))   contiguous chunks, one per thread
//   parallel_for_dynamic(n, threads, body(i, tid))        items handed out one at a time
// tid is always < max(1, min(threads, n)), so callers can size per-thread scratch
// with used_threads(). Bodies must not throw (allocate before the loop).
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace fastencdec::cpu {

inline int used_threads(int64_t n, int num_threads) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, n)));
}

template <typename F>
inline void parallel_for_tid(int64_t n, int num_threads, const F& body) {
  if (n <= 0) return;
  const int threads = used_threads(n, num_threads);
#if defined(_OPENMP)
  if (threads > 1) {
#pragma omp parallel num_threads(threads)
    {
      const int t = omp_get_thread_num();
      const int nt = omp_get_num_threads();
      const int64_t chunk = (n + nt - 1) / nt;
      const int64_t begin = std::min<int64_t>(n, t * chunk);
      const int64_t end = std::min<int64_t>(n, begin + chunk);
      if (begin < end) body(begin, end, t);
    }
    return;
  }
#endif
  body(0, n, 0);
}

// For items of uneven cost (causal blocks, per-row cache lengths): list the
// expensive ones first and let idle threads take the next.
template <typename F>
inline void parallel_for_dynamic(int64_t n, int num_threads, const F& body) {
  if (n <= 0) return;
  const int threads = used_threads(n, num_threads);
#if defined(_OPENMP)
  if (threads > 1) {
#pragma omp parallel num_threads(threads)
    {
      const int t = omp_get_thread_num();
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = 0; i < n; ++i) body(i, t);
    }
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) body(i, 0);
}

inline bool openmp_enabled() {
#if defined(_OPENMP)
  return true;
#else
  return false;
#endif
}

}  // namespace fastencdec::cpu
