// One decode step of an int8 or bf16 decoder in a single C++ call
// (fastencdec.models.decoder_step):
// for every layer
//   x += out(attend_cache(rope(qkv(norm1(x)))));  x += cout(cross(cq(norm2(x)), K_l, V_l));
//   x += fc2(gelu(fc1(norm3(x))));   then logits = lm_head(final_norm(x)).
// (A decoder-only model's layers have no cross-attention line.)
// The same kernels, in the same order and on the same data, as the module-by-module
// path (models/layers.py), so the logits are bitwise the same; what goes away is the
// Python between the kernels (module calls, op wrappers, tensor views), ~40% of a
// batch-1 int8 step when each op is called from Python.
//
// Int8DecoderStep / Bf16DecoderStep hold the weights (numpy views of the packed panels,
// scales, biases and norm weights, kept alive by references) and check every shape once
// at construction; step() checks the per-step arrays and runs with the GIL released.
// The formats differ only in the linear kernel and the activations' dtype (int8: fp32
// activations; bf16: bf16 activations, caches and logits, each op rounding its output
// once, as the module path's ops do).
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "array_args.h"
#include "cpu/dispatch.h"
#include "cpu/isa.h"

namespace fastencdec::bind {

namespace {

using cpu::AppendKvCacheProblem;
using cpu::AttentionProblem;
using cpu::Int8LinearProblem;
using cpu::RmsNormProblem;

using cpu::Bf16LinearProblem;
using cpu::Storage;

void int8_impl(const Int8LinearProblem& p) { FED_DISPATCH(int8_linear, p); }
void bf16_impl(const Bf16LinearProblem& p) { FED_DISPATCH(bf16_linear, p); }

// int8 weights, fp32 activations: (panels int8 [ceil(N/32), ceil(K/4), 32, 4],
// weight_scale fp32 [N], bias fp32 [N] or None), as Int8Linear packs them.
struct Int8Format {
  using Act = float;
  static constexpr Storage kStorage = Storage::kF32;
  static constexpr const char* kName = "Int8DecoderStep";
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
    Int8LinearProblem p;
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
  static constexpr Storage kStorage = Storage::kBF16;
  static constexpr const char* kName = "Bf16DecoderStep";
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
    w.panels = checked_data<uint16_t>(panels, name.c_str(), 4, false);
    expect_shape(panels, name.c_str(), {(out + 31) / 32, (in + 1) / 2, 32, 2});
    keep.append(panels);
    w.bias = optional_vector<uint16_t>(t[1], name.c_str(), out, &keep);
    return w;
  }
  static int64_t out_features(py::tuple t) { return t[2].cast<int64_t>(); }
  static void run(const Linear& w, const uint16_t* x, uint16_t* out, int64_t rows, bool gelu,
                  int threads) {
    Bf16LinearProblem p;
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
  static void add(uint16_t* x, const uint16_t* y, int64_t n) {  // torch: fp32 sum, rounded
    for (int64_t i = 0; i < n; ++i) x[i] = round_to_bf16(bf16_value(x[i]) + bf16_value(y[i]));
  }
};

template <class Linear>
struct Layer {
  bool cross = true;  // false: a decoder-only block (no cross-attention)
  const float* norm1 = nullptr;
  const float* norm2 = nullptr;
  const float* norm3 = nullptr;
  Linear qkv, out, cross_q, cross_out, fc1, fc2;
};

template <class F>
class DecoderStep {
  using Act = typename F::Act;
  using Linear = typename F::Linear;

