// The encoder's input layer: standardised log1p features of a CSR count batch, densified.
//
//   samsvae::log1p_standardize_csr(crow, col, values, mean, inv_std) -> features (B, G)
//       features[b, g] = (log1p(x_bg) - mean_g) * inv_std_g      (x_bg = 0 where not stored)
//
// computed as -mean_g * inv_std_g (a template row copied into every row) plus
// log1p(x) * inv_std_g at the stored entries (duplicate entries add their log1p terms, as a
// scatter-add of the log1p values would). Small integer counts take log1p from a table: a
// batch has about a million stored entries, and the table load costs ~1 ns against ~10 ns for
// a scalar log1p. Replaces log1p over the values, the index arithmetic and scatter of a
// densification, then two passes over (B, G) that standardise (one write of (B, G) here).
// No autograd: the features are an input. Fake implementation: samsvae/models/encoder_input.py.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstring>

#include "common/op_support.h"
#include "encoder/encoder_common.h"

namespace samsvae {
namespace cpu {
namespace {

constexpr const char* kOp = "samsvae::log1p_standardize_csr";

// Returns the number of stored counts that are negative or not finite (their rows are left
// unfinished; the caller raises).
template <class T>
int64_t standardize(const int64_t* crow, const int64_t* col, const T* val, const T* mean,
                    const T* inv_std, T* out, int64_t B, int64_t G) {
  std::atomic<int64_t> bad{0};
  std::vector<T> tmpl(G);
  for (int64_t g = 0; g < G; ++g) tmpl[g] = ((T)0 - mean[g]) * inv_std[g];
  const Log1pCounts<T> log1p_count;
  at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      T* row = out + b * G;
      std::memcpy(row, tmpl.data(), sizeof(T) * G);
      for (int64_t k = crow[b]; k < crow[b + 1]; ++k) {
        const T x = val[k];
        if (!log1p_count.valid(x)) {
          ++bad;
          continue;
        }
        row[col[k]] += log1p_count(x) * inv_std[col[k]];
      }
    }
  });
  return bad.load();
}

at::Tensor log1p_standardize_csr(const at::Tensor& crow, const at::Tensor& col,
                                 const at::Tensor& values, const at::Tensor& mean,
                                 const at::Tensor& inv_std) {
  for (auto* p : {&crow, &col, &values, &mean, &inv_std})
    check_cpu_contiguous(*p, kOp, "input");
  check_dtype(crow, at::kLong, kOp, "crow_indices");
  check_dtype(col, at::kLong, kOp, "col_indices");
  TORCH_CHECK(mean.scalar_type() == at::kFloat || mean.scalar_type() == at::kDouble, kOp,
              ": mean must be float32 or float64, got ", mean.scalar_type());
  check_dtype(values, mean.scalar_type(), kOp, "values");
  check_dtype(inv_std, mean.scalar_type(), kOp, "inv_std");
  TORCH_CHECK(mean.dim() == 1, kOp, ": mean must be (G,)");
  const int64_t G = mean.numel();
  check_shape(inv_std, {G}, kOp, "inv_std");
  TORCH_CHECK(values.dim() == 1 && col.numel() == values.numel(), kOp,
              ": col_indices and values must be 1-D of equal length");
  const int64_t B = check_csr_indices(crow, col, G, kOp, /*ascending=*/false);
  const int64_t* cr = crow.data_ptr<int64_t>();
  const int64_t* c = col.data_ptr<int64_t>();
  at::Tensor out = at::empty({B, G}, mean.options());
  int64_t bad = 0;
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "log1p_standardize_csr", [&] {
    bad = standardize<scalar_t>(cr, c, values.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(),
                                inv_std.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), B, G);
  });
  TORCH_CHECK(bad == 0, kOp, ": counts must be finite and non-negative; found ", bad,
              " invalid entries (raw UMI counts are expected, not log-normalised values)");
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(samsvae, m) {
  m.def("log1p_standardize_csr(Tensor crow, Tensor col, Tensor values, Tensor mean, "
        "Tensor inv_std) -> Tensor");
}

TORCH_LIBRARY_IMPL(samsvae, CPU, m) { m.impl("log1p_standardize_csr", &log1p_standardize_csr); }

}  // namespace cpu
}  // namespace samsvae
