// A stack of pre-norm blocks of an int8 or bf16 model in a single C++ call: for every
// layer
//   x += out(attention(rope(q), rope(k), v)),  [q | k | v] = qkv(norm1(x))
//   x += fc2(gelu(fc1(norm2(x))))
// as the encoder (encode: bidirectional, then final_norm; fastencdec.models.encoder_pass)
// or as a decoder-only prompt (prefill: causal, rotated keys and values written to the
// KV cache; fastencdec.models.decoder_prefill). The same kernels, in the same order and
// on the same data, as the module path (models/layers.py Block.forward / Block.prefill),
// so the results are bitwise the same (tested). What goes away is what lies between the
// kernels: ~20 ms of a mu-330m int8 encoder pass at 512 tokens went to freshly
// allocated activations (page faults on every norm, projection and residual output),
// the q/k/v copies and the residual adds. Here every buffer is allocated once per call
// and the MLP runs on blocks of rows (rows are independent in every kernel), so its
// [rows, d_ff] hidden activations take at most kMlpRows rows whatever the batch.
// The encoder may also take the attention's products on bf16 operands
// (AttentionProblem::bf16_dot), which the module path does not.
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
struct BlockLayer {
  const float* norm1 = nullptr;
  const float* norm2 = nullptr;
  Linear qkv, out, fc1, fc2;
};

template <class F>
class Blocks : PackedLayers<F> {
  using Base = PackedLayers<F>;
  using Act = typename F::Act;
  using Linear = typename F::Linear;
  using Base::d_, Base::hq_, Base::hkv_, Base::hd_, Base::norm, Base::linear, Base::rms_norm;

 public:
  static constexpr const char* kName = F::kBlocksName;

