// The whole encoder of an int8 or bf16 model in a single C++ call
// (fastencdec.models.encoder_pass): for every layer
//   x += out(attention(rope(q), rope(k), v)),  [q | k | v] = qkv(norm1(x))
//   x += fc2(gelu(fc1(norm2(x))))
// then states = final_norm(x). The same kernels, in the same order and on the same data,
// as the module path (models/layers.py Block.forward), so the states are bitwise the same
// (tested). What goes away is what lies between the kernels: ~20 ms of a mu-330m int8
// encoder pass at 512 tokens went to freshly allocated activations (page faults on
// every norm, projection and residual output), the q/k/v copies and the residual adds.
// Here every buffer is allocated once per call and the MLP runs on blocks of rows
// (rows are independent in every kernel), so its [rows, d_ff] hidden activations take
// at most kMlpRows rows whatever the batch.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "packed_layers.h"

namespace fastencdec::bind {

namespace {

constexpr int64_t kMlpRows = 512;

template <class Linear>
struct EncoderLayer {
  const float* norm1 = nullptr;
  const float* norm2 = nullptr;
  Linear qkv, out, fc1, fc2;
};

template <class F>
class Encoder : PackedLayers<F> {
  using Base = PackedLayers<F>;
  using Act = typename F::Act;
  using Linear = typename F::Linear;
  using Base::d_, Base::hq_, Base::hkv_, Base::hd_, Base::norm, Base::linear, Base::rms_norm;

 public:
  static constexpr const char* kName = F::kEncoderName;

  Encoder(int64_t d_model, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, double eps,
          py::list layers, py::array final_norm)
      : Base(kName, d_model, n_heads, n_kv_heads, head_dim, eps) {
    const int64_t q_w = this->q_width(), kv_w = this->kv_width();
    for (py::handle item : layers) {
      py::tuple t = py::reinterpret_borrow<py::tuple>(item);
      if (t.size() != 6)
        throw py::value_error(std::string(kName) + ": each layer is (norm1, qkv, out, norm2, "
                              "fc1, fc2)");
      EncoderLayer<Linear> l;
      l.norm1 = norm(t[0], "norm1");
      l.qkv = linear(t[1], "qkv", d_, q_w + 2 * kv_w);
      l.out = linear(t[2], "out", q_w, d_);
      l.norm2 = norm(t[3], "norm2");
      const int64_t d_ff = F::out_features(py::reinterpret_borrow<py::tuple>(t[4]));
      l.fc1 = linear(t[4], "fc1", d_, d_ff);
      l.fc2 = linear(t[5], "fc2", d_ff, d_);
      d_ff_ = std::max(d_ff_, d_ff);
      layers_.push_back(l);
    }
    final_norm_ = norm(final_norm, "final_norm");
  }

  int64_t n_layers() const { return int64_t(layers_.size()); }