 public:
  DecoderStep(int64_t d_model, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
                  double eps, py::list layers, py::array final_norm, py::tuple lm_head)
      : d_(d_model), hq_(n_heads), hkv_(n_kv_heads), hd_(head_dim), eps_(float(eps)) {
    if (d_ < 1 || hq_ < 1 || hkv_ < 1 || hd_ < 2 || hd_ % 2 || hq_ % hkv_)
      throw py::value_error(std::string(F::kName) + ": bad dimensions (n_heads a multiple "
                            "of n_kv_heads, head_dim even)");
    if (!std::isfinite(eps) || eps < 0) throw py::value_error("eps must be finite and >= 0");
    const int64_t q_w = hq_ * hd_, kv_w = hkv_ * hd_;
    for (py::handle item : layers) {
      py::tuple t = py::reinterpret_borrow<py::tuple>(item);
      if (t.size() != 9 && t.size() != 6)
        throw py::value_error("each layer is (norm1, qkv, out, norm2, cross_q, cross_out, "
                              "norm3, fc1, fc2) or, decoder-only, (norm1, qkv, out, norm2, "
                              "fc1, fc2)");
      Layer<Linear> l;
      l.cross = t.size() == 9;
      if (!layers_.empty() && layers_[0].cross != l.cross)
        throw py::value_error("all layers must be of one kind");
      const int mlp = l.cross ? 6 : 3;  // index of the MLP's norm
      l.norm1 = norm(t[0], "norm1");
      l.qkv = linear(t[1], "qkv", d_, q_w + 2 * kv_w);
      l.out = linear(t[2], "out", q_w, d_);
      if (l.cross) {
        l.norm2 = norm(t[3], "norm2");
        l.cross_q = linear(t[4], "cross_q", d_, q_w);
        l.cross_out = linear(t[5], "cross_out", q_w, d_);
      }
      l.norm3 = norm(t[mlp], "norm3");
      const int64_t d_ff = F::out_features(py::reinterpret_borrow<py::tuple>(t[mlp + 1]));
      l.fc1 = linear(t[mlp + 1], "fc1", d_, d_ff);
      l.fc2 = linear(t[mlp + 2], "fc2", d_ff, d_);
      layers_.push_back(l);
    }
    final_norm_ = norm(final_norm, "final_norm");
    vocab_ = F::out_features(lm_head);
    lm_head_ = linear(lm_head, "lm_head", d_, vocab_);
  }

  int64_t n_layers() const { return int64_t(layers_.size()); }

