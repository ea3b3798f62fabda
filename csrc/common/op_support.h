// Helpers shared by the op layers (nb_ops.cpp, embedding_ops.cpp): argument checks with
// messages that name the problem and the fix, and the floating-point environment guard.
#pragma once

#include <ATen/ATen.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

namespace samsvae {
namespace cpu {

inline void check_cpu_contiguous(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor (got ", t.device(),
              "); move it with .cpu() or use backend='auto'");
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, " must be a dense (strided) tensor, got ",
              t.layout());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name,
              " must be contiguous; call .contiguous() before passing it");
}

inline void check_dtype(const at::Tensor& t, at::ScalarType want, const char* op,
                        const char* name) {
  TORCH_CHECK(t.scalar_type() == want, op, ": ", name, " must have dtype ", want, ", got ",
              t.scalar_type(), "; convert it with .to(", want, ")");
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef want, const char* op,
                        const char* name) {
  TORCH_CHECK(t.sizes() == want, op, ": ", name, " must have shape ", want, ", got ",
              t.sizes());
}

// Sets flush-to-zero / denormals-are-zero for the current thread while alive. Denormal
// intermediates (from logits more than ~80 nats below a row's maximum) would otherwise cost
// microcode assists; treating them as zero changes results by less than 1e-38.
class DenormalsAreZero {
 public:
  DenormalsAreZero() {
#if defined(__x86_64__) || defined(_M_X64)
    saved_ = _mm_getcsr();
    _mm_setcsr(saved_ | 0x8040u);
#endif
  }
  ~DenormalsAreZero() {
#if defined(__x86_64__) || defined(_M_X64)
    _mm_setcsr(saved_);
#endif
  }
  DenormalsAreZero(const DenormalsAreZero&) = delete;
  DenormalsAreZero& operator=(const DenormalsAreZero&) = delete;

 private:
  unsigned int saved_ = 0;
};

inline int64_t round_up(int64_t n, int64_t w) { return (n + w - 1) / w * w; }

}  // namespace cpu
}  // namespace samsvae
