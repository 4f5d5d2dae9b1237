// What the one-call decoder step (bindings_decoder_step.cpp) and the one-call encoder
// (bindings_encoder.cpp) share: the two packed weight formats (int8 weights with fp32
// activations, bf16 weights with bf16 activations), and PackedLayers, which holds a
// model's dimensions and the arrays its pointers read, parses norms and linear layers
// once, and calls the kernels the module path calls (models/layers.py), in its order
// and on its data, so both one-call paths are bitwise the module path.
#pragma once

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "array_args.h"
#include "cpu/dispatch.h"
#include "cpu/isa.h"

namespace fastencdec::bind {

inline void int8_impl(const cpu::Int8LinearProblem& p) { FED_DISPATCH(int8_linear, p); }
inline void bf16_impl(const cpu::Bf16LinearProblem& p) { FED_DISPATCH(bf16_linear, p); }
inline void attention_impl(const cpu::AttentionProblem& p) { FED_DISPATCH(attention_forward, p); }
inline void rms_norm_impl(const cpu::RmsNormProblem& p) { FED_DISPATCH(rms_norm, p); }
inline void apply_rope_impl(const float* x, float* out, const int64_t* pos,
                            const double* inv_freq, int64_t rows, int64_t heads,
                            int64_t head_dim, int threads) {
  FED_DISPATCH(apply_rope, x, out, pos, inv_freq, rows, heads, head_dim, threads);
}
inline void append_kv_cache_impl(const cpu::AppendKvCacheProblem& p) {
  FED_DISPATCH(append_kv_cache, p);
}

inline void check_features(const std::string& name, int64_t in, int64_t out) {
  if (in < 1 || out < 1)
    throw py::value_error(name + ": needs at least one input and one output feature, got " +
                          std::to_string(in) + " -> " + std::to_string(out));
}

// int8 weights, fp32 activations: (panels int8 [ceil(N/32), ceil(K/4), 32, 4],
// weight_scale fp32 [N], bias fp32 [N] or None), as Int8Linear packs them.
struct Int8Format {
  using Act = float;
  static constexpr cpu::Storage kStorage = cpu::Storage::kF32;
  static constexpr const char* kName = "Int8DecoderStep";
  static constexpr const char* kBlocksName = "Int8Blocks";
  struct Linear {
    const int8_t* panels = nullptr;
    const float* scale = nullptr;
    const float* bias = nullptr;
    int64_t in = 0, out = 0;
  };
  static Linear parse(py::tuple t, const std::string& name, int64_t in, int64_t out,
                      py::list& keep) {
    if (t.size() != 3)
      throw py::value_error(name + ": expected (panels, weight_scale, bias)");
    py::array panels = t[0].cast<py::array>(), scale = t[1].cast<py::array>();
    Linear w;
    w.in = in;
    w.out = out;
    check_features(name, in, out);
    if (in > cpu::kInt8MaxK) throw py::value_error(name + ": too many inputs");
    w.panels = checked_data<int8_t>(panels, name.c_str(), 4, false);
    expect_shape(panels, name.c_str(), {(out + 31) / 32, (in + 3) / 4, 32, 4});
    w.scale = checked_data<float>(scale, name.c_str(), 1, false);
    expect_dim(scale, name.c_str(), 0, out);
    keep.append(panels);
    keep.append(scale);
    w.bias = optional_vector<float>(t[2], name.c_str(), out, &keep);
    return w;
  }
  static int64_t out_features(py::tuple t) { return t[1].cast<py::array>().shape(0); }
  static void run(const Linear& w, const float* x, float* out, int64_t rows, bool gelu,
                  int threads) {
    cpu::Int8LinearProblem p;
    p.x = x;
    p.weight = w.panels;
    p.weight_scale = w.scale;
    p.bias = w.bias;
    p.out = out;
    p.rows = rows;
    p.in_features = w.in;
    p.out_features = w.out;
    p.gelu = gelu;
    p.num_threads = threads;
    int8_impl(p);
  }
  static float widen(float v) { return v; }
  static float narrow(float v) { return v; }
  static void add(float* x, const float* y, int64_t n) {  // as torch's x + y
    for (int64_t i = 0; i < n; ++i) x[i] += y[i];
  }
};

inline uint16_t round_to_bf16(float f) {  // nearest even, NaN kept quiet (as torch)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
inline float bf16_value(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// bf16 weights and activations: (panels bf16 bits [ceil(N/32), ceil(K/2), 32, 2], bias
// bf16 bits [N] or None, N), as Bf16Linear packs them.
struct Bf16Format {
  using Act = uint16_t;
  static constexpr cpu::Storage kStorage = cpu::Storage::kBF16;
  static constexpr const char* kName = "Bf16DecoderStep";
  static constexpr const char* kBlocksName = "Bf16Blocks";
  struct Linear {
    const uint16_t* panels = nullptr;
    const uint16_t* bias = nullptr;
    int64_t in = 0, out = 0;
  };
  static Linear parse(py::tuple t, const std::string& name, int64_t in, int64_t out,
                      py::list& keep) {
    if (t.size() != 3) throw py::value_error(name + ": expected (panels, bias, out_features)");
    py::array panels = t[0].cast<py::array>();
    Linear w;
    w.in = in;
    w.out = out;
    check_features(name, in, out);
    w.panels = checked_data<uint16_t>(panels, name.c_str(), 4, false);
    expect_shape(panels, name.c_str(), {(out + 31) / 32, (in + 1) / 2, 32, 2});
    keep.append(panels);
    w.bias = optional_vector<uint16_t>(t[1], name.c_str(), out, &keep);
    return w;
  }
  static int64_t out_features(py::tuple t) { return t[2].cast<int64_t>(); }
  static void run(const Linear& w, const uint16_t* x, uint16_t* out, int64_t rows, bool gelu,
                  int threads) {
    cpu::Bf16LinearProblem p;
    p.x = x;
    p.weight = w.panels;
    p.bias = w.bias;
    p.out = out;
    p.rows = rows;
    p.in_features = w.in;
    p.out_features = w.out;
    p.gelu = gelu;
    p.num_threads = threads;
    bf16_impl(p);
  }
  static float widen(uint16_t v) { return bf16_value(v); }
  static uint16_t narrow(float v) { return round_to_bf16(v); }
  static void add(uint16_t* x, const uint16_t* y, int64_t n) {  // torch: fp32 sum, rounded
    for (int64_t i = 0; i < n; ++i) x[i] = round_to_bf16(bf16_value(x[i]) + bf16_value(y[i]));
  }
};

// The softmax scale as fastencdec.ops computes it (1 / sqrt(D) in double, then fp32).
inline float softmax_scale(int64_t head_dim) {
  return static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
}

inline std::vector<double> rope_inv_freq(double base, int64_t head_dim) {
  std::vector<double> inv_freq(head_dim / 2);
  for (int64_t i = 0; i < head_dim / 2; ++i)
    inv_freq[i] = std::pow(base, -double(2 * i) / double(head_dim));
  return inv_freq;
}

// Dimensions, parsed weights and the kernel calls of a stack of packed layers.
template <class F>
class PackedLayers {
 public:
  using Act = typename F::Act;
  using Linear = typename F::Linear;

  PackedLayers(const char* name, int64_t d_model, int64_t n_heads, int64_t n_kv_heads,
               int64_t head_dim, double eps)
      : d_(d_model), hq_(n_heads), hkv_(n_kv_heads), hd_(head_dim), eps_(float(eps)) {
    if (d_ < 1 || hq_ < 1 || hkv_ < 1 || hd_ < 2 || hd_ % 2 || hq_ % hkv_)
      throw py::value_error(std::string(name) + ": bad dimensions (n_heads a multiple "
                            "of n_kv_heads, head_dim even)");
    if (!std::isfinite(eps) || eps < 0) throw py::value_error("eps must be finite and >= 0");
  }

 protected:
  int64_t q_width() const { return hq_ * hd_; }
  int64_t kv_width() const { return hkv_ * hd_; }

  const float* norm(py::handle obj, const char* name) {
    py::array a = py::reinterpret_borrow<py::object>(obj).cast<py::array>();
    const float* d = checked_data<float>(a, name, 1, false);
    expect_dim(a, name, 0, d_);
    keep_.append(a);
    return d;
  }

  Linear linear(py::handle obj, const char* name, int64_t in, int64_t out) {
    return F::parse(py::reinterpret_borrow<py::tuple>(obj), name, in, out, keep_);
  }

  void rms_norm(const Act* x, const float* w, Act* out, int64_t rows, int threads) const {
    cpu::RmsNormProblem p;
    p.storage = F::kStorage;
    p.x = x;
    p.out = out;
    p.weight = w;
    p.rows = rows;
    p.dim = d_;
    p.eps = eps_;
    p.num_threads = threads;
    rms_norm_impl(p);
  }

  static void linear(const Linear& w, const Act* x, Act* out, int64_t rows, bool gelu,
                     int threads) {
    F::run(w, x, out, rows, gelu, threads);
  }

  // [q | k | v] rows of a fused projection into three dense arrays (as the module path's
  // split + contiguous copies).
  void split_qkv(const Act* qkv, int64_t rows, Act* q, Act* k, Act* v) const {
    const int64_t q_w = q_width(), kv_w = kv_width(), width = q_w + 2 * kv_w;
    for (int64_t r = 0; r < rows; ++r) {
      const Act* row = qkv + r * width;
      std::memcpy(q + r * q_w, row, sizeof(Act) * q_w);
      std::memcpy(k + r * kv_w, row + q_w, sizeof(Act) * kv_w);
      std::memcpy(v + r * kv_w, row + q_w + kv_w, sizeof(Act) * kv_w);
    }
  }

  // q [batch, q_len, Hq, D] against k/v [batch, kv_len, Hkv, D] (AttentionProblem).
  cpu::AttentionProblem attention(const Act* q, const Act* k, const Act* v, Act* out,
                                  int64_t batch, int64_t q_len, int64_t kv_len,
                                  int threads) const {
    cpu::AttentionProblem p;
    p.storage = F::kStorage;
    p.q = q;
    p.k = k;
    p.v = v;
    p.out = out;
    p.batch = batch;
    p.q_len = q_len;
    p.kv_len = kv_len;
    p.q_heads = hq_;
    p.kv_heads = hkv_;
    p.head_dim = hd_;
    p.scale = softmax_scale(hd_);
    p.num_threads = threads;
    return p;
  }

  int64_t d_, hq_, hkv_, hd_;
  float eps_;
  py::list keep_;  // the arrays the parsed pointers read
};

}  // namespace fastencdec::bind
