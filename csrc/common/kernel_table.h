// The table of per-ISA kernel entry points, one instance per ISA translation unit
// (csrc/isa/*.cpp), chosen at runtime by cpu_dispatch.cpp.
#pragma once

#include <cstdint>

#include "embedding/embedding_kernel.h"
#include "encoder/encoder_kernel.h"
#include "nb/nb_kernel.h"

namespace samsvae {
namespace cpu {

template <class T>
struct TypedKernels {
  int vec_width;  // lanes per vector for T (genes are padded to a multiple of it)
  void (*nb_table)(const NbGenes<T>&, double* table, bool derivative, int64_t g0,
                   int64_t g1);
  void (*nb_scan)(const T* values, int64_t n, int* max_small, int64_t* n_small);
  // over rows q = c * P + p in [q0, q1)
  NbStatus (*nb_forward)(const NbFwdArgs<T>&, const NbScratch<T>&, int64_t q0, int64_t q1);
  NbStatus (*nb_backward)(const NbBwdArgs<T>&, const NbScratch<T>&, double* theta_acc,
                          double* bias_acc, int64_t q0, int64_t q1);
  NbStatus (*nb_forward_grad)(const NbFwdGradArgs<T>&, const NbScratch<T>&, double* theta_acc,
                              double* bias_acc, int64_t q0, int64_t q1);
  void (*emb_sample)(const EmbFwdArgs<T>&, T* scratch, int64_t u0, int64_t u1);
  void (*emb_compose)(const EmbFwdArgs<T>&, int64_t i0, int64_t i1);
  void (*emb_backward)(const EmbBwdArgs<T>&, T* scratch, int64_t u0, int64_t u1);
  // encoder input layer: cells [c0, c1) / gene blocks [b0, b1); scratch: tile and cursors
  void (*enc_forward)(const EncLinearArgs<T>&, T* tile, int64_t* cur, int64_t c0, int64_t c1);
  void (*enc_backward)(const EncLinearArgs<T>&, T* tile, int64_t* cur, int64_t b0, int64_t b1);
};

struct CpuKernels {
  const char* isa;  // "avx512", "avx2" or "baseline"
  TypedKernels<float> f32;
  TypedKernels<double> f64;
};

// Defined by the ISA translation units; return nullptr when not compiled for this platform.
const CpuKernels* kernels_baseline();
const CpuKernels* kernels_avx2();
const CpuKernels* kernels_avx512();

// The kernels of element type T (float or double) in a table.
template <class T>
const TypedKernels<T>& typed(const CpuKernels& k);
template <>
inline const TypedKernels<float>& typed<float>(const CpuKernels& k) { return k.f32; }
template <>
inline const TypedKernels<double>& typed<double>(const CpuKernels& k) { return k.f64; }

}  // namespace cpu
}  // namespace samsvae
