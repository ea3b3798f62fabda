// The encoder's input layer on a CSR count batch, without densifying it:
//
//   samsvae::log1p_standardize_linear_csr(crow, col, values, weight, bias?, mean, inv_std)
//       -> (out (B, H), s (nnz))
//   out[b, :] = weight @ ((log1p(x_b) - mean) * inv_std) + bias
//             = sum_k s_k weight[:, col_k] + (bias - weight @ centre)
//   s_k = log1p(x_k) * inv_std[col_k],  centre = mean * inv_std   (x = 0 where not stored)
//
//   samsvae::log1p_standardize_linear_csr_bwd(grad_out, crow, col, s, mean, inv_std)
//       -> (grad_weight (H, G), grad_bias (H))
//   grad_weight = grad_out^T S - outer(sum_b grad_out[b], centre),  grad_bias = sum_b grad_out[b]
//
// The stored entries cost H multiply-adds each (csrc/encoder/encoder_kernel_impl.h), the dense
// standardisation one (H, G) matrix-vector product per call: against standardising into a
// dense (B, G) matrix and two dense products, the work scales with the non-zeros. Columns
// must ascend within a row (torch's CSR invariant; duplicates add up). No gradient reaches the
// counts, mean or inv_std (inputs and buffers). Fake implementations and autograd:
// samsvae/ops/encoder/cpp.py.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <initializer_list>
#include <optional>
#include <vector>

#include "common/cpu_dispatch.h"
#include "common/op_support.h"
#include "encoder/encoder_common.h"

