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
#include <string>
#include <vector>

#include "packed_layers.h"

namespace fastencdec::bind {

namespace {

using cpu::AppendKvCacheProblem;
using cpu::AttentionProblem;

template <class Linear>
struct Layer {
  bool cross = true;  // false: a decoder-only block (no cross-attention)
  const float* norm1 = nullptr;
  const float* norm2 = nullptr;
  const float* norm3 = nullptr;
  Linear qkv, out, cross_q, cross_out, fc1, fc2;
};

template <class F>
class DecoderStep : PackedLayers<F> {
  using Base = PackedLayers<F>;
  using Act = typename F::Act;
  using Linear = typename F::Linear;
  using Base::d_, Base::hq_, Base::hkv_, Base::hd_, Base::norm, Base::linear, Base::rms_norm;

 public:
  DecoderStep(int64_t d_model, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
              double eps, py::list layers, py::array final_norm, py::tuple lm_head)
      : Base(F::kName, d_model, n_heads, n_kv_heads, head_dim, eps) {
    const int64_t q_w = this->q_width(), kv_w = this->kv_width();
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
    const std::vector<double> inv_freq = rope_inv_freq(rope_base, hd_);
    const int64_t cache_layer = R * max_len * kv_w;

    for (int64_t li = 0; li < L; ++li) {
      const Layer<Linear>& l = layers_[li];
      // self-attention
      rms_norm(xd, l.norm1, h.data(), R, threads);
      linear(l.qkv, h.data(), qkv.data(), R, false, threads);
      this->split_qkv(qkv.data(), R, q.data(), k.data(), v.data());
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
      AttentionProblem self = this->attention(q_rot.data(), kc + li * cache_layer,
                                              vc + li * cache_layer, o.data(), R, 1, max_len,
                                              threads);
      self.key_mask = kmask;
      self.kv_seqlens = after64.data();
      self.causal = true;
      attention_impl(self);
      linear(l.out, o.data(), y.data(), R, false, threads);
      F::add(xd, y.data(), R * d_);
      if (l.cross) {  // cross-attention: the R / B rows of one input fold into its query axis
        rms_norm(xd, l.norm2, h.data(), R, threads);
        linear(l.cross_q, h.data(), q.data(), R, false, threads);
        AttentionProblem cross_p = this->attention(q.data(), ckd[li], cvd[li], o.data(), batch,
                                                   R / batch, enc_len, threads);
        cross_p.key_mask = emask;
        attention_impl(cross_p);
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
  int64_t vocab_ = 0;
  std::vector<Layer<Linear>> layers_;
  const float* final_norm_ = nullptr;
  Linear lm_head_;
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
