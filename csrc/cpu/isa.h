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

}  // namespace fastencdec::cpu
