// Storage dtypes of kernel inputs/outputs (fp32, bf16, fp16) and their conversion
// to/from fp32 registers. bf16/fp16 arrive as raw uint16 bits and are widened in
// registers (never through a converted copy in memory); fp32 -> bf16/fp16 rounds
// to nearest even like torch's .to(). Compiled per ISA (see vec.h), so the x86
// paths use F16C/AVX-512 conversions and the scalar path bit manipulation.
#pragma once

#include <cstdint>
#include <cstring>

#include "vec.h"

namespace fastencdec::cpu::FED_ISA_NS {

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

inline uint16_t float_to_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

inline float f16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24
    const float f = static_cast<float>(mant) * 5.9604644775390625e-8f;
    return sign ? -f : f;
  }
  if (exp == 31) return bits_to_float(sign | 0x7F800000u | (mant << 13));  // inf / NaN
  return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

// Round-to-nearest-even fp32 -> fp16 (after F. Giesen's float_to_half_fast3_rtne).
inline uint16_t float_to_f16(float f) {
  uint32_t u = float_to_bits(f);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint32_t o;
  if (u >= (143u << 23)) {  // >= 2^16: inf, or NaN (kept quiet)
    o = u > 0x7F800000u ? 0x7E00u : 0x7C00u;
  } else if (u < (113u << 23)) {  // fp16 subnormal or zero: let the FPU round
    const float magic = bits_to_float(126u << 23);
    o = float_to_bits(bits_to_float(u) + magic) - (126u << 23);
  } else {
    const uint32_t mant_odd = (u >> 13) & 1u;
    u += (static_cast<uint32_t>(15 - 127) << 23) + 0xFFFu + mant_odd;
    o = u >> 13;  // a carry into the exponent rounds up to inf correctly
  }
  return static_cast<uint16_t>(o | (sign >> 16));
}

// Storage policies: T is the element type in memory; load/store move one VecF.
struct StoreF32 {
  using T = float;
  static constexpr bool kRounds = false;  // storing in T loses nothing
  static VecF load(const float* p) { return VecF::load(p); }
  static void store(float* p, VecF v) { v.store(p); }
  static float to_float(float x) { return x; }
  static float from_float(float x) { return x; }
  static VecF round(VecF v) { return v; }
};

