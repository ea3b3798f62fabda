// Shared by the encoder input ops (encoder_ops.cpp, encoder_linear_ops.cpp): CSR index checks
// and log1p of a count, small integers from a table.
#pragma once

#include <ATen/ATen.h>

#include <cmath>

namespace samsvae {
namespace cpu {

// Checks crow (B + 1) / col (nnz) of a (B, G) CSR batch; with ``ascending`` also that columns
// do not decrease within a row. Returns B.
inline int64_t check_csr_indices(const at::Tensor& crow, const at::Tensor& col, int64_t G,
                                 const char* op, bool ascending) {
  TORCH_CHECK(crow.dim() == 1 && crow.numel() >= 1, op, ": crow_indices must be (B + 1,)");
  TORCH_CHECK(col.dim() == 1, op, ": col_indices must be 1-D");
  const int64_t B = crow.numel() - 1;
  const int64_t* cr = crow.data_ptr<int64_t>();
  const int64_t* c = col.data_ptr<int64_t>();
  TORCH_CHECK(cr[0] == 0 && cr[B] == col.numel(), op,
              ": crow_indices must start at 0 and end at nnz; pass a valid CSR tensor");
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(cr[b] <= cr[b + 1], op, ": crow_indices must be non-decreasing (row ", b, ")");
    for (int64_t k = cr[b]; k < cr[b + 1]; ++k) {
      TORCH_CHECK(c[k] >= 0 && c[k] < G, op, ": col_indices must lie in [0, ", G, "), found ",
                  c[k], "; pass a valid CSR tensor");
      TORCH_CHECK(!ascending || k == cr[b] || c[k] >= c[k - 1], op,
                  ": col_indices must ascend within each row (torch's CSR invariant; row ", b,
                  "); build the batch with scipy's sort_indices() or "
                  "torch.sparse_csr_tensor(..., check_invariants=True)");
    }
  }
  return B;
}

// log1p(x) for a count x >= 0; NaN for a negative or non-finite x (the caller counts them).
template <class T>
class Log1pCounts {
 public:
  static constexpr int kTable = 64;
  Log1pCounts() {
    for (int k = 0; k < kTable; ++k) table_[k] = (T)std::log1p((double)k);
  }
  bool valid(T x) const { return x >= (T)0 && x < (T)__builtin_inf(); }
  // x must be valid
  T operator()(T x) const {
    const int xi = x < (T)kTable ? (int)x : -1;
    return (xi >= 0 && (T)xi == x) ? table_[xi] : (T)std::log1p((double)x);
  }

 private:
  T table_[kTable];
};

}  // namespace cpu
}  // namespace samsvae