  // Arrays of activations (x, caches, cross K/V, logits) hold F::Act: fp32, or bf16 bits
  // as uint16. x [R, d]: this step's embedded tokens (one per row), overwritten. Caches
  // [L, R, Lmax, Hkv, D]; lens/lens_after int32 [R] (lens_after = lens + 1, set by the
  // cache's begin_step); key_mask bool [R, Lmax] or None; cross_k/cross_v: per layer
  // [B, Lx, Hkv, D] with R a multiple of B (row r reads input r / (R / B));
  // encoder_mask bool [B, Lx] or None; logits [R, vocab] out.
  void step(py::array x, py::array k_cache, py::array v_cache, py::array lens,
            py::array lens_after, py::object key_mask, py::list cross_k, py::list cross_v,
            py::object encoder_mask, double rope_base, py::array logits, int num_threads) {
    Act* xd = checked_data<Act>(x, "x", 2, true);
    const int64_t R = x.shape(0);
    expect_dim(x, "x", 1, d_);
    const int64_t L = n_layers();
    Act* kc = checked_data<Act>(k_cache, "k_cache", 5, true);
    Act* vc = checked_data<Act>(v_cache, "v_cache", 5, true);
    const int64_t max_len = k_cache.shape(2);
    expect_shape(k_cache, "k_cache", {L, R, max_len, hkv_, hd_});
    expect_shape(v_cache, "v_cache", {L, R, max_len, hkv_, hd_});
    const int32_t* ld = checked_data<int32_t>(lens, "lens", 1, false);
    const int32_t* lad = checked_data<int32_t>(lens_after, "lens_after", 1, false);
    expect_dim(lens, "lens", 0, R);
    expect_dim(lens_after, "lens_after", 0, R);
    std::vector<int64_t> len64(R), after64(R);
    for (int64_t r = 0; r < R; ++r) {
      if (ld[r] < 0 || ld[r] + 1 > max_len || lad[r] != ld[r] + 1)
        throw py::value_error("lens[" + std::to_string(r) + "] = " + std::to_string(ld[r]) +
                              ": needs 0 <= lens < " + std::to_string(max_len) +
                              " (the cache length) and lens_after = lens + 1");
      len64[r] = ld[r];
      after64[r] = lad[r];
    }
    const bool* kmask = nullptr;
    if (!key_mask.is_none()) {
      py::array m = as_array(key_mask, "key_mask");
      kmask = checked_data<bool>(m, "key_mask", 2, false);
      expect_shape(m, "key_mask", {R, max_len});
    }
    const bool cross = L > 0 && layers_[0].cross;
    const int64_t n_cross = cross ? L : 0;
    if (int64_t(cross_k.size()) != n_cross || int64_t(cross_v.size()) != n_cross)
      throw py::value_error("cross_k and cross_v need one array per layer (" +
                            std::to_string(n_cross) + ")");
    std::vector<py::array> ck, cv;  // keep the per-layer arrays referenced
    std::vector<const Act*> ckd(n_cross), cvd(n_cross);
    int64_t batch = R, enc_len = 0;
    for (int64_t l = 0; l < n_cross; ++l) {
      ck.push_back(as_array(cross_k[l], "cross_k"));
      cv.push_back(as_array(cross_v[l], "cross_v"));
      ckd[l] = checked_data<Act>(ck[l], "cross_k", 4, false);
      cvd[l] = checked_data<Act>(cv[l], "cross_v", 4, false);
      if (l == 0) batch = ck[0].shape(0), enc_len = ck[0].shape(1);
      expect_shape(ck[l], "cross_k", {batch, enc_len, hkv_, hd_});
      expect_shape(cv[l], "cross_v", {batch, enc_len, hkv_, hd_});
    }
    if (cross && (batch < 1 || R % batch))
      throw py::value_error("x has " + std::to_string(R) + " rows, not a multiple of the "
                            "encoder batch " + std::to_string(batch));
    const bool* emask = nullptr;
    if (!encoder_mask.is_none()) {
      if (!cross) throw py::value_error("encoder_mask: a decoder-only step has no encoder");
      py::array m = as_array(encoder_mask, "encoder_mask");
      emask = checked_data<bool>(m, "encoder_mask", 2, false);
      expect_shape(m, "encoder_mask", {batch, enc_len});
    }
    Act* out = checked_data<Act>(logits, "logits", 2, true);
    expect_shape(logits, "logits", {R, vocab_});
    if (!(rope_base > 0.0) || !std::isfinite(rope_base))
      throw py::value_error("rope_base must be a finite positive number");
    check_threads(num_threads);
    cpu::active_isa();

    py::gil_scoped_release release;
    const int threads = num_threads;
    const int64_t q_w = hq_ * hd_, kv_w = hkv_ * hd_, width = q_w + 2 * kv_w;
    int64_t d_ff = 0;
    for (const Layer<Linear>& l : layers_) d_ff = std::max(d_ff, l.fc1.out);
    std::vector<Act> h(R * d_), qkv(R * width), q(R * q_w), k(R * kv_w), v(R * kv_w),
        q_rot(R * q_w), o(R * q_w), y(R * d_), f(R * d_ff);
    std::vector<double> inv_freq(hd_ / 2);
    for (int64_t i = 0; i < hd_ / 2; ++i)
      inv_freq[i] = std::pow(rope_base, -double(2 * i) / double(hd_));
    const float scale = 1.0f / std::sqrt(float(hd_));
    const int64_t cache_layer = R * max_len * kv_w;

    for (int64_t li = 0; li < L; ++li) {
      const Layer<Linear>& l = layers_[li];
      // self-attention
      rms_norm(xd, l.norm1, h.data(), R, threads);
      linear(l.qkv, h.data(), qkv.data(), R, false, threads);
      for (int64_t r = 0; r < R; ++r) {  // split [q | k | v] per row
        const Act* row = qkv.data() + r * width;
        std::copy(row, row + q_w, q.data() + r * q_w);
        std::copy(row + q_w, row + q_w + kv_w, k.data() + r * kv_w);
        std::copy(row + q_w + kv_w, row + width, v.data() + r * kv_w);
      }
      AppendKvCacheProblem a;
      a.storage = F::kStorage;
      a.q = q.data();
      a.k = k.data();
      a.v = v.data();
      a.q_out = q_rot.data();
      a.k_cache = kc + li * cache_layer;
      a.v_cache = vc + li * cache_layer;
      a.cache_seqlens = len64.data();
      a.batch = R;
      a.new_len = 1;
      a.q_heads = hq_;
      a.kv_heads = hkv_;
      a.head_dim = hd_;
      a.max_len = max_len;
      a.inv_freq = inv_freq.data();
      a.num_threads = threads;
      append_kv_cache_impl(a);
      attend(q_rot.data(), kc + li * cache_layer, vc + li * cache_layer, o.data(), R, 1,
             max_len, kmask, after64.data(), true, scale, threads);
      linear(l.out, o.data(), y.data(), R, false, threads);
      F::add(xd, y.data(), R * d_);
      if (l.cross) {  // cross-attention: the R / B rows of one input fold into its query axis
        rms_norm(xd, l.norm2, h.data(), R, threads);
        linear(l.cross_q, h.data(), q.data(), R, false, threads);
        attend(q.data(), ckd[li], cvd[li], o.data(), batch, R / batch, enc_len, emask, nullptr,
               false, scale, threads);
        linear(l.cross_out, o.data(), y.data(), R, false, threads);
        F::add(xd, y.data(), R * d_);
      }
      // MLP (GELU in fc1's epilogue)
      rms_norm(xd, l.norm3, h.data(), R, threads);
      linear(l.fc1, h.data(), f.data(), R, true, threads);
      linear(l.fc2, f.data(), y.data(), R, false, threads);
      F::add(xd, y.data(), R * d_);
    }
    rms_norm(xd, final_norm_, h.data(), R, threads);
    linear(lm_head_, h.data(), out, R, false, threads);
  }

