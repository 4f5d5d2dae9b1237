// Checked zero-copy views of numpy arrays (torch CPU tensors arrive through
// Tensor.numpy(), which shares memory). Every mismatch raises ValueError/TypeError
// through pybind11 instead of reading or writing out of bounds.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

namespace fastencdec::bind {

namespace py = pybind11;

inline std::string shape_str(const py::array& a) {
  std::string s = "[";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + "]";
}

template <typename T>
T* checked_data(py::array& a, const char* name, int ndim, bool writable) {
  if (!py::isinstance<py::array_t<T>>(a) || !a.dtype().is(py::dtype::of<T>()))
    throw py::type_error(std::string(name) + ": expected dtype " +
                         std::string(py::str(py::dtype::of<T>())) + ", got " +
                         std::string(py::str(a.dtype())));
  if (a.ndim() != ndim)
    throw py::value_error(std::string(name) + ": expected a " + std::to_string(ndim) +
                          "-D array, got shape " + shape_str(a));
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(std::string(name) + ": expected a C-contiguous array");
  if (writable && !a.writeable())
    throw py::value_error(std::string(name) + ": array is read-only");
  return static_cast<T*>(a.mutable_data());
}

inline void expect_dim(const py::array& a, const char* name, int dim, py::ssize_t expected) {
  if (a.shape(dim) != expected)
    throw py::value_error(std::string(name) + ": dimension " + std::to_string(dim) + " is " +
                          std::to_string(a.shape(dim)) + ", expected " + std::to_string(expected) +
                          " (shape " + shape_str(a) + ")");
}

inline void expect_shape(const py::array& a, const char* name,
                         std::initializer_list<py::ssize_t> dims) {
  int i = 0;
  for (py::ssize_t d : dims) expect_dim(a, name, i++, d);
}

// An optional argument must already be a numpy array: a converted temporary would
// be freed while the kernel still reads it.
inline py::array as_array(const py::object& o, const char* name) {
  if (!py::isinstance<py::array>(o))
    throw py::type_error(std::string(name) + ": expected a numpy array or None");
  return py::reinterpret_borrow<py::array>(o);
}

// An optional 1-D argument of n T values (a bias): its data, or null for None. The array
// is appended to keep (when given) so the pointer outlives the call that parsed it.
template <typename T>
const T* optional_vector(const py::object& o, const char* name, py::ssize_t n,
                         py::list* keep = nullptr) {
  if (o.is_none()) return nullptr;
  py::array a = as_array(o, name);
  const T* data = checked_data<T>(a, name, 1, false);
  expect_dim(a, name, 0, n);
  if (keep) keep->append(a);
  return data;
}

inline void check_threads(int num_threads) {
  if (num_threads < 1) throw py::value_error("num_threads must be >= 1");
}

// Defined in bindings_int8.cpp, bindings_bf16.cpp, bindings_decoder_step.cpp,
// bindings_blocks.cpp and bindings_peak.cpp.
void register_int8_linear(py::module_& m);
void register_bf16_linear(py::module_& m);
void register_decoder_step(py::module_& m);
void register_blocks(py::module_& m);
void register_dot_peak(py::module_& m);

}  // namespace fastencdec::bind