  // x [B, L, d] (F::Act): the embedded input (read); key_mask bool [B, L] or None (True
  // = real token); positions int64 [P, L] with P 1 (shared) or B: the RoPE positions;
  // rope_base: the effective base; states [B, L, d] (out, may be x): the residual
  // stream while the layers run, then final_norm of it. bf16_attention: the attention's
  // products on bf16 operands (AttentionProblem::bf16_dot); false: as the module path.
  void forward(py::array x, py::object key_mask, py::array positions, double rope_base,
               py::array states, bool bf16_attention, int num_threads) {
    const Act* in = checked_data<Act>(x, "x", 3, false);
    const int64_t B = x.shape(0), L = x.shape(1);
    expect_dim(x, "x", 2, d_);
    Act* xd = checked_data<Act>(states, "states", 3, true);
    expect_shape(states, "states", {B, L, d_});
    const int64_t n = B * L * d_;
    if (xd != in && xd < in + n && in < xd + n)
      throw py::value_error("states must be x itself or not overlap it");
    const bool* mask = nullptr;
    if (!key_mask.is_none()) {
      py::array m = as_array(key_mask, "key_mask");
      mask = checked_data<bool>(m, "key_mask", 2, false);
      expect_shape(m, "key_mask", {B, L});
    }
    const int64_t* pos = checked_data<int64_t>(positions, "positions", 2, false);
    const int64_t pos_batch = positions.shape(0);
    if (pos_batch != 1 && pos_batch != B)
      throw py::value_error("positions: dimension 0 must be 1 or the batch size " +
                            std::to_string(B) + ", got " + std::to_string(pos_batch));
    expect_dim(positions, "positions", 1, L);
    if (!(rope_base > 0.0) || !std::isfinite(rope_base))
      throw py::value_error("rope_base must be a finite positive number");
    check_threads(num_threads);
    cpu::active_isa();
    const int64_t R = B * L;
    if (R == 0) return;

    py::gil_scoped_release release;
    const int threads = num_threads;
    const int64_t q_w = this->q_width(), kv_w = this->kv_width(), width = q_w + 2 * kv_w;
    const int64_t mlp_rows = std::min(R, kMlpRows);
    std::vector<Act> h(R * d_), qkv(R * width), q(R * q_w), k(R * kv_w), v(R * kv_w),
        o(R * q_w), y(R * d_), f(mlp_rows * d_ff_);
    const std::vector<double> inv_freq = rope_inv_freq(rope_base, hd_);
    if (xd != in) std::memcpy(xd, in, sizeof(Act) * n);
    cpu::AttentionProblem attn =
        this->attention(q.data(), k.data(), v.data(), o.data(), B, L, L, threads);
    attn.key_mask = mask;
    attn.positions = pos;
    attn.pos_batch = pos_batch;
    attn.inv_freq = inv_freq.data();
    attn.bf16_dot = bf16_attention;

    for (const EncoderLayer<Linear>& l : layers_) {
      rms_norm(xd, l.norm1, h.data(), R, threads);
      linear(l.qkv, h.data(), qkv.data(), R, false, threads);
      this->split_qkv(qkv.data(), R, q.data(), k.data(), v.data());
      attention_impl(attn);
      linear(l.out, o.data(), y.data(), R, false, threads);
      F::add(xd, y.data(), R * d_);
      for (int64_t r0 = 0; r0 < R; r0 += mlp_rows) {  // MLP (GELU in fc1's epilogue)
        const int64_t rows = std::min(mlp_rows, R - r0);
        Act* xr = xd + r0 * d_;
        rms_norm(xr, l.norm2, h.data(), rows, threads);
        linear(l.fc1, h.data(), f.data(), rows, true, threads);
        linear(l.fc2, f.data(), y.data(), rows, false, threads);
        F::add(xr, y.data(), rows * d_);
      }
    }
    rms_norm(xd, final_norm_, xd, R, threads);  // row by row: in place is safe
  }

 private:
  std::vector<EncoderLayer<Linear>> layers_;
  const float* final_norm_ = nullptr;
  int64_t d_ff_ = 0;
};

template <class F>
void register_encoder(py::module_& m, const char* doc) {
  using E = Encoder<F>;
  py::class_<E>(m, E::kName, doc)
      .def(py::init<int64_t, int64_t, int64_t, int64_t, double, py::list, py::array>(),
           py::arg("d_model"), py::arg("n_heads"), py::arg("n_kv_heads"), py::arg("head_dim"),
           py::arg("eps"), py::arg("layers"), py::arg("final_norm"))
      .def_property_readonly("n_layers", &E::n_layers)
      .def("forward", &E::forward, py::arg("x"), py::arg("key_mask"), py::arg("positions"),
           py::arg("rope_base"), py::arg("states"), py::arg("bf16_attention"),
           py::arg("num_threads"));
}

}  // namespace

void register_encoder(py::module_& m) {
  register_encoder<Int8Format>(m, "The encoder of an int8 model in a single call (fp32 "
                                  "activations).");
  register_encoder<Bf16Format>(m, "The encoder of a bf16 model in a single call (bf16 "
                                  "activations).");
}

}  // namespace fastencdec::bind
