// Standalone check of one ISA's attention kernels against a naive double-precision
// attention, without Python. pytest covers every ISA the test machine runs; this
// covers the others, e.g. NEON on an x86 machine under qemu:
//
//   CXX=aarch64-linux-gnu-g++; F="-std=gnu++17 -O2 -fopenmp -Icsrc"; mkdir -p /tmp/kc
//   for f in csrc/cpu/kernels/*.cpp; do
//     $CXX $F -DFED_ISA_NS=neon -DFED_ISA_NEON -c $f -o /tmp/kc/$(basename $f .cpp).o; done
//   $CXX $F -DCHECK_ISA=neon csrc/tools/kernel_check.cpp /tmp/kc/*.o -o /tmp/kc/check
//   qemu-aarch64 -L /usr/aarch64-linux-gnu /tmp/kc/check   # exit status 0: all ok
//
// (avx2: g++, -DFED_ISA_NS=avx2 -DFED_ISA_AVX2 -mavx2 -mfma -mf16c, -DCHECK_ISA=avx2.)
//
// Not part of the CMake build (which compiles only csrc/cpu/kernels/*.cpp).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "cpu/kernels.h"

#ifndef CHECK_ISA
#define CHECK_ISA scalar
#endif
FED_DECLARE_KERNELS(CHECK_ISA)

namespace {

using fastencdec::cpu::AttentionProblem;
using fastencdec::cpu::AppendKvCacheProblem;
using fastencdec::cpu::Storage;
namespace isa = fastencdec::cpu::CHECK_ISA;

int g_failures = 0;

void report(const char* what, double err, double tol) {
  std::printf("%-60s max err %.2e  %s\n", what, err, err < tol ? "ok" : "FAIL");
  if (!(err < tol)) ++g_failures;
}

// Storage round trip (what the kernel reads back from memory).
uint16_t to_bits(float f, Storage st) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (st == Storage::kBF16) return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  // fp16 by exponent/mantissa rounding (inputs here are normal, |x| < 8).
  const uint32_t sign = (u >> 16) & 0x8000u;
  const float a = std::fabs(f);
  if (a < 6.1e-5f) return static_cast<uint16_t>(sign);
  int e;
  const float m = std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
  const uint32_t mant = static_cast<uint32_t>(std::nearbyint((m * 2.f - 1.f) * 1024.f));
  return static_cast<uint16_t>(sign | (static_cast<uint32_t>(e - 1 + 15) << 10)) + mant;
}

