// Checked zero-copy views of numpy arrays (torch CPU tensors arrive through
// Tensor.numpy(), which shares memory). Every mismatch raises ValueError/TypeError
// through pybind11 instead of reading or writing out of bounds.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
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

}  // namespace fastencdec::bind
