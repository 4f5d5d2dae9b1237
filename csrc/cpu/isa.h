// Instruction sets the CPU kernels are compiled for, and run-time selection.
#pragma once

#include <string>

namespace fastencdec::cpu {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kNeon = 3 };

const char* isa_name(Isa isa);

// ISAs this build contains kernels for, lowest first.
const char* compiled_isas();

// Best ISA that is compiled in and supported by this CPU, lowered to the one
// named by FASTENCDEC_CPU_ISA (scalar|avx2|avx512|neon) when that is set.
// Asking for an ISA the CPU or the build lacks raises std::invalid_argument.
Isa active_isa();

// Re-read FASTENCDEC_CPU_ISA (tests switch paths within one process).
void reset_isa();

bool cpu_supports(Isa isa);

// Whether the int8 kernels use AVX512-VNNI: the active ISA is avx512, the CPU has
// VNNI, and FASTENCDEC_CPU_VNNI is not "0" (tests run the plain AVX-512 path that way).
// Re-read by reset_isa() like the ISA.
bool use_vnni();

// Whether the bf16 kernels use AVX512_BF16 (vdpbf16ps): the active ISA is avx512, the
// CPU has it, and FASTENCDEC_CPU_BF16DOT is not "0". Re-read by reset_isa().
bool use_bf16_dot();

}  // namespace fastencdec::cpu