struct StoreBF16 {
  using T = uint16_t;
  static constexpr bool kRounds = true;
  static float to_float(uint16_t x) { return bf16_to_float(x); }
  static uint16_t from_float(float x) { return float_to_bf16(x); }
#if defined(FED_ISA_AVX512)
  static VecF load(const uint16_t* p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return VecF(_mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
  }
  static __m512i rounded_bits(VecF v) {  // bf16 in the high half of each lane
    const __m512i x = _mm512_castps_si512(v.v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(_mm512_add_epi32(x, _mm512_set1_epi32(0x7FFF)), lsb);
    r = _mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
    const __mmask16 nan = _mm512_cmp_ps_mask(v.v, v.v, _CMP_UNORD_Q);
    return _mm512_mask_blend_epi32(nan, r, _mm512_or_si512(x, _mm512_set1_epi32(0x400000)));
  }
  static void store(uint16_t* p, VecF v) {
    const __m512i r = _mm512_srli_epi32(rounded_bits(v), 16);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
  static VecF round(VecF v) { return VecF(_mm512_castsi512_ps(rounded_bits(v))); }
#elif defined(FED_ISA_AVX2)
  static VecF load(const uint16_t* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return VecF(_mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
  }
  static __m256i rounded_bits(VecF v) {
    const __m256i x = _mm256_castps_si256(v.v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(_mm256_add_epi32(x, _mm256_set1_epi32(0x7FFF)), lsb);
    r = _mm256_and_si256(r, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u)));
    const __m256 nan = _mm256_cmp_ps(v.v, v.v, _CMP_UNORD_Q);
    const __m256i quiet = _mm256_or_si256(x, _mm256_set1_epi32(0x400000));
    return _mm256_castps_si256(
        _mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(quiet), nan));
  }
  static void store(uint16_t* p, VecF v) {
    const __m256i r = _mm256_srli_epi32(rounded_bits(v), 16);  // values fit in 16 bits
    const __m128i packed =
        _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
  }
  static VecF round(VecF v) { return VecF(_mm256_castsi256_ps(rounded_bits(v))); }
#elif defined(FED_ISA_NEON)
  static VecF load(const uint16_t* p) {
    return VecF(vreinterpretq_f32_u32(vshlq_n_u32(vmovl_u16(vld1_u16(p)), 16)));
  }
  static uint32x4_t rounded_bits(VecF v) {
    const uint32x4_t x = vreinterpretq_u32_f32(v.v);
    const uint32x4_t lsb = vandq_u32(vshrq_n_u32(x, 16), vdupq_n_u32(1));
    uint32x4_t r = vaddq_u32(vaddq_u32(x, vdupq_n_u32(0x7FFF)), lsb);
    r = vandq_u32(r, vdupq_n_u32(0xFFFF0000u));
    const uint32x4_t is_num = vceqq_f32(v.v, v.v);
    return vbslq_u32(is_num, r, vorrq_u32(x, vdupq_n_u32(0x400000)));
  }
  static void store(uint16_t* p, VecF v) { vst1_u16(p, vmovn_u32(vshrq_n_u32(rounded_bits(v), 16))); }
  static VecF round(VecF v) { return VecF(vreinterpretq_f32_u32(rounded_bits(v))); }
#else
  static VecF load(const uint16_t* p) { return VecF(bf16_to_float(*p)); }
  static void store(uint16_t* p, VecF v) { *p = float_to_bf16(v.v); }
  static VecF round(VecF v) { return VecF(bf16_to_float(float_to_bf16(v.v))); }
#endif
};

struct StoreF16 {
  using T = uint16_t;
  static constexpr bool kRounds = true;
  static float to_float(uint16_t x) { return f16_to_float(x); }
  static uint16_t from_float(float x) { return float_to_f16(x); }
#if defined(FED_ISA_AVX512)
  static VecF load(const uint16_t* p) {
    return VecF(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
  }
  static __m256i to_half(VecF v) { return _mm512_cvtps_ph(v.v, _MM_FROUND_TO_NEAREST_INT); }
  static void store(uint16_t* p, VecF v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_half(v));
  }
  static VecF round(VecF v) { return VecF(_mm512_cvtph_ps(to_half(v))); }
#elif defined(FED_ISA_AVX2)
  static VecF load(const uint16_t* p) {
    return VecF(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static __m128i to_half(VecF v) {
    return _mm256_cvtps_ph(v.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static void store(uint16_t* p, VecF v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_half(v));
  }
  static VecF round(VecF v) { return VecF(_mm256_cvtph_ps(to_half(v))); }
#elif defined(FED_ISA_NEON)
  static VecF load(const uint16_t* p) {
    return VecF(vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))));
  }
  static void store(uint16_t* p, VecF v) {
    vst1_u16(p, vreinterpret_u16_f16(vcvt_f16_f32(v.v)));
  }
  static VecF round(VecF v) { return VecF(vcvt_f32_f16(vcvt_f16_f32(v.v))); }
#else
  static VecF load(const uint16_t* p) { return VecF(f16_to_float(*p)); }
  static void store(uint16_t* p, VecF v) { *p = float_to_f16(v.v); }
  static VecF round(VecF v) { return VecF(f16_to_float(float_to_f16(v.v))); }
#endif
};

// n elements of storage S -> fp32 (vector body, scalar tail).
template <class S>
inline void load_row(const typename S::T* src, float* dst, int64_t n) {
  constexpr int W = VecF::kWidth;
  int64_t i = 0;
  for (; i + W <= n; i += W) S::load(src + i).store(dst + i);
  for (; i < n; ++i) dst[i] = S::to_float(src[i]);
}

// n fp32 values -> storage S, rounding to nearest even.
template <class S>
inline void store_row(const float* src, typename S::T* dst, int64_t n) {
  constexpr int W = VecF::kWidth;
  int64_t i = 0;
  for (; i + W <= n; i += W) S::store(dst + i, VecF::load(src + i));
  for (; i < n; ++i) dst[i] = S::from_float(src[i]);
}

// Round fp32 values to what storage S can hold (in place): RoPE'd q/k are rounded
// to the storage dtype like the reference does, so a prefill and a cache decode of
// the same tokens see the same keys.
template <class S>
inline void round_row(float* x, int64_t n) {
  if constexpr (S::kRounds) {
    constexpr int W = VecF::kWidth;
    int64_t i = 0;
    for (; i + W <= n; i += W) S::round(VecF::load(x + i)).store(x + i);
    for (; i < n; ++i) x[i] = S::to_float(S::from_float(x[i]));
  }
}

}  // namespace fastencdec::cpu::FED_ISA_NS
