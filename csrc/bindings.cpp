// pybind11 module fastencdec._C: the CPU kernels. The Python side (fastencdec.ops)
// validates torch tensors first; these bindings check again what memory safety
// depends on (dtypes, shapes, contiguity, index ranges), release the GIL, and
// dispatch to the ISA chosen at run time.
#include <pybind11/pybind11.h>

#include <cmath>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "array_args.h"
#include "cpu/dispatch.h"
#include "cpu/isa.h"
#include "cpu/parallel.h"

namespace py = pybind11;
using fastencdec::bind::checked_data;
using fastencdec::bind::as_array;
using fastencdec::bind::check_threads;
using fastencdec::bind::expect_dim;
using fastencdec::bind::expect_shape;
using fastencdec::cpu::AttentionProblem;
using fastencdec::cpu::RmsNormProblem;
using fastencdec::cpu::AppendKvCacheProblem;
using fastencdec::cpu::Storage;

namespace {

void apply_rope_impl(const float* x, float* out, const int64_t* pos, const double* inv_freq,
                     int64_t rows, int64_t heads, int64_t head_dim, int threads) {
  FED_DISPATCH(apply_rope, x, out, pos, inv_freq, rows, heads, head_dim, threads);
}

void attention_impl(const AttentionProblem& p) { FED_DISPATCH(attention_forward, p); }

void append_kv_cache_impl(const AppendKvCacheProblem& p) { FED_DISPATCH(append_kv_cache, p); }

void rms_norm_impl(const RmsNormProblem& p) { FED_DISPATCH(rms_norm, p); }

std::vector<double> rope_inv_freq(double base, int64_t head_dim) {
  if (!(base > 0.0) || !std::isfinite(base))
    throw py::value_error("rope base must be a finite positive number");
  std::vector<double> inv_freq(head_dim / 2);
  for (int64_t i = 0; i < head_dim / 2; ++i)
    inv_freq[i] = std::pow(base, -static_cast<double>(2 * i) / static_cast<double>(head_dim));
  return inv_freq;
}

void check_rope_dim(int64_t head_dim) {
  if (head_dim % 2)
    throw py::value_error("head_dim must be even for RoPE, got " + std::to_string(head_dim));
}

void apply_rope(py::array x, py::array positions, double base, py::array out, bool inverse,
                int num_threads) {
  float* xd = checked_data<float>(x, "x", 3, false);
  const int64_t* pd = checked_data<int64_t>(positions, "positions", 1, false);
  float* od = checked_data<float>(out, "out", 3, true);
  const int64_t rows = x.shape(0), heads = x.shape(1), head_dim = x.shape(2);
  expect_dim(positions, "positions", 0, rows);
  for (int d = 0; d < 3; ++d) expect_dim(out, "out", d, x.shape(d));
  check_rope_dim(head_dim);
  check_threads(num_threads);
  std::vector<double> inv_freq = rope_inv_freq(base, head_dim);
  if (inverse)  // rotating by -angle is the transpose of the rotation
    for (double& f : inv_freq) f = -f;
  // Resolve the ISA (may throw on a bad FASTENCDEC_CPU_ISA) while holding the GIL.
  fastencdec::cpu::active_isa();
  py::gil_scoped_release release;
  apply_rope_impl(xd, od, pd, inv_freq.data(), rows, heads, head_dim, num_threads);
}

// ---- attention -------------------------------------------------------------

Storage parse_storage(const std::string& name) {
  if (name == "float32") return Storage::kF32;
  if (name == "bfloat16") return Storage::kBF16;
  if (name == "float16") return Storage::kF16;
  throw py::value_error("storage must be 'float32', 'bfloat16' or 'float16', got '" + name + "'");
}

// fp32 tensors arrive as float32 arrays, bf16/fp16 as uint16 views of their bits.
void* storage_data(py::array& a, Storage st, const char* name, bool writable) {
  if (st == Storage::kF32) return checked_data<float>(a, name, 4, writable);
  return checked_data<uint16_t>(a, name, 4, writable);
}

// q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D], out like q; fills the shape fields.
void attention_arrays(AttentionProblem& p, py::array& q, py::array& k, py::array& v,
                      py::array& out, const char* k_name, const char* v_name) {
  p.q = storage_data(q, p.storage, "q", false);
  p.k = storage_data(k, p.storage, k_name, false);
  p.v = storage_data(v, p.storage, v_name, false);
  p.out = storage_data(out, p.storage, "out", true);
  p.batch = q.shape(0);
  p.q_len = q.shape(1);
  p.q_heads = q.shape(2);
  p.head_dim = q.shape(3);
  p.kv_len = k.shape(1);
  p.kv_heads = k.shape(2);
  expect_dim(k, k_name, 0, p.batch);
  expect_dim(k, k_name, 3, p.head_dim);
  expect_shape(v, v_name, {k.shape(0), k.shape(1), k.shape(2), k.shape(3)});
  expect_shape(out, "out", {q.shape(0), q.shape(1), q.shape(2), q.shape(3)});
  if (p.kv_heads < 1 || p.q_heads % p.kv_heads != 0)
    throw py::value_error("q has " + std::to_string(p.q_heads) + " heads and " + k_name + " has " +
                          std::to_string(p.kv_heads) +
                          ": n_heads must be a positive multiple of n_kv_heads");
}

void set_key_mask(AttentionProblem& p, const py::object& mask) {
  if (mask.is_none()) return;
  py::array m = as_array(mask, "key_padding_mask");
  p.key_mask = checked_data<bool>(m, "key_padding_mask", 2, false);
  expect_shape(m, "key_padding_mask", {p.batch, p.kv_len});
}

void set_scale(AttentionProblem& p, double scale) {
  if (!std::isfinite(scale)) throw py::value_error("scale must be finite");
  p.scale = static_cast<float>(scale);
}

void run_attention(AttentionProblem& p, int num_threads) {
  check_threads(num_threads);
  p.num_threads = num_threads;
  fastencdec::cpu::active_isa();  // may throw on a bad FASTENCDEC_CPU_ISA: keep the GIL
  py::gil_scoped_release release;
  attention_impl(p);
}

// Integer index arrays (positions, cache lengths) may be int64 (used in place) or
// int32 (widened into `storage`).
const int64_t* index_data(py::array& a, const char* name, int ndim, std::vector<int64_t>& storage) {
  if (py::isinstance<py::array_t<int32_t>>(a) && a.dtype().is(py::dtype::of<int32_t>())) {
    const int32_t* d = checked_data<int32_t>(a, name, ndim, false);
    storage.assign(d, d + a.size());
    return storage.data();
  }
  if (!a.dtype().is(py::dtype::of<int64_t>()))
    throw py::type_error(std::string(name) + ": expected dtype int64 or int32, got " +
                         std::string(py::str(a.dtype())));
  return checked_data<int64_t>(a, name, ndim, false);
}

// cache_seqlens [B] with every value in [0, Lmax - extra].
const int64_t* checked_seqlens(py::array& lens, int64_t batch, int64_t max_len, int64_t extra,
                               std::vector<int64_t>& storage) {
  const int64_t* d = index_data(lens, "cache_seqlens", 1, storage);
  expect_dim(lens, "cache_seqlens", 0, batch);
  for (int64_t b = 0; b < batch; ++b) {
    if (d[b] < 0 || d[b] + extra > max_len) {
      const std::string at = "cache_seqlens[" + std::to_string(b) + "] = " + std::to_string(d[b]);
      if (extra > 0 && d[b] >= 0)
        throw py::value_error(at + " plus " + std::to_string(extra) +
                              " new tokens exceeds the cache length " + std::to_string(max_len));
      throw py::value_error(at + ": cache_seqlens values must lie in [0, " +
                            std::to_string(max_len - extra) + "] (the cache length " +
                            std::to_string(max_len) + ")");
    }
  }
  return d;
}

void self_attention(py::array q, py::array k, py::array v, py::array out,
                    py::object key_padding_mask, py::object positions, bool causal, double scale,
                    double rope_base, const std::string& storage, int num_threads,
                    bool bf16_dot) {
  AttentionProblem p;
  p.storage = parse_storage(storage);
  p.bf16_dot = bf16_dot;
  attention_arrays(p, q, k, v, out, "k", "v");
  expect_dim(k, "k", 1, p.q_len);
  set_key_mask(p, key_padding_mask);
  set_scale(p, scale);
  p.causal = causal;
  std::vector<double> inv_freq;
  std::vector<int64_t> pos32;
  if (!positions.is_none()) {
    py::array pos = as_array(positions, "positions");
    p.positions = index_data(pos, "positions", 2, pos32);
    p.pos_batch = pos.shape(0);
    if (p.pos_batch != 1 && p.pos_batch != p.batch)
      throw py::value_error("positions: dimension 0 must be 1 or the batch size " +
                            std::to_string(p.batch) + ", got " + std::to_string(p.pos_batch));
    expect_dim(pos, "positions", 1, p.q_len);
    check_rope_dim(p.head_dim);
    inv_freq = rope_inv_freq(rope_base, p.head_dim);
    p.inv_freq = inv_freq.data();
  }
  run_attention(p, num_threads);
}

void cross_attention(py::array q, py::array k, py::array v, py::array out,
                     py::object key_padding_mask, double scale, const std::string& storage,
                     int num_threads) {
  AttentionProblem p;
  p.storage = parse_storage(storage);
  attention_arrays(p, q, k, v, out, "k", "v");
  set_key_mask(p, key_padding_mask);
  set_scale(p, scale);
  run_attention(p, num_threads);
}

void decode_attention(py::array q, py::array k_cache, py::array v_cache, py::array cache_seqlens,
                      py::object key_padding_mask, py::array out, double scale,
                      const std::string& storage, int num_threads) {
  AttentionProblem p;
  p.storage = parse_storage(storage);
  attention_arrays(p, q, k_cache, v_cache, out, "k_cache", "v_cache");
  std::vector<int64_t> lens32;
  p.kv_seqlens = checked_seqlens(cache_seqlens, p.batch, p.kv_len, 0, lens32);
  set_key_mask(p, key_padding_mask);
  p.causal = true;
  set_scale(p, scale);
  run_attention(p, num_threads);
}

void append_kv_cache(py::array q, py::array k, py::array v, py::array k_cache, py::array v_cache,
                     py::array cache_seqlens, py::object q_out, bool rope, double rope_base,
                     const std::string& storage, int num_threads) {
  AppendKvCacheProblem p;
  p.storage = parse_storage(storage);
  p.q = storage_data(q, p.storage, "q", false);
  p.k = storage_data(k, p.storage, "k", false);
  p.v = storage_data(v, p.storage, "v", false);
  p.k_cache = storage_data(k_cache, p.storage, "k_cache", true);
  p.v_cache = storage_data(v_cache, p.storage, "v_cache", true);
  p.batch = q.shape(0);
  p.new_len = q.shape(1);
  p.q_heads = q.shape(2);
  p.head_dim = q.shape(3);
  p.kv_heads = k.shape(2);
  p.max_len = k_cache.shape(1);
  expect_shape(k, "k", {p.batch, p.new_len, p.kv_heads, p.head_dim});
  expect_shape(v, "v", {p.batch, p.new_len, p.kv_heads, p.head_dim});
  expect_shape(k_cache, "k_cache", {p.batch, p.max_len, p.kv_heads, p.head_dim});
  expect_shape(v_cache, "v_cache", {p.batch, p.max_len, p.kv_heads, p.head_dim});
  std::vector<int64_t> lens32;
  p.cache_seqlens = checked_seqlens(cache_seqlens, p.batch, p.max_len, p.new_len, lens32);
  std::vector<double> inv_freq;
  if (rope) {
    check_rope_dim(p.head_dim);
    inv_freq = rope_inv_freq(rope_base, p.head_dim);
    p.inv_freq = inv_freq.data();
    if (q_out.is_none()) throw py::value_error("q_out is required when rope is True");
    py::array qo = as_array(q_out, "q_out");
    p.q_out = storage_data(qo, p.storage, "q_out", true);
    expect_shape(qo, "q_out", {q.shape(0), q.shape(1), q.shape(2), q.shape(3)});
  }
  check_threads(num_threads);
  p.num_threads = num_threads;
  fastencdec::cpu::active_isa();
  py::gil_scoped_release release;
  append_kv_cache_impl(p);
}

void rms_norm(py::array x, py::array weight, py::array out, double eps,
              const std::string& storage, int num_threads) {
  RmsNormProblem p;
  p.storage = parse_storage(storage);
  if (p.storage == fastencdec::cpu::Storage::kF32) {
    p.x = checked_data<float>(x, "x", 2, false);
    p.out = checked_data<float>(out, "out", 2, true);
  } else {
    p.x = checked_data<uint16_t>(x, "x", 2, false);
    p.out = checked_data<uint16_t>(out, "out", 2, true);
  }
  p.rows = x.shape(0);
  p.dim = x.shape(1);
  expect_shape(out, "out", {p.rows, p.dim});
  p.weight = checked_data<float>(weight, "weight", 1, false);
  expect_dim(weight, "weight", 0, p.dim);
  if (!std::isfinite(eps) || eps < 0.0) throw py::value_error("eps must be finite and >= 0");
  p.eps = static_cast<float>(eps);
  check_threads(num_threads);
  p.num_threads = num_threads;
  fastencdec::cpu::active_isa();
  py::gil_scoped_release release;
  rms_norm_impl(p);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastencdec CPU kernels (C++17, OpenMP, run-time ISA dispatch)";
  m.def("apply_rope", &apply_rope, py::arg("x"), py::arg("positions"), py::arg("base"),
        py::arg("out"), py::arg("inverse"), py::arg("num_threads"),
        "RoPE (rotate-half) on fp32 x [rows, heads, head_dim] at int64 positions [rows]; "
        "writes out (may be x). inverse: rotate the other way (the transpose).");
  m.def("self_attention", &self_attention, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("out"), py::arg("key_padding_mask"), py::arg("positions"), py::arg("causal"),
        py::arg("scale"), py::arg("rope_base"), py::arg("storage"), py::arg("num_threads"),
        py::arg("bf16_dot") = false,
        "Self-attention of q [B, L, Hq, D] with k/v [B, L, Hkv, D] into out [B, L, Hq, D]. "
        "key_padding_mask: bool [B, L] or None. positions: int64/int32 [1 or B, L] for fused RoPE "
        "with rope_base, or None for no RoPE. storage: 'float32' (float32 arrays) or "
        "'bfloat16'/'float16' (uint16 arrays of the bits). bf16_dot: bf16 operands "
        "(q, k after RoPE, v, probabilities), fp32 sums (AttentionProblem::bf16_dot).");
  m.def("cross_attention", &cross_attention, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("out"), py::arg("key_padding_mask"), py::arg("scale"), py::arg("storage"),
        py::arg("num_threads"),
        "Attention of q [B, Lq, Hq, D] over k/v [B, Lk, Hkv, D] (no RoPE, not causal); "
        "key_padding_mask: bool [B, Lk] or None.");
  m.def("decode_attention", &decode_attention, py::arg("q"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("cache_seqlens"), py::arg("key_padding_mask"), py::arg("out"),
        py::arg("scale"), py::arg("storage"), py::arg("num_threads"),
        "q [B, T, Hq, D] against caches [B, Lmax, Hkv, D] with int64/int32 cache_seqlens [B] "
        "(valid rows, new ones included); query t sees keys j <= len - T + t, and only keys "
        "with key_padding_mask[b, j] (bool [B, Lmax]) when a mask is given.");
  m.def("append_kv_cache", &append_kv_cache, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("k_cache"), py::arg("v_cache"), py::arg("cache_seqlens"), py::arg("q_out"),
        py::arg("rope"), py::arg("rope_base"), py::arg("storage"), py::arg("num_threads"),
        "RoPE on new q/k [B, T, H*, D] at positions cache_seqlens[b] + t; writes k, v into "
        "the caches [B, Lmax, Hkv, D] in place and rotated q into q_out (when rope).");
  m.def("rms_norm", &rms_norm, py::arg("x"), py::arg("weight"), py::arg("out"), py::arg("eps"),
        py::arg("storage"), py::arg("num_threads"),
        "RMSNorm of x [rows, dim] (storage dtype) with fp32 weight [dim] into out (same "
        "shape and storage), computed in fp32.");
  fastencdec::bind::register_int8_linear(m);
  fastencdec::bind::register_bf16_linear(m);
  fastencdec::bind::register_decoder_step(m);
  fastencdec::bind::register_blocks(m);
  fastencdec::bind::register_dot_peak(m);
  m.def("active_isa", [] { return std::string(fastencdec::cpu::isa_name(fastencdec::cpu::active_isa())); },
        "ISA the kernels run with (honours FASTENCDEC_CPU_ISA).");
  m.def("reset_isa", &fastencdec::cpu::reset_isa,
        "Re-read FASTENCDEC_CPU_ISA (and FASTENCDEC_CPU_VNNI, FASTENCDEC_CPU_BF16DOT).");
  m.def("int8_vnni", &fastencdec::cpu::use_vnni,
        "Whether the int8 kernels use AVX512-VNNI (off with FASTENCDEC_CPU_VNNI=0).");
  m.def("compiled_isas", [] { return std::string(fastencdec::cpu::compiled_isas()); });
  m.def("cpu_supports", [](const std::string& name) {
    for (auto isa : {fastencdec::cpu::Isa::kScalar, fastencdec::cpu::Isa::kAvx2,
                     fastencdec::cpu::Isa::kAvx512, fastencdec::cpu::Isa::kNeon})
      if (name == fastencdec::cpu::isa_name(isa)) return fastencdec::cpu::cpu_supports(isa);
    throw py::value_error("unknown ISA name: " + name);
  });
  m.def("openmp", &fastencdec::cpu::openmp_enabled, "Whether the module was built with OpenMP.");
  m.def("hardware_threads", [] { return static_cast<int>(std::thread::hardware_concurrency()); });
}