namespace samsvae {
namespace cpu {
namespace {

constexpr const char* kOp = "samsvae::log1p_standardize_linear_csr";
constexpr const char* kBwd = "samsvae::log1p_standardize_linear_csr_bwd";

// Genes per tile: one chunk of it (gene_block x 8 vectors) takes ~64 KiB (128 float genes at
// 16 lanes). Measured at 512 x 8,000, hidden 400: 32 to 256 genes and chunks of 2 to 8 vectors
// ran within the machine's noise of each other; 16 genes and 1,024 or more were slower.
int64_t gene_block(int64_t vec_width, size_t elem) {
  const int64_t gb = (int64_t)(64 * 1024 / (elem * 8 * (size_t)vec_width));
  return std::min<int64_t>(512, std::max<int64_t>(8, gb));
}

void check_stats(const at::Tensor& mean, const at::Tensor& inv_std, const char* op) {
  check_cpu_contiguous(mean, op, "mean");
  check_cpu_contiguous(inv_std, op, "inv_std");
  TORCH_CHECK(mean.scalar_type() == at::kFloat || mean.scalar_type() == at::kDouble, op,
              ": mean must be float32 or float64, got ", mean.scalar_type());
  TORCH_CHECK(mean.dim() == 1, op, ": mean must be (G,)");
  check_dtype(inv_std, mean.scalar_type(), op, "inv_std");
  check_shape(inv_std, {mean.numel()}, op, "inv_std");
}

// The inputs every call shares: CPU-contiguous ``dense`` tensors, int64 CSR indices, mean /
// inv_std (G,) in float32 or float64, and ``typed`` tensors in their dtype.
void check_common(std::initializer_list<const at::Tensor*> dense, const at::Tensor& crow,
                  const at::Tensor& col, const at::Tensor& mean, const at::Tensor& inv_std,
                  std::initializer_list<std::pair<const at::Tensor*, const char*>> typed,
                  const char* op) {
  for (const at::Tensor* p : dense) check_cpu_contiguous(*p, op, "input");
  check_dtype(crow, at::kLong, op, "crow_indices");
  check_dtype(col, at::kLong, op, "col_indices");
  check_stats(mean, inv_std, op);
  for (const auto& t : typed) check_dtype(*t.first, mean.scalar_type(), op, t.second);
}

// s_k = log1p(x_k) * inv_std[col_k]; returns the number of invalid counts.
template <class T>
int64_t standardized_values(const int64_t* col, const T* x, int64_t nnz, const T* inv_std,
                            T* s) {
  const Log1pCounts<T> log1p_count;
  std::atomic<int64_t> bad{0};
  at::parallel_for(0, nnz, 1 << 14, [&](int64_t k0, int64_t k1) {
    int64_t b = 0;
    for (int64_t k = k0; k < k1; ++k) {
      if (!log1p_count.valid(x[k])) {
        ++b;
        s[k] = (T)0;
        continue;
      }
      s[k] = log1p_count(x[k]) * inv_std[col[k]];
    }
    bad += b;
  });
  return bad.load();
}

template <class T>
EncLinearArgs<T> base_args(const at::Tensor& crow, const at::Tensor& col, int64_t G, int64_t H) {
  EncLinearArgs<T> a;
  a.C = crow.numel() - 1;
  a.G = G;
  a.H = H;
  a.Hp = round_up(H, typed<T>(active_kernels()).vec_width);
  a.gene_block = gene_block(typed<T>(active_kernels()).vec_width, sizeof(T));
  a.crow = crow.data_ptr<int64_t>();
  a.col = col.data_ptr<int64_t>();
  return a;
}

std::tuple<at::Tensor, at::Tensor> linear_fwd(const at::Tensor& crow, const at::Tensor& col,
                                              const at::Tensor& values, const at::Tensor& weight,
                                              const std::optional<at::Tensor>& bias,
                                              const at::Tensor& mean, const at::Tensor& inv_std) {
  check_common({&crow, &col, &values, &weight}, crow, col, mean, inv_std,
               {{&values, "values"}, {&weight, "weight"}}, kOp);
  const auto dtype = mean.scalar_type();
  const int64_t G = mean.numel();
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == G, kOp, ": weight must be (H, ", G,
              ") (one column per gene), got ", weight.sizes());
  const int64_t H = weight.size(0);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    check_cpu_contiguous(*bias, kOp, "bias");
    check_dtype(*bias, dtype, kOp, "bias");
    check_shape(*bias, {H}, kOp, "bias");
  }
  TORCH_CHECK(values.dim() == 1 && values.numel() == col.numel(), kOp,
              ": col_indices and values must be 1-D of equal length");
  const int64_t C = check_csr_indices(crow, col, G, kOp, /*ascending=*/true);
  const int64_t nnz = col.numel();
  at::Tensor s = at::empty({nnz}, mean.options());
  at::Tensor out = at::empty({C, H}, mean.options());
  // the dense part: every row starts at bias - weight @ centre
  at::Tensor shift = at::mv(weight, mean * inv_std).neg_();
  if (has_bias) shift.add_(*bias);
  AT_DISPATCH_FLOATING_TYPES(dtype, "log1p_standardize_linear_csr", [&] {
    using T = scalar_t;
    const int64_t bad = standardized_values<T>(col.data_ptr<int64_t>(), values.data_ptr<T>(),
                                                nnz, inv_std.data_ptr<T>(), s.data_ptr<T>());
    TORCH_CHECK(bad == 0, kOp, ": counts must be finite and non-negative; found ", bad,
                " invalid entries (raw UMI counts are expected, not log-normalised values)");
    EncLinearArgs<T> a = base_args<T>(crow, col, G, H);
    a.s = s.data_ptr<T>();
    a.weight = weight.data_ptr<T>();
    at::Tensor padded = a.Hp == H ? out : at::empty({C, a.Hp}, mean.options());
    padded.narrow(1, 0, H).copy_(shift.unsqueeze(0).expand({C, H}));
    if (a.Hp != H) padded.narrow(1, H, a.Hp - H).zero_();
    a.out = padded.data_ptr<T>();
    const TypedKernels<T>& kern = typed<T>(active_kernels());
    at::parallel_for(0, C, 16, [&](int64_t c0, int64_t c1) {
      DenormalsAreZero ftz;
      std::vector<T> tile(a.gene_block * a.Hp);
      std::vector<int64_t> cur(2 * (c1 - c0));
      kern.enc_forward(a, tile.data(), cur.data(), c0, c1);
    });
    if (a.Hp != H) out.copy_(padded.narrow(1, 0, H));
  });
  return {out, s};
}

std::tuple<at::Tensor, at::Tensor> linear_bwd(const at::Tensor& grad_out, const at::Tensor& crow,
                                              const at::Tensor& col, const at::Tensor& s,
                                              const at::Tensor& mean,
                                              const at::Tensor& inv_std) {
  check_common({&grad_out, &crow, &col, &s}, crow, col, mean, inv_std,
               {{&grad_out, "grad_out"}, {&s, "s"}}, kBwd);
  const auto dtype = mean.scalar_type();
  const int64_t G = mean.numel(), C = crow.numel() - 1;
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == C, kBwd, ": grad_out must be (",
              C, ", H), got ", grad_out.sizes());
  TORCH_CHECK(s.numel() == col.numel(), kBwd, ": s must hold one value per stored entry");
  const int64_t H = grad_out.size(1);
  check_csr_indices(crow, col, G, kBwd, /*ascending=*/true);
  at::Tensor grad_bias = grad_out.sum(0);
  at::Tensor centre = mean * inv_std;
  at::Tensor grad_weight = at::empty({H, G}, mean.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "log1p_standardize_linear_csr_bwd", [&] {
    using T = scalar_t;
    EncLinearArgs<T> a = base_args<T>(crow, col, G, H);
    a.s = s.data_ptr<T>();
    at::Tensor padded = grad_out;
    if (a.Hp != H) {
      padded = at::zeros({C, a.Hp}, mean.options());
      padded.narrow(1, 0, H).copy_(grad_out);
    }
    a.grad_out = padded.data_ptr<T>();
    a.grad_sum = grad_bias.data_ptr<T>();
    a.centre = centre.data_ptr<T>();
    a.grad_weight = grad_weight.data_ptr<T>();
    const int64_t n_blocks = (G + a.gene_block - 1) / a.gene_block;
    const TypedKernels<T>& kern = typed<T>(active_kernels());
    at::parallel_for(0, n_blocks, 4, [&](int64_t b0, int64_t b1) {
      DenormalsAreZero ftz;
      std::vector<T> tile(a.gene_block * a.Hp);
      std::vector<int64_t> cur(2 * C);
      kern.enc_backward(a, tile.data(), cur.data(), b0, b1);
    });
  });
  return {grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(samsvae, m) {
  m.def("log1p_standardize_linear_csr(Tensor crow, Tensor col, Tensor values, Tensor weight, "
        "Tensor? bias, Tensor mean, Tensor inv_std) -> (Tensor, Tensor)");
  m.def("log1p_standardize_linear_csr_bwd(Tensor grad_out, Tensor crow, Tensor col, Tensor s, "
        "Tensor mean, Tensor inv_std) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(samsvae, CPU, m) {
  m.impl("log1p_standardize_linear_csr", &linear_fwd);
  m.impl("log1p_standardize_linear_csr_bwd", &linear_bwd);
}

}  // namespace cpu
}  // namespace samsvae
