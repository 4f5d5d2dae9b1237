// Binding of the bf16 linear layer's kernel (kernels/bf16_linear.cpp).
#include "array_args.h"
#include "cpu/dispatch.h"
#include "cpu/isa.h"

namespace fastencdec::bind {

namespace {

using cpu::Bf16LinearProblem;

void bf16_linear_impl(const Bf16LinearProblem& p) { FED_DISPATCH(bf16_linear, p); }

// bf16 arrays arrive as uint16 views of their bits; out is uint16 (bf16) or float32.
void bf16_linear(py::array x, py::array weight, py::object bias, py::array out, bool gelu,
                 int num_threads) {
  Bf16LinearProblem p;
  p.x = checked_data<uint16_t>(x, "x", 2, false);
  p.weight = checked_data<uint16_t>(weight, "weight", 4, false);
  p.rows = x.shape(0);
  p.in_features = x.shape(1);
  p.out_f32 = out.dtype().is(py::dtype::of<float>());
  p.out = p.out_f32 ? static_cast<void*>(checked_data<float>(out, "out", 2, true))
                    : static_cast<void*>(checked_data<uint16_t>(out, "out", 2, true));
  p.out_features = out.shape(1);
  expect_shape(weight, "weight", {(p.out_features + 31) / 32, (p.in_features + 1) / 2, 32, 2});
  expect_dim(out, "out", 0, p.rows);
  p.bias = optional_vector<uint16_t>(bias, "bias", p.out_features);
  p.gelu = gelu;
  check_threads(num_threads);
  p.num_threads = num_threads;
  cpu::active_isa();
  py::gil_scoped_release release;
  bf16_linear_impl(p);
}

}  // namespace

void register_bf16_linear(py::module_& m) {
  m.def("bf16_linear", &bf16_linear, py::arg("x"), py::arg("weight"), py::arg("bias"),
        py::arg("out"), py::arg("gelu"), py::arg("num_threads"),
        "out [M, N] = act(x [M, K] bf16 times the packed bf16 weight [ceil(N/32), ceil(K/2), "
        "32, 2] (weight[p, q, c, r] = W[32p + c, 2q + r], zero padded) with fp32 sums, + "
        "bias[n] (bf16 [N] or None)); act GELU-tanh when gelu. bf16 arrays as uint16 bits; "
        "out uint16 (bf16, rounded to nearest even) or float32.");
  m.def("bf16_dot", &cpu::use_bf16_dot,
        "Whether the bf16 kernels use AVX512_BF16 (off with FASTENCDEC_CPU_BF16DOT=0).");
}

}  // namespace fastencdec::bind
