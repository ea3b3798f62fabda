// Plain-data arguments of the encoder input-layer kernels (see encoder_linear_ops.cpp).
//
// Shapes: C cells, G genes, H hidden units (Hp = H padded to the vector width). The batch is
// CSR over (C, G) with columns ascending within each row; ``s`` holds the standardised value
// of each stored entry, log1p(x) * inv_std[g].
#pragma once

#include <cstdint>

namespace samsvae {
namespace cpu {

template <class T>
struct EncLinearArgs {
  int64_t C = 0, G = 0, H = 0, Hp = 0;
  int64_t gene_block = 16;        // genes per tile (the tile is gene_block x Hp)
  int64_t chunk = 8;              // vectors of hidden units per pass (1..8), in registers
  const int64_t* crow = nullptr;  // (C + 1)
  const int64_t* col = nullptr;   // (nnz), ascending within a row
  const T* s = nullptr;           // (nnz)
  // forward: out (C, Hp) starts as the shift row and gains sum_k s_k W[:, col_k]
  const T* weight = nullptr;      // (H, G)
  T* out = nullptr;               // (C, Hp)
  // backward: grad_weight (H, G) = grad_out^T S - outer(grad_sum, shift_g)
  const T* grad_out = nullptr;    // (C, Hp), padding columns zero
  const T* grad_sum = nullptr;    // (H) sum of grad_out over cells
  const T* centre = nullptr;      // (G) mean * inv_std, the dense part of every row
  T* grad_weight = nullptr;       // (H, G)
};

}  // namespace cpu
}  // namespace samsvae
