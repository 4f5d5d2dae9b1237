// A minimal float SIMD vector for kernel sources that are compiled once per ISA.
//
// Exactly one of FED_ISA_AVX512 / FED_ISA_AVX2 / FED_ISA_NEON (or none: scalar) is
// defined for a translation unit, together with FED_ISA_NS, the namespace its
// kernels live in. Kernels are written once against VecF and compiled per ISA;
// isa.cpp picks the namespace to call at run time.
//
// Besides arithmetic, VecF offers what the attention kernels need: exp2 (a
// polynomial within ~2 ulp; 0 for x < -126, so never a denormal; NaN in -> NaN
// out), per-lane selects, and hsum4 (four horizontal sums at once, cheaper than
// four reduce_add calls).
//
// Everything here lives in the per-ISA namespace on purpose: an inline function
// outside it, compiled with different -m flags in different objects, could be
// merged by the linker into one copy holding instructions the CPU lacks.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

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
  friend VecF operator/(VecF a, VecF b) { return VecF(_mm512_div_ps(a.v, b.v)); }
  static VecF fmadd(VecF a, VecF b, VecF c) { return VecF(_mm512_fmadd_ps(a.v, b.v, c.v)); }
  static VecF fnmadd(VecF a, VecF b, VecF c) { return VecF(_mm512_fnmadd_ps(a.v, b.v, c.v)); }
  static VecF max(VecF a, VecF b) { return VecF(_mm512_max_ps(a.v, b.v)); }
  float reduce_add() const { return _mm512_reduce_add_ps(v); }
  float reduce_max() const { return _mm512_reduce_max_ps(v); }
  // (a <= b) ? x : y and (a == b) ? x : y per lane (ordered compares: NaN gives y).
  static VecF if_le(VecF a, VecF b, VecF x, VecF y) {
    return VecF(_mm512_mask_blend_ps(_mm512_cmp_ps_mask(a.v, b.v, _CMP_LE_OQ), y.v, x.v));
  }
  static VecF if_eq(VecF a, VecF b, VecF x, VecF y) {
    return VecF(_mm512_mask_blend_ps(_mm512_cmp_ps_mask(a.v, b.v, _CMP_EQ_OQ), y.v, x.v));
  }
  static VecF exp2(VecF x) {
    // max/min return their second operand when either is NaN: a NaN x survives.
    __m512 t = _mm512_max_ps(_mm512_set1_ps(-127.f), x.v);
    t = _mm512_min_ps(_mm512_set1_ps(127.f), t);
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const VecF p = exp2_poly(VecF(_mm512_sub_ps(t, n)));
    const __m512i e =
        _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    const __m512 r = _mm512_mul_ps(p.v, _mm512_castsi512_ps(e));
    // Flush x < -126 to 0: no denormal results (slow microcode assists on some CPUs).
    return VecF(_mm512_mask_blend_ps(_mm512_cmp_ps_mask(x.v, _mm512_set1_ps(-126.f), _CMP_LT_OQ),
                                     r, _mm512_setzero_ps()));
  }
  static void hsum4(VecF a, VecF b, VecF c, VecF d, float* out) {
    auto half = [](__m512 x) {
      return _mm256_add_ps(_mm512_castps512_ps256(x), _mm512_extractf32x8_ps(x, 1));
    };
    const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(half(a.v), half(b.v)),
                                       _mm256_hadd_ps(half(c.v), half(d.v)));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1)));
  }
  static inline VecF exp2_poly(VecF f);
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
  friend VecF operator/(VecF a, VecF b) { return VecF(_mm256_div_ps(a.v, b.v)); }
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
  static VecF if_le(VecF a, VecF b, VecF x, VecF y) {
    return VecF(_mm256_blendv_ps(y.v, x.v, _mm256_cmp_ps(a.v, b.v, _CMP_LE_OQ)));
  }
  static VecF if_eq(VecF a, VecF b, VecF x, VecF y) {
    return VecF(_mm256_blendv_ps(y.v, x.v, _mm256_cmp_ps(a.v, b.v, _CMP_EQ_OQ)));
  }
  static VecF exp2(VecF x) {
    __m256 t = _mm256_max_ps(_mm256_set1_ps(-127.f), x.v);  // a NaN x survives
    t = _mm256_min_ps(_mm256_set1_ps(127.f), t);
    const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const VecF p = exp2_poly(VecF(_mm256_sub_ps(t, n)));
    const __m256i e =
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    const __m256 r = _mm256_mul_ps(p.v, _mm256_castsi256_ps(e));
    return VecF(_mm256_andnot_ps(_mm256_cmp_ps(x.v, _mm256_set1_ps(-126.f), _CMP_LT_OQ), r));
  }
  static void hsum4(VecF a, VecF b, VecF c, VecF d, float* out) {
    const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a.v, b.v), _mm256_hadd_ps(c.v, d.v));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1)));
  }
  static inline VecF exp2_poly(VecF f);
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
  friend VecF operator/(VecF a, VecF b) { return VecF(vdivq_f32(a.v, b.v)); }
  static VecF fmadd(VecF a, VecF b, VecF c) { return VecF(vfmaq_f32(c.v, a.v, b.v)); }
  static VecF fnmadd(VecF a, VecF b, VecF c) { return VecF(vfmsq_f32(c.v, a.v, b.v)); }
  static VecF max(VecF a, VecF b) { return VecF(vmaxq_f32(a.v, b.v)); }
  float reduce_add() const { return vaddvq_f32(v); }
  float reduce_max() const { return vmaxvq_f32(v); }
  static VecF if_le(VecF a, VecF b, VecF x, VecF y) {
    return VecF(vbslq_f32(vcleq_f32(a.v, b.v), x.v, y.v));
  }
  static VecF if_eq(VecF a, VecF b, VecF x, VecF y) {
    return VecF(vbslq_f32(vceqq_f32(a.v, b.v), x.v, y.v));
  }
  static VecF exp2(VecF x) {
    float32x4_t t = vmaxq_f32(x.v, vdupq_n_f32(-127.f));  // NEON max/min propagate NaN
    t = vminq_f32(t, vdupq_n_f32(127.f));
    const float32x4_t n = vrndnq_f32(t);
    const VecF p = exp2_poly(VecF(vsubq_f32(t, n)));
    const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
    const float32x4_t r = vmulq_f32(p.v, vreinterpretq_f32_s32(e));
    return VecF(vbslq_f32(vcltq_f32(x.v, vdupq_n_f32(-126.f)), vdupq_n_f32(0.f), r));
  }
  static void hsum4(VecF a, VecF b, VecF c, VecF d, float* out) {
    vst1q_f32(out, vpaddq_f32(vpaddq_f32(a.v, b.v), vpaddq_f32(c.v, d.v)));
  }
  static inline VecF exp2_poly(VecF f);
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
  friend VecF operator/(VecF a, VecF b) { return VecF(a.v / b.v); }
  // Plain mul + add: without hardware FMA, std::fma is a slow library call.
  static VecF fmadd(VecF a, VecF b, VecF c) { return VecF(a.v * b.v + c.v); }
  static VecF fnmadd(VecF a, VecF b, VecF c) { return VecF(c.v - a.v * b.v); }
  static VecF max(VecF a, VecF b) { return VecF(a.v > b.v ? a.v : b.v); }
  float reduce_add() const { return v; }
  float reduce_max() const { return v; }
  static VecF if_le(VecF a, VecF b, VecF x, VecF y) { return a.v <= b.v ? x : y; }
  static VecF if_eq(VecF a, VecF b, VecF x, VecF y) { return a.v == b.v ? x : y; }
  static VecF exp2(VecF x) {
    float t = x.v;
    if (t != t) return x;             // NaN
    if (t < -126.f) return VecF(0.f);  // no denormal results
    t = t > 127.f ? 127.f : t;
    const float n = std::nearbyint(t);
    const VecF p = exp2_poly(VecF(t - n));
    const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return VecF(p.v * scale);
  }
  static void hsum4(VecF a, VecF b, VecF c, VecF d, float* out) {
    out[0] = a.v;
    out[1] = b.v;
    out[2] = c.v;
    out[3] = d.v;
  }
  static inline VecF exp2_poly(VecF f);
};
#endif

// 2^f for f in [-0.5, 0.5] (Cephes exp2f minimax polynomial, relative error < 2e-7).
inline VecF VecF::exp2_poly(VecF f) {
  VecF p = VecF::set1(1.535336188319500e-4f);
  p = VecF::fmadd(p, f, VecF::set1(1.339887440266574e-3f));
  p = VecF::fmadd(p, f, VecF::set1(9.618437357674640e-3f));
  p = VecF::fmadd(p, f, VecF::set1(5.550332471162809e-2f));
  p = VecF::fmadd(p, f, VecF::set1(2.402264791363012e-1f));
  p = VecF::fmadd(p, f, VecF::set1(6.931472028550421e-1f));
  return VecF::fmadd(p, f, VecF::set1(1.f));
}

}  // namespace fastencdec::cpu::FED_ISA_NS
