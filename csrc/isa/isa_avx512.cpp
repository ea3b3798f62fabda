// Kernels for x86-64 with AVX-512 (F, DQ, BW, VL) + FMA: 64-byte vectors. Only the code below
// the target switch uses these instructions; cpu_dispatch.cpp calls it only where the CPU
// supports them.
#include "isa/isa_prelude.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#if defined(__clang__)
#pragma clang attribute push(                                                 \
    __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma"))), \
    apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")
#endif

#define SAMSVAE_VEC_BYTES 64
#define SAMSVAE_ISA_NS avx512
#define SAMSVAE_ISA_NAME "avx512"
#include "isa/isa_body.h"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace samsvae {
namespace cpu {
const CpuKernels* kernels_avx512() { return &avx512::kTable; }
}  // namespace cpu
}  // namespace samsvae

#else
namespace samsvae {
namespace cpu {
const CpuKernels* kernels_avx512() { return nullptr; }
}  // namespace cpu
}  // namespace samsvae
#endif
