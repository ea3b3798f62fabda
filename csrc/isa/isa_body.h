// The kernels of one ISA. Included by csrc/isa/isa_*.cpp after the ISA switch, with
// SAMSVAE_VEC_BYTES, SAMSVAE_ISA_NS (namespace) and SAMSVAE_ISA_NAME defined.
// No include guard: each ISA translation unit includes it exactly once.

namespace samsvae {
namespace cpu {
namespace SAMSVAE_ISA_NS {

#include "common/simd_math.h"
#include "embedding/embedding_kernel_impl.h"
#include "encoder/encoder_kernel_impl.h"
#include "nb/nb_kernel_impl.h"

template <class T>
constexpr TypedKernels<T> typed_kernels() {
  return TypedKernels<T>{Lanes<T>::W,          &nb_build_table<T>,  &nb_scan_counts<T>,
                         &nb_forward_rows<T>,  &nb_backward_rows<T>,
                         &nb_forward_grad_rows<T>, &emb_sample<T>,
                         &emb_compose<T>,      &emb_backward<T>,
                         &enc_linear_forward<T>, &enc_linear_backward<T>};
}

const CpuKernels kTable = {SAMSVAE_ISA_NAME, typed_kernels<float>(), typed_kernels<double>()};

}  // namespace SAMSVAE_ISA_NS
}  // namespace cpu
}  // namespace samsvae