 private:
  static void append_kv_cache_impl(const AppendKvCacheProblem& p) {
    FED_DISPATCH(append_kv_cache, p);
  }
  static void attention_impl(const AttentionProblem& p) { FED_DISPATCH(attention_forward, p); }
  static void rms_norm_impl(const RmsNormProblem& p) { FED_DISPATCH(rms_norm, p); }

  void rms_norm(const Act* x, const float* w, Act* out, int64_t rows, int threads) const {
    RmsNormProblem p;
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

  // q [batch, q_len, Hq, D] against k/v [batch, kv_len, Hkv, D] (the layout of
  // AttentionProblem).
  void attend(const Act* q, const Act* k, const Act* v, Act* out, int64_t batch,
              int64_t q_len, int64_t kv_len, const bool* key_mask, const int64_t* seqlens,
              bool causal, float scale, int threads) const {
    AttentionProblem p;
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
    p.key_mask = key_mask;
    p.kv_seqlens = seqlens;
    p.causal = causal;
    p.scale = scale;
    p.num_threads = threads;
    attention_impl(p);
  }

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

  int64_t d_, hq_, hkv_, hd_, vocab_ = 0;
  float eps_;
  std::vector<Layer<Linear>> layers_;
  const float* final_norm_ = nullptr;
  Linear lm_head_;
  py::list keep_;  // the arrays the pointers above read
};

template <class F>
void register_step(py::module_& m, const char* doc) {
  using Step = DecoderStep<F>;
  py::class_<Step>(m, F::kName, doc)
      .def(py::init<int64_t, int64_t, int64_t, int64_t, double, py::list, py::array,
                    py::tuple>(),
           py::arg("d_model"), py::arg("n_heads"), py::arg("n_kv_heads"), py::arg("head_dim"),
           py::arg("eps"), py::arg("layers"), py::arg("final_norm"), py::arg("lm_head"))
      .def_property_readonly("n_layers", &Step::n_layers)
      .def("step", &Step::step, py::arg("x"), py::arg("k_cache"), py::arg("v_cache"),
           py::arg("lens"), py::arg("lens_after"), py::arg("key_mask"), py::arg("cross_k"),
           py::arg("cross_v"), py::arg("encoder_mask"), py::arg("rope_base"), py::arg("logits"),
           py::arg("num_threads"));
}

}  // namespace

void register_decoder_step(py::module_& m) {
  register_step<Int8Format>(m, "One int8 decode step (encoder-decoder or decoder-only) in a "
                               "single call (fp32 activations).");
  register_step<Bf16Format>(m, "One bf16 decode step (encoder-decoder or decoder-only) in a "
                               "single call (bf16 activations, caches and logits).");
}

}  // namespace fastencdec::bind
