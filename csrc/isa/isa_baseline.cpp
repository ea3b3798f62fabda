// Kernels for the baseline ISA of the build (SSE2 on x86-64, NEON on arm64): 16-byte vectors.
#include "isa/isa_prelude.h"

#define SAMSVAE_VEC_BYTES 16
#define SAMSVAE_ISA_NS baseline
#define SAMSVAE_ISA_NAME "baseline"
#include "isa/isa_body.h"

namespace samsvae {
namespace cpu {
const CpuKernels* kernels_baseline() { return &baseline::kTable; }
}  // namespace cpu
}  // namespace samsvae
