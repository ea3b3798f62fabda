// Plain-data arguments of the masked embedding composition kernels (see embedding_ops.cpp).
//
// Shapes: P particles, C cells, U perturbations present in the batch, L latent dims,
// T perturbations in the tables. The dosage is CSR over (C, U) with local column ids.
#pragma once

#include <cstdint>

namespace samsvae {
namespace cpu {

template <class T>
struct EmbFwdArgs {
  int64_t P = 1, C = 0, U = 0, L = 0;
  const int64_t* crow = nullptr;   // (C+1)
  const int64_t* lcol = nullptr;   // (nnz) in [0, U)
  const T* dose = nullptr;         // (nnz)
  const int64_t* index = nullptr;  // (U) table row of each local perturbation
  const T* loc = nullptr;          // (T, L)
  const T* log_scale = nullptr;    // (T, L) or null: point embedding
  const T* mask_logits = nullptr;  // (T, L) or null: masks fixed to one
  const T* eps = nullptr;          // (P, U, L) standard normal noise
  const T* unif = nullptr;         // (P, U, L) uniform noise in (0, 1), when masked
  double temperature = 1.0;
  T* z = nullptr;                  // (P, C, L) out
  T* emb = nullptr;                // (P, U, L) out
  T* mask = nullptr;               // (P, U, L) out, hard {0, 1}; when masked
  T* soft = nullptr;               // (P, U, L) out, relaxed sample; when masked
};

template <class T>
struct EmbBwdArgs {
  int64_t P = 1, C = 0, U = 0, L = 0;
  // dosage transposed: entries of local perturbation u are ccol[u] .. ccol[u+1]
  const int64_t* ccol = nullptr;   // (U+1)
  const int64_t* crow_of = nullptr;  // (nnz) cell of each entry
  const T* cdose = nullptr;        // (nnz)
  const int64_t* index = nullptr;  // (U)
  const T* log_scale = nullptr;    // (T, L) or null
  const T* eps = nullptr;          // (P, U, L)
  const T* emb = nullptr;          // (P, U, L)
  const T* mask = nullptr;         // (P, U, L) or null
  const T* soft = nullptr;         // (P, U, L) or null
  double temperature = 1.0;
  const T* grad_z = nullptr;       // (P, C, L)
  const T* grad_emb = nullptr;     // (P, U, L) or null (no gradient reached it)
  const T* grad_mask = nullptr;    // (P, U, L) or null
  T* grad_loc = nullptr;           // (T, L), zero-initialised; rows index[u] are written
  T* grad_log_scale = nullptr;     // (T, L) or null
  T* grad_mask_logits = nullptr;   // (T, L) or null
};

}  // namespace cpu
}  // namespace samsvae
