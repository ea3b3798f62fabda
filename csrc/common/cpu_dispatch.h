// Runtime choice of the kernel ISA: the widest one the CPU supports, unless the environment
// variable SAMSVAE_CPU_ISA (baseline | avx2 | avx512) or set_cpu_isa() asks for another.
#pragma once

#include <string>
#include <vector>

#include "common/kernel_table.h"

namespace samsvae {
namespace cpu {

const CpuKernels& active_kernels();

// ISAs compiled in AND supported by this CPU, widest first.
std::vector<std::string> supported_isas();

// Selects an ISA by name ("auto" = widest supported). Returns "" on success, else the reason.
std::string set_cpu_isa(const std::string& name);

}  // namespace cpu
}  // namespace samsvae
