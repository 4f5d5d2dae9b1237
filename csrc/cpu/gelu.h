// GELU with the tanh approximation, as torch's gelu(approximate="tanh"), on VecF:
//   0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))),  tanh(u) = 1 - 2 / (exp(2u) + 1)
// (exp2 saturates, so large |u| give exactly +-1; NaN stays NaN). Include after vec.h.
#pragma once

#include "vec.h"

namespace fastencdec::cpu::FED_ISA_NS {

inline VecF gelu_tanh(VecF x) {
  const VecF u = VecF::set1(0.7978845608028654f) *
                 VecF::fmadd(VecF::set1(0.044715f) * x, x * x, x);
  const VecF e = VecF::exp2(u * VecF::set1(2.0f * 1.4426950408889634f));
  const VecF t = VecF::set1(1.0f) - VecF::set1(2.0f) / (e + VecF::set1(1.0f));
  return VecF::set1(0.5f) * x * (VecF::set1(1.0f) + t);
}

}  // namespace fastencdec::cpu::FED_ISA_NS