  Blocks(int64_t d_model, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, double eps,
          py::list layers, py::array final_norm)
      : Base(kName, d_model, n_heads, n_kv_heads, head_dim, eps) {
    const int64_t q_w = this->q_width(), kv_w = this->kv_width();
    for (py::handle item : layers) {
      py::tuple t = py::reinterpret_borrow<py::tuple>(item);
      if (t.size() != 6)
        throw py::value_error(std::string(kName) + ": each layer is (norm1, qkv, out, norm2, "
                              "fc1, fc2)");
      BlockLayer<Linear> l;
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

  // The encoder. x [B, L, d] (F::Act): the embedded input (read); key_mask bool [B, L]
  // or None (True = real token); positions int64 [P, L] with P 1 (shared) or B: the RoPE
  // positions; rope_base: the effective base; states [B, L, d] (out, may be x): the
  // residual stream while the layers run, then final_norm of it. bf16_attention: the
  // attention's products on bf16 operands (AttentionProblem::bf16_dot); false: as the
  // module path.
  void encode(py::array x, py::object key_mask, py::array positions, double rope_base,
              py::array states, bool bf16_attention, int num_threads) {
    Run r = begin(x, key_mask, rope_base, states, num_threads);
    r.pos = checked_data<int64_t>(positions, "positions", 2, false);
    r.pos_batch = positions.shape(0);
    if (r.pos_batch != 1 && r.pos_batch != r.B)
      throw py::value_error("positions: dimension 0 must be 1 or the batch size " +
                            std::to_string(r.B) + ", got " + std::to_string(r.pos_batch));
    expect_dim(positions, "positions", 1, r.L);
    r.bf16_dot = bf16_attention;
    r.final_norm = true;
    run(r);
  }

  // A decoder-only prompt. x [B, L, d]: the embedded prompts, real tokens first (read);
  // key_mask bool [B, L] or None; RoPE at positions 0..L-1 with rope_base; k_cache /
  // v_cache [n_layers, R, Lmax, Hkv, D] (F::Act) with R = n * B: rows 0..L-1 of cache
  // rows b * n .. b * n + n - 1 receive prompt b's rotated keys and values; states
  // [B, L, d] out: the last layer's residual stream (no final norm).
  void prefill(py::array x, py::object key_mask, double rope_base, py::array k_cache,
               py::array v_cache, py::array states, int num_threads) {
    Run r = begin(x, key_mask, rope_base, states, num_threads);
    r.kc = checked_data<Act>(k_cache, "k_cache", 5, true);
    r.vc = checked_data<Act>(v_cache, "v_cache", 5, true);
    r.cache_rows = k_cache.shape(1);
    r.max_len = k_cache.shape(2);
    expect_shape(k_cache, "k_cache", {n_layers(), r.cache_rows, r.max_len, hkv_, hd_});
    expect_shape(v_cache, "v_cache", {n_layers(), r.cache_rows, r.max_len, hkv_, hd_});
    if (r.B < 1 || r.cache_rows < r.B || r.cache_rows % r.B)
      throw py::value_error("k_cache: dimension 1 (" + std::to_string(r.cache_rows) +
                            " rows) must be a positive multiple of the batch " +
                            std::to_string(r.B));
    if (r.L > r.max_len)
      throw py::value_error("k_cache: dimension 2 (" + std::to_string(r.max_len) +
                            ") is shorter than the prompts (" + std::to_string(r.L) + ")");
    r.causal = true;
    run(r);
  }

 private:
  struct Run {
    const Act* in = nullptr;
    Act* x = nullptr;
    int64_t B = 0, L = 0;
    const bool* mask = nullptr;
    const int64_t* pos = nullptr;  // null: 0..L-1
    int64_t pos_batch = 1;
    double rope_base = 0;
    bool causal = false, bf16_dot = false, final_norm = false;
    Act *kc = nullptr, *vc = nullptr;  // prefill: the KV caches
    int64_t cache_rows = 0, max_len = 0;
    int threads = 1;
  };

  Run begin(py::array& x, const py::object& key_mask, double rope_base, py::array& states,
            int num_threads) {
    Run r;
    r.in = checked_data<Act>(x, "x", 3, false);
    r.B = x.shape(0);
    r.L = x.shape(1);
    expect_dim(x, "x", 2, d_);
    r.x = checked_data<Act>(states, "states", 3, true);
    expect_shape(states, "states", {r.B, r.L, d_});
    const int64_t n = r.B * r.L * d_;
    if (r.x != r.in && r.x < r.in + n && r.in < r.x + n)
      throw py::value_error("states must be x itself or not overlap it");
    if (!key_mask.is_none()) {
      py::array m = as_array(key_mask, "key_mask");
      r.mask = checked_data<bool>(m, "key_mask", 2, false);
      expect_shape(m, "key_mask", {r.B, r.L});
    }
    if (!(rope_base > 0.0) || !std::isfinite(rope_base))
      throw py::value_error("rope_base must be a finite positive number");
    r.rope_base = rope_base;
    check_threads(num_threads);
    r.threads = num_threads;
    cpu::active_isa();
    return r;
  }

  void run(const Run& r) const {
    const int64_t R = r.B * r.L;
    if (R == 0) return;
    py::gil_scoped_release release;
    const int threads = r.threads;
    const int64_t q_w = this->q_width(), kv_w = this->kv_width(), width = q_w + 2 * kv_w;
    const int64_t mlp_rows = std::min(R, kMlpRows);
    std::vector<Act> h(R * d_), qkv(R * width), q(R * q_w), k(R * kv_w), v(R * kv_w),
        o(R * q_w), y(R * d_), f(mlp_rows * d_ff_);
    const std::vector<double> inv_freq = rope_inv_freq(r.rope_base, hd_);
    std::vector<int64_t> arange;  // positions 0..L-1 (per row when the cache needs them)
    if (r.pos == nullptr || r.kc != nullptr)
      for (int64_t b = 0; b < (r.kc ? r.B : 1); ++b)
        for (int64_t t = 0; t < r.L; ++t) arange.push_back(t);
    std::vector<float> k_rot(r.kc ? R * kv_w : 0);
    if (r.x != r.in) std::memcpy(r.x, r.in, sizeof(Act) * R * d_);
    cpu::AttentionProblem attn =
        this->attention(q.data(), k.data(), v.data(), o.data(), r.B, r.L, r.L, threads);
    attn.key_mask = r.mask;
    attn.positions = r.pos ? r.pos : arange.data();
    attn.pos_batch = r.pos ? r.pos_batch : 1;
    attn.inv_freq = inv_freq.data();
    attn.causal = r.causal;
    attn.bf16_dot = r.bf16_dot;

    Act* xd = r.x;
    for (int64_t li = 0; li < n_layers(); ++li) {
      const BlockLayer<Linear>& l = layers_[li];
      rms_norm(xd, l.norm1, h.data(), R, threads);
      linear(l.qkv, h.data(), qkv.data(), R, false, threads);
      this->split_qkv(qkv.data(), R, q.data(), k.data(), v.data());
      attention_impl(attn);
      if (r.kc) write_cache(r, li, k.data(), v.data(), arange.data(), inv_freq.data(),
                            k_rot.data());
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
    if (r.final_norm) rms_norm(xd, final_norm_, xd, R, threads);  // row by row: in place is safe
  }

  // Layer li's keys, rotated as the module path's ops.apply_rope does (the fp32 kernel;
  // bf16 keys widened first and rounded once after), and its values into rows 0..L-1 of
  // each prompt's n cache rows.
  void write_cache(const Run& r, int64_t li, const Act* k, const Act* v, const int64_t* pos,
                   const double* inv_freq, float* k_rot) const {
    const int64_t R = r.B * r.L, kv_w = this->kv_width(), per_prompt = r.cache_rows / r.B;
    for (int64_t i = 0; i < R * kv_w; ++i) k_rot[i] = F::widen(k[i]);
    apply_rope_impl(k_rot, k_rot, pos, inv_freq, R, hkv_, hd_, r.threads);
    const int64_t layer = li * r.cache_rows * r.max_len * kv_w;
    for (int64_t b = 0; b < r.B; ++b)
      for (int64_t c = 0; c < per_prompt; ++c) {
        const int64_t row = layer + (b * per_prompt + c) * r.max_len * kv_w;
        for (int64_t t = 0; t < r.L; ++t) {
          const int64_t src = (b * r.L + t) * kv_w;
          Act* kd = r.kc + row + t * kv_w;
          for (int64_t e = 0; e < kv_w; ++e) kd[e] = F::narrow(k_rot[src + e]);
          std::memcpy(r.vc + row + t * kv_w, v + src, sizeof(Act) * kv_w);
        }
      }
  }

 private:
  std::vector<BlockLayer<Linear>> layers_;
  const float* final_norm_ = nullptr;
  int64_t d_ff_ = 0;
};

template <class F>
void register_blocks(py::module_& m, const char* doc) {
  using E = Blocks<F>;
  py::class_<E>(m, E::kName, doc)
      .def(py::init<int64_t, int64_t, int64_t, int64_t, double, py::list, py::array>(),
           py::arg("d_model"), py::arg("n_heads"), py::arg("n_kv_heads"), py::arg("head_dim"),
           py::arg("eps"), py::arg("layers"), py::arg("final_norm"))
      .def_property_readonly("n_layers", &E::n_layers)
      .def("encode", &E::encode, py::arg("x"), py::arg("key_mask"), py::arg("positions"),
           py::arg("rope_base"), py::arg("states"), py::arg("bf16_attention"),
           py::arg("num_threads"))
      .def("prefill", &E::prefill, py::arg("x"), py::arg("key_mask"), py::arg("rope_base"),
           py::arg("k_cache"), py::arg("v_cache"), py::arg("states"), py::arg("num_threads"));
}

}  // namespace

void register_blocks(py::module_& m) {
  register_blocks<Int8Format>(m, "Pre-norm blocks of an int8 model in a single call (fp32 "
                                 "activations): an encoder or a decoder-only prompt.");
  register_blocks<Bf16Format>(m, "Pre-norm blocks of a bf16 model in a single call (bf16 "
                                 "activations): an encoder or a decoder-only prompt.");
}

}  // namespace fastencdec::bind
