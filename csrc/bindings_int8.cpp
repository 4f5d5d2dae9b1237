// Binding of the int8 linear layer's kernel (kernels/int8_linear.cpp).
#include "array_args.h"
#include "cpu/dispatch.h"
#include "cpu/isa.h"

namespace fastencdec::bind {

namespace {

using cpu::Int8LinearProblem;

void int8_linear_impl(const Int8LinearProblem& p) { FED_DISPATCH(int8_linear, p); }

void int8_linear(py::array x, py::array weight, py::array weight_scale,
                 py::object bias, py::array out, bool gelu, int num_threads) {
  Int8LinearProblem p;
  p.x = checked_data<float>(x, "x", 2, false);
  p.weight = checked_data<int8_t>(weight, "weight", 4, false);
  p.weight_scale = checked_data<float>(weight_scale, "weight_scale", 1, false);
  p.out = checked_data<float>(out, "out", 2, true);
  p.rows = x.shape(0);
  p.in_features = x.shape(1);
  p.out_features = weight_scale.shape(0);
  if (p.in_features > cpu::kInt8MaxK)
    throw py::value_error("int8_linear: in_features " + std::to_string(p.in_features) +
                          " is above " + std::to_string(cpu::kInt8MaxK) +
                          " (int32 sums would overflow)");
  const int64_t panels = (p.out_features + 31) / 32;
  expect_shape(weight, "weight", {panels, (p.in_features + 3) / 4, 32, 4});
  expect_shape(out, "out", {p.rows, p.out_features});
  p.bias = optional_vector<float>(bias, "bias", p.out_features);
  p.gelu = gelu;
  check_threads(num_threads);
  p.num_threads = num_threads;
  cpu::active_isa();
  py::gil_scoped_release release;
  int8_linear_impl(p);
}

}  // namespace

void register_int8_linear(py::module_& m) {
  m.def("int8_linear", &int8_linear, py::arg("x"), py::arg("weight"),
        py::arg("weight_scale"), py::arg("bias"), py::arg("out"), py::arg("gelu"),
        py::arg("num_threads"),
        "out [M, N] = act(x [M, K] fp32, each row quantised to int8 on its own grid "
        "(max |x| / 127), times the packed int8 weight [ceil(N/32), ceil(K/4), 32, 4] "
        "(weight[p, q, c, r] = W[32p + c, 4q + r], zero padded) with exact int32 sums, "
        "* row scale * weight_scale[n] + bias[n]); act GELU-tanh when gelu.");
}

}  // namespace fastencdec::bind