float from_bits(uint16_t h, Storage st) {
  uint32_t u;
  if (st == Storage::kBF16) {
    u = static_cast<uint32_t>(h) << 16;
  } else {
    const uint32_t e = (h >> 10) & 31u, m = h & 0x3FFu;
    u = ((h & 0x8000u) << 16) | (e ? ((e + 112u) << 23) | (m << 13) : 0u);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct Case {
  const char* name;
  int batch, q_len, kv_len, q_heads, kv_heads, head_dim;
  bool mask, lens, causal;
  int threads;
};

// out[b, t, h] by the definition in kernels.h, in double.
std::vector<double> naive(const Case& c, const std::vector<float>& q, const std::vector<float>& k,
                          const std::vector<float>& v, const std::vector<bool>& mask,
                          const std::vector<int64_t>& lens, double scale) {
  const int G = c.q_heads / c.kv_heads, D = c.head_dim;
  std::vector<double> out(q.size(), 0.0), s(c.kv_len);
  for (int b = 0; b < c.batch; ++b)
    for (int t = 0; t < c.q_len; ++t)
      for (int h = 0; h < c.q_heads; ++h) {
        const int64_t len = c.lens ? lens[b] : c.kv_len;
        double mx = -INFINITY;
        for (int j = 0; j < c.kv_len; ++j) {
          const bool visible = j < len && (!c.mask || mask[b * c.kv_len + j]) &&
                               (!c.causal || j <= t + len - c.q_len);
          s[j] = -INFINITY;
          if (!visible) continue;
          double dot = 0;
          for (int d = 0; d < D; ++d)
            dot += double(q[((b * c.q_len + t) * c.q_heads + h) * D + d]) *
                   k[((b * c.kv_len + j) * c.kv_heads + h / G) * D + d];
          s[j] = dot * scale;
          mx = std::max(mx, s[j]);
        }
        if (mx == -INFINITY) continue;  // no visible key: 0
        double sum = 0;
        for (double& x : s) sum += (x = x == -INFINITY ? 0.0 : std::exp(x - mx));
        for (int d = 0; d < D; ++d) {
          double acc = 0;
          for (int j = 0; j < c.kv_len; ++j)
            acc += s[j] * v[((b * c.kv_len + j) * c.kv_heads + h / G) * D + d];
          out[((b * c.q_len + t) * c.q_heads + h) * D + d] = acc / sum;
        }
      }
  return out;
}

void check_attention(const Case& c, Storage st) {
  std::mt19937 rng(c.batch * 1000 + c.q_len * 10 + c.kv_len + c.head_dim);
  std::normal_distribution<float> normal;
  const size_t nq = size_t(c.batch) * c.q_len * c.q_heads * c.head_dim;
  const size_t nk = size_t(c.batch) * c.kv_len * c.kv_heads * c.head_dim;
  std::vector<float> q(nq), k(nk), v(nk), out(nq);
  std::vector<uint16_t> qb(nq), kb(nk), vb(nk), outb(nq);
  auto fill = [&](std::vector<float>& x, std::vector<uint16_t>& bits) {
    for (size_t i = 0; i < x.size(); ++i) {
      x[i] = normal(rng);
      if (st != Storage::kF32) x[i] = from_bits(bits[i] = to_bits(x[i], st), st);
    }
  };
  fill(q, qb);
  fill(k, kb);
  fill(v, vb);
  std::vector<bool> mask(size_t(c.batch) * c.kv_len);
  for (int b = 0; b < c.batch; ++b)  // last row fully masked
    for (int j = 0; j < c.kv_len; ++j) mask[b * c.kv_len + j] = b != c.batch - 1 && rng() % 3 != 0;
  std::unique_ptr<bool[]> mask_arr(new bool[mask.size()]);
  std::copy(mask.begin(), mask.end(), mask_arr.get());
  std::vector<int64_t> lens(c.batch);
  for (int b = 0; b < c.batch; ++b) lens[b] = b == 0 ? 0 : b == 1 ? c.kv_len : 1 + rng() % c.kv_len;

  AttentionProblem p;
  p.storage = st;
  p.batch = c.batch;
  p.q_len = c.q_len;
  p.kv_len = c.kv_len;
  p.q_heads = c.q_heads;
  p.kv_heads = c.kv_heads;
  p.head_dim = c.head_dim;
  p.causal = c.causal;
  p.scale = 0.2f;
  p.num_threads = c.threads;
  const bool f32 = st == Storage::kF32;
  p.q = f32 ? static_cast<const void*>(q.data()) : qb.data();
  p.k = f32 ? static_cast<const void*>(k.data()) : kb.data();
  p.v = f32 ? static_cast<const void*>(v.data()) : vb.data();
  p.out = f32 ? static_cast<void*>(out.data()) : outb.data();
  if (c.mask) p.key_mask = mask_arr.get();
  if (c.lens) p.kv_seqlens = lens.data();
  isa::attention_forward(p);

  const std::vector<double> expected = naive(c, q, k, v, mask, lens, 0.2);
  double err = 0;
  for (size_t i = 0; i < nq; ++i) {
    const double got = f32 ? out[i] : from_bits(outb[i], st);
    err = std::max(err, std::fabs(got - expected[i]) / (1.0 + std::fabs(expected[i])));
  }
  char what[128];
  std::snprintf(what, sizeof what, "%s storage=%d D=%d", c.name, static_cast<int>(st), c.head_dim);
  report(what, err, f32 ? 2e-5 : st == Storage::kBF16 ? 1e-2 : 2e-3);
}

// Fused RoPE == RoPE first (apply_rope), then attention without RoPE; and append.
void check_rope_paths() {
  const int B = 2, L = 77, Hq = 4, Hkv = 2, D = 32, Lmax = 20;
  std::mt19937 rng(5);
  std::normal_distribution<float> normal;
  std::vector<float> q(B * L * Hq * D), k(B * L * Hkv * D), v(k.size());
  for (auto* x : {&q, &k, &v})
    for (float& e : *x) e = normal(rng);
  std::vector<double> inv_freq(D / 2);
  for (int i = 0; i < D / 2; ++i) inv_freq[i] = std::pow(10000.0, -2.0 * i / D);
  std::vector<int64_t> pos(L), pos_rows(B * L);
  for (int i = 0; i < L; ++i) pos[i] = pos_rows[i] = pos_rows[L + i] = 3 * i + 1000;
  std::vector<float> q_rot(q.size()), k_rot(k.size()), fused(q.size()), unfused(q.size());
  isa::apply_rope(q.data(), q_rot.data(), pos_rows.data(), inv_freq.data(), B * L, Hq, D, 1);
  isa::apply_rope(k.data(), k_rot.data(), pos_rows.data(), inv_freq.data(), B * L, Hkv, D, 1);

  AttentionProblem p;
  p.batch = B;
  p.q_len = p.kv_len = L;
  p.q_heads = Hq;
  p.kv_heads = Hkv;
  p.head_dim = D;
  p.causal = true;
  p.scale = 0.17f;
  p.num_threads = 2;
  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  p.out = fused.data();
  p.positions = pos.data();
  p.pos_batch = 1;
  p.inv_freq = inv_freq.data();
  isa::attention_forward(p);
  p.q = q_rot.data();
  p.k = k_rot.data();
  p.out = unfused.data();
  p.positions = nullptr;
  isa::attention_forward(p);
  double err = 0;
  for (size_t i = 0; i < fused.size(); ++i) err = std::max(err, double(std::fabs(fused[i] - unfused[i])));
  report("fused RoPE == apply_rope + attention", err, 1e-5);

  // Append token 0 of each row at cache rows {5, 19}.
  std::vector<float> q1(B * Hq * D), k1(B * Hkv * D), v1(B * Hkv * D), q1_out(q1.size());
  std::vector<float> k_cache(B * Lmax * Hkv * D), v_cache(k_cache.size());
  for (int b = 0; b < B; ++b) {
    std::memcpy(&q1[b * Hq * D], &q[b * L * Hq * D], sizeof(float) * Hq * D);
    std::memcpy(&k1[b * Hkv * D], &k[b * L * Hkv * D], sizeof(float) * Hkv * D);
    std::memcpy(&v1[b * Hkv * D], &v[b * L * Hkv * D], sizeof(float) * Hkv * D);
  }
  std::vector<int64_t> lens = {5, 19};
  AppendKvCacheProblem a;
  a.batch = B;
  a.new_len = 1;
  a.q_heads = Hq;
  a.kv_heads = Hkv;
  a.head_dim = D;
  a.max_len = Lmax;
  a.q = q1.data();
  a.k = k1.data();
  a.v = v1.data();
  a.q_out = q1_out.data();
  a.k_cache = k_cache.data();
  a.v_cache = v_cache.data();
  a.cache_seqlens = lens.data();
  a.inv_freq = inv_freq.data();
  a.num_threads = 2;
  isa::append_kv_cache(a);
  std::vector<float> q1_rot(q1.size()), k1_rot(k1.size());
  isa::apply_rope(q1.data(), q1_rot.data(), lens.data(), inv_freq.data(), B, Hq, D, 1);
  isa::apply_rope(k1.data(), k1_rot.data(), lens.data(), inv_freq.data(), B, Hkv, D, 1);
  err = 0;
  for (size_t i = 0; i < q1.size(); ++i) err = std::max(err, double(std::fabs(q1_out[i] - q1_rot[i])));
  for (int b = 0; b < B; ++b)
    for (int i = 0; i < Hkv * D; ++i) {
      const size_t row = (size_t(b) * Lmax + lens[b]) * Hkv * D + i;
      err = std::max(err, double(std::fabs(k_cache[row] - k1_rot[b * Hkv * D + i])));
      err = std::max(err, double(std::fabs(v_cache[row] - v1[b * Hkv * D + i])));
    }
  report("append_kv_cache == apply_rope + copy", err, 1e-5);
}

}  // namespace

int main() {
  const Case cases[] = {
      {"causal self-attention, GQA 6/3, padding", 2, 129, 129, 6, 3, 0, true, false, true, 2},
      {"bidirectional, GQA 8/1, padding", 2, 70, 70, 8, 1, 0, true, false, false, 1},
      {"cross-attention, one query", 2, 1, 300, 4, 2, 0, true, false, false, 2},
      {"cross-attention, 7 queries", 3, 7, 65, 4, 4, 0, true, false, false, 2},
      {"decode, split keys", 3, 1, 700, 6, 3, 0, false, true, true, 2},
      {"decode, T=3", 3, 3, 300, 8, 2, 0, false, true, true, 1},
      {"decode, T=2, GQA 8/1", 3, 2, 300, 8, 1, 0, false, true, true, 2},
  };
  for (Storage st : {Storage::kF32, Storage::kBF16, Storage::kF16})
    for (int d : {32, 64, 80, 128, 6})
      for (Case c : cases) {
        c.head_dim = d;
        check_attention(c, st);
      }
  check_rope_paths();
  std::printf("%s\n", g_failures ? "FAILURES" : "all ok");
  return g_failures != 0;
}
