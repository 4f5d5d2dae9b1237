// Aligned scratch memory for kernels. Kernels allocate all per-thread scratch
// before entering a parallel region (an exception must never escape OpenMP) and
// carve it with Carver. Lives in the per-ISA namespace (see vec.h for why).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>

namespace fastencdec::cpu::FED_ISA_NS {

constexpr size_t kAlign = 64;

inline size_t align_up(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(size_t bytes) { reset(bytes); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { std::free(data_); }
  void reset(size_t bytes) {
    std::free(data_);
    data_ = nullptr;
    if (bytes == 0) return;
    data_ = static_cast<unsigned char*>(std::aligned_alloc(kAlign, align_up(bytes)));
    if (data_ == nullptr) throw std::bad_alloc();
  }
  unsigned char* data() const { return data_; }

 private:
  unsigned char* data_ = nullptr;
};

// Hands out consecutive 64-byte-aligned arrays from one block. With a null base
// it only measures (bytes()), so sizing and carving share one description.
class Carver {
 public:
  explicit Carver(unsigned char* base = nullptr) : base_(base) {}
  template <typename T>
  T* take(int64_t count) {
    T* p = base_ ? reinterpret_cast<T*>(base_ + used_) : nullptr;
    used_ += align_up(static_cast<size_t>(count) * sizeof(T));
    return p;
  }
  size_t bytes() const { return used_; }

 private:
  unsigned char* base_;
  size_t used_ = 0;
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

}  // namespace fastencdec::cpu::FED_ISA_NS
