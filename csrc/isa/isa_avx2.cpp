// Kernels for x86-64 with AVX2 + FMA: 32-byte vectors. Only the code below the target switch
// uses these instructions; cpu_dispatch.cpp calls it only where the CPU supports them.
#include "isa/isa_prelude.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

#define SAMSVAE_VEC_BYTES 32
#define SAMSVAE_ISA_NS avx2
#define SAMSVAE_ISA_NAME "avx2"
#include "isa/isa_body.h"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace samsvae {
namespace cpu {
const CpuKernels* kernels_avx2() { return &avx2::kTable; }
}  // namespace cpu
}  // namespace samsvae

#else
namespace samsvae {
namespace cpu {
const CpuKernels* kernels_avx2() { return nullptr; }
}  // namespace cpu
}  // namespace samsvae
#endif
