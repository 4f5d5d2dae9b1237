// A minimal float SIMD vector for kernel sources that are compiled once per ISA.
//
// Exactly one of FED_ISA_AVX512 / FED_ISA_AVX2 / FED_ISA_NEON (or none: scalar) is
// defined for a translation unit, together with FED_ISA_NS, the namespace its
// kernels live in. Kernels are written once against VecF and compiled per ISA;
// isa.cpp picks the namespace to call at run time.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(FED_ISA_AVX512) || defined(FED_ISA_AVX2)
#include <immintrin.h>
#elif defined(FED_ISA_NEON)
#include <arm_neon.h>
#endif

namespace fastencdec::cpu::FED_ISA_NS {

#if defined(FED_ISA_AVX512)
struct VecF {
  static constexpr int kWidth = 16;
  __m512 v;
  VecF() = default;
  explicit VecF(__m512 x) : v(x) {}
  static VecF zero() { return VecF(_mm512_setzero_ps()); }
  static VecF set1(float x) { return VecF(_mm512_set1_ps(x)); }
  static VecF load(const float* p) { return VecF(_mm512_loadu_ps(p)); }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  friend VecF operator+(VecF a, VecF b) { return VecF(_mm512_add_ps(a.v, b.v)); }
  friend VecF operator-(VecF a, VecF b) { return VecF(_mm512_sub_ps(a.v, b.v)); }
  friend VecF operator*(VecF a, VecF b) { return VecF(_mm512_mul_ps(a.v, b.v)); }
  static VecF fmadd(VecF a, VecF b, VecF c) { return VecF(_mm512_fmadd_ps(a.v, b.v, c.v)); }
  static VecF fnmadd(VecF a, VecF b, VecF c) { return VecF(_mm512_fnmadd_ps(a.v, b.v, c.v)); }
  static VecF max(VecF a, VecF b) { return VecF(_mm512_max_ps(a.v, b.v)); }
  float reduce_add() const { return _mm512_reduce_add_ps(v); }
  float reduce_max() const { return _mm512_reduce_max_ps(v); }
};
#elif defined(FED_ISA_AVX2)
struct VecF {
  static constexpr int kWidth = 8;
  __m256 v;
  VecF() = default;
  explicit VecF(__m256 x) : v(x) {}
  static VecF zero() { return VecF(_mm256_setzero_ps()); }
  static VecF set1(float x) { return VecF(_mm256_set1_ps(x)); }
  static VecF load(const float* p) { return VecF(_mm256_loadu_ps(p)); }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  friend VecF operator+(VecF a, VecF b) { return VecF(_mm256_add_ps(a.v, b.v)); }
  friend VecF operator-(VecF a, VecF b) { return VecF(_mm256_sub_ps(a.v, b.v)); }
  friend VecF operator*(VecF a, VecF b) { return VecF(_mm256_mul_ps(a.v, b.v)); }
  static VecF fmadd(VecF a, VecF b, VecF c) { return VecF(_mm256_fmadd_ps(a.v, b.v, c.v)); }
  static VecF fnmadd(VecF a, VecF b, VecF c) { return VecF(_mm256_fnmadd_ps(a.v, b.v, c.v)); }
  static VecF max(VecF a, VecF b) { return VecF(_mm256_max_ps(a.v, b.v)); }
  float reduce_add() const {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  float reduce_max() const {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};
#elif defined(FED_ISA_NEON)
struct VecF {
  static constexpr int kWidth = 4;
  float32x4_t v;
  VecF() = default;
  explicit VecF(float32x4_t x) : v(x) {}
  static VecF zero() { return VecF(vdupq_n_f32(0.f)); }
  static VecF set1(float x) { return VecF(vdupq_n_f32(x)); }
  static VecF load(const float* p) { return VecF(vld1q_f32(p)); }
  void store(float* p) const { vst1q_f32(p, v); }
  friend VecF operator+(VecF a, VecF b) { return VecF(vaddq_f32(a.v, b.v)); }
  friend VecF operator-(VecF a, VecF b) { return VecF(vsubq_f32(a.v, b.v)); }
  friend VecF operator*(VecF a, VecF b) { return VecF(vmulq_f32(a.v, b.v)); }
  static VecF fmadd(VecF a, VecF b, VecF c) { return VecF(vfmaq_f32(c.v, a.v, b.v)); }
  static VecF fnmadd(VecF a, VecF b, VecF c) { return VecF(vfmsq_f32(c.v, a.v, b.v)); }
  static VecF max(VecF a, VecF b) { return VecF(vmaxq_f32(a.v, b.v)); }
  float reduce_add() const { return vaddvq_f32(v); }
  float reduce_max() const { return vmaxvq_f32(v); }
};
#else
struct VecF {
  static constexpr int kWidth = 1;
  float v;
  VecF() = default;
  explicit VecF(float x) : v(x) {}
  static VecF zero() { return VecF(0.f); }
  static VecF set1(float x) { return VecF(x); }
  static VecF load(const float* p) { return VecF(*p); }
  void store(float* p) const { *p = v; }
  friend VecF operator+(VecF a, VecF b) { return VecF(a.v + b.v); }
  friend VecF operator-(VecF a, VecF b) { return VecF(a.v - b.v); }
  friend VecF operator*(VecF a, VecF b) { return VecF(a.v * b.v); }
  static VecF fmadd(VecF a, VecF b, VecF c) { return VecF(std::fma(a.v, b.v, c.v)); }
  static VecF fnmadd(VecF a, VecF b, VecF c) { return VecF(std::fma(-a.v, b.v, c.v)); }
  static VecF max(VecF a, VecF b) { return VecF(a.v > b.v ? a.v : b.v); }
  float reduce_add() const { return v; }
  float reduce_max() const { return v; }
};
#endif

}  // namespace fastencdec::cpu::FED_ISA_NS
