// Torch custom ops for the sparse masked embedding composition (CPU):
//
//   samsvae::masked_embedding_fwd(crow, local_col, dose, index, emb_loc, emb_log_scale?,
//       mask_logits?, eps, unif?, temperature) -> (z_p, embedding, mask, soft)
//   samsvae::masked_embedding_bwd(grad_z, grad_embedding?, grad_mask?, crow, local_col, dose,
//       index, emb_loc, emb_log_scale?, mask_logits?, eps, embedding, mask, soft, temperature)
//       -> (grad_emb_loc, grad_emb_log_scale, grad_mask_logits)
//
// crow (C+1), local_col (nnz) in [0, U), dose (nnz): the batch dosage in CSR with column ids
// local to index (U,), the sorted table rows present in the batch. Tables (T, L); noise eps and
// unif (P, U, L), drawn in Python exactly as the reference does. Outputs: z_p (P, C, L),
// embedding (P, U, L), mask and soft (P, U, L) when mask_logits is given, else empty (0,).
// Gradients: (T, L) tables, zero outside the U rows; empty (0,) for an absent input.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "common/cpu_dispatch.h"
#include "common/op_support.h"

namespace samsvae {
namespace cpu {
namespace {

constexpr const char* kOp = "samsvae::masked_embedding";

struct EmbShapes {
  int64_t P = 1, C = 0, U = 0, L = 0, T = 0;
};

bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

EmbShapes check_inputs(const at::Tensor& crow, const at::Tensor& local_col,
                       const at::Tensor& dose, const at::Tensor& index,
                       const at::Tensor& emb_loc, const std::optional<at::Tensor>& log_scale,
                       const std::optional<at::Tensor>& mask_logits, const at::Tensor& eps,
                       const std::optional<at::Tensor>& unif, double temperature) {
  check_cpu_contiguous(emb_loc, kOp, "emb_loc");
  TORCH_CHECK(emb_loc.dim() == 2, kOp, ": emb_loc must be (perturbations, latent), got ",
              emb_loc.sizes());
  const at::ScalarType dt = emb_loc.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, kOp,
              ": emb_loc must be float32 or float64, got ", dt);
  EmbShapes s;
  s.T = emb_loc.size(0);
  s.L = emb_loc.size(1);
  for (const auto* opt : {&log_scale, &mask_logits}) {
    if (!present(*opt)) continue;
    check_cpu_contiguous(**opt, kOp, "emb_log_scale/mask_logits");
    check_dtype(**opt, dt, kOp, "emb_log_scale/mask_logits");
    check_shape(**opt, emb_loc.sizes(), kOp, "emb_log_scale/mask_logits");
  }
  for (const auto* t : {&crow, &local_col, &index}) {
    check_cpu_contiguous(*t, kOp, "dosage index tensor");
    check_dtype(*t, at::kLong, kOp, "crow/local_col/index");
  }
  check_cpu_contiguous(dose, kOp, "dose");
  check_dtype(dose, dt, kOp, "dose");
  TORCH_CHECK(crow.dim() == 1 && crow.numel() >= 1, kOp, ": crow must be 1-D (cells + 1,)");
  s.C = crow.numel() - 1;
  s.U = index.numel();
  const int64_t nnz = local_col.numel();
  TORCH_CHECK(dose.numel() == nnz, kOp, ": dose and local_col must have the same length");
  const int64_t* cr = crow.data_ptr<int64_t>();
  TORCH_CHECK(cr[0] == 0 && cr[s.C] == nnz, kOp, ": crow must start at 0 and end at nnz");
  for (int64_t c = 0; c < s.C; ++c)
    TORCH_CHECK(cr[c] <= cr[c + 1], kOp, ": crow must be non-decreasing (row ", c, ")");
  const int64_t* lc = local_col.data_ptr<int64_t>();
  for (int64_t k = 0; k < nnz; ++k)
    TORCH_CHECK(lc[k] >= 0 && lc[k] < s.U, kOp, ": local_col must lie in [0, ", s.U, ")");
  const int64_t* ix = index.data_ptr<int64_t>();
  for (int64_t u = 0; u < s.U; ++u)
    TORCH_CHECK(ix[u] >= 0 && ix[u] < s.T, kOp, ": index must lie in [0, ", s.T,
                "), the rows of emb_loc");
  check_cpu_contiguous(eps, kOp, "eps");
  check_dtype(eps, dt, kOp, "eps");
  TORCH_CHECK(eps.dim() == 3 && eps.size(1) == s.U && eps.size(2) == s.L, kOp,
              ": eps must be (particles, ", s.U, ", ", s.L, "), got ", eps.sizes());
  s.P = eps.size(0);
  if (present(mask_logits)) {
    TORCH_CHECK(present(unif), kOp, ": unif noise is required when mask_logits is given");
    check_cpu_contiguous(*unif, kOp, "unif");
    check_dtype(*unif, dt, kOp, "unif");
    check_shape(*unif, eps.sizes(), kOp, "unif");
  }
  TORCH_CHECK(temperature > 0.0, kOp, ": temperature must be > 0, got ", temperature);
  return s;
}

int64_t grain(int64_t per_item) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, per_item));
}

template <class T>
void fwd_impl(const EmbFwdArgs<T>& a, const EmbShapes& s) {
  const TypedKernels<T>& kern = typed<T>(active_kernels());
  const int64_t Lp = round_up(s.L, kern.vec_width);
  at::parallel_for(0, s.U, grain(s.P * s.L * 8), [&](int64_t u0, int64_t u1) {
    DenormalsAreZero ftz;
    std::vector<T> tmp(Lp);
    kern.emb_sample(a, tmp.data(), u0, u1);
  });
  at::parallel_for(0, s.C, grain(s.P * s.L * 2), [&](int64_t i0, int64_t i1) {
    DenormalsAreZero ftz;
    kern.emb_compose(a, i0, i1);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> emb_fwd(
    const at::Tensor& crow, const at::Tensor& local_col, const at::Tensor& dose,
    const at::Tensor& index, const at::Tensor& emb_loc,
    const std::optional<at::Tensor>& log_scale, const std::optional<at::Tensor>& mask_logits,
    const at::Tensor& eps, const std::optional<at::Tensor>& unif, double temperature) {
  const EmbShapes s = check_inputs(crow, local_col, dose, index, emb_loc, log_scale, mask_logits,
                                   eps, unif, temperature);
  const auto opts = emb_loc.options();
  at::Tensor z = at::empty({s.P, s.C, s.L}, opts);
  at::Tensor emb = at::empty({s.P, s.U, s.L}, opts);
  const bool masked = present(mask_logits);
  at::Tensor mask = masked ? at::empty({s.P, s.U, s.L}, opts) : at::empty({0}, opts);
  at::Tensor soft = masked ? at::empty({s.P, s.U, s.L}, opts) : at::empty({0}, opts);
  AT_DISPATCH_FLOATING_TYPES(emb_loc.scalar_type(), "masked_embedding_fwd", [&] {
    EmbFwdArgs<scalar_t> a;
    a.P = s.P; a.C = s.C; a.U = s.U; a.L = s.L;
    a.crow = crow.data_ptr<int64_t>();
    a.lcol = local_col.data_ptr<int64_t>();
    a.dose = dose.data_ptr<scalar_t>();
    a.index = index.data_ptr<int64_t>();
    a.loc = emb_loc.data_ptr<scalar_t>();
    a.log_scale = present(log_scale) ? log_scale->data_ptr<scalar_t>() : nullptr;
    a.mask_logits = masked ? mask_logits->data_ptr<scalar_t>() : nullptr;
    a.eps = eps.data_ptr<scalar_t>();
    a.unif = masked ? unif->data_ptr<scalar_t>() : nullptr;
    a.temperature = temperature;
    a.z = z.data_ptr<scalar_t>();
    a.emb = emb.data_ptr<scalar_t>();
    a.mask = masked ? mask.data_ptr<scalar_t>() : nullptr;
    a.soft = masked ? soft.data_ptr<scalar_t>() : nullptr;
    fwd_impl<scalar_t>(a, s);
  });
  return {z, emb, mask, soft};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> emb_bwd(
    const at::Tensor& grad_z, const std::optional<at::Tensor>& grad_emb,
    const std::optional<at::Tensor>& grad_mask, const at::Tensor& crow,
    const at::Tensor& local_col, const at::Tensor& dose, const at::Tensor& index,
    const at::Tensor& emb_loc, const std::optional<at::Tensor>& log_scale,
    const std::optional<at::Tensor>& mask_logits, const at::Tensor& eps,
    const at::Tensor& emb, const at::Tensor& mask, const at::Tensor& soft,
    double temperature) {
  const bool masked = present(mask_logits);
  const EmbShapes s = check_inputs(crow, local_col, dose, index, emb_loc, log_scale, mask_logits,
                                   eps, masked ? std::optional<at::Tensor>(soft) : std::nullopt,
                                   temperature);
  const std::vector<int64_t> pul{s.P, s.U, s.L};
  check_cpu_contiguous(grad_z, kOp, "grad_z");
  check_dtype(grad_z, emb_loc.scalar_type(), kOp, "grad_z");
  check_shape(grad_z, {s.P, s.C, s.L}, kOp, "grad_z");
  check_cpu_contiguous(emb, kOp, "embedding");
  check_shape(emb, pul, kOp, "embedding");
  if (masked) {
    for (const at::Tensor* t : {&mask, &soft}) {
      check_cpu_contiguous(*t, kOp, "mask/soft");
      check_shape(*t, pul, kOp, "mask/soft");
    }
  }
  for (const auto* g : {&grad_emb, &grad_mask}) {
    if (!present(*g)) continue;
    check_cpu_contiguous(**g, kOp, "grad_embedding/grad_mask");
    check_dtype(**g, emb_loc.scalar_type(), kOp, "grad_embedding/grad_mask");
    check_shape(**g, pul, kOp, "grad_embedding/grad_mask");
  }
  const auto opts = emb_loc.options();
  at::Tensor g_loc = at::zeros(emb_loc.sizes(), opts);
  at::Tensor g_ls = present(log_scale) ? at::zeros(emb_loc.sizes(), opts) : at::empty({0}, opts);
  at::Tensor g_ml = masked ? at::zeros(emb_loc.sizes(), opts) : at::empty({0}, opts);

  // dosage transposed to (U, C) by a stable counting sort: entries of each perturbation in
  // increasing cell order, so the sums are deterministic.
  const int64_t nnz = local_col.numel();
  std::vector<int64_t> ccol(s.U + 1, 0), crow_of(nnz), order(nnz);
  const int64_t* cr = crow.data_ptr<int64_t>();
  const int64_t* lc = local_col.data_ptr<int64_t>();
  for (int64_t k = 0; k < nnz; ++k) ++ccol[lc[k] + 1];
  for (int64_t u = 0; u < s.U; ++u) ccol[u + 1] += ccol[u];
  {
    std::vector<int64_t> fill(ccol.begin(), ccol.end() - 1);
    for (int64_t c = 0; c < s.C; ++c)
      for (int64_t k = cr[c]; k < cr[c + 1]; ++k) {
        const int64_t pos = fill[lc[k]]++;
        crow_of[pos] = c;
        order[pos] = k;
      }
  }
  AT_DISPATCH_FLOATING_TYPES(emb_loc.scalar_type(), "masked_embedding_bwd", [&] {
    const scalar_t* dv = dose.data_ptr<scalar_t>();
    std::vector<scalar_t> cdose(nnz);
    for (int64_t k = 0; k < nnz; ++k) cdose[k] = dv[order[k]];
    EmbBwdArgs<scalar_t> a;
    a.P = s.P; a.C = s.C; a.U = s.U; a.L = s.L;
    a.ccol = ccol.data();
    a.crow_of = crow_of.data();
    a.cdose = cdose.data();
    a.index = index.data_ptr<int64_t>();
    a.log_scale = present(log_scale) ? log_scale->data_ptr<scalar_t>() : nullptr;
    a.eps = eps.data_ptr<scalar_t>();
    a.emb = emb.data_ptr<scalar_t>();
    a.mask = masked ? mask.data_ptr<scalar_t>() : nullptr;
    a.soft = masked ? soft.data_ptr<scalar_t>() : nullptr;
    a.temperature = temperature;
    a.grad_z = grad_z.data_ptr<scalar_t>();
    a.grad_emb = present(grad_emb) ? grad_emb->data_ptr<scalar_t>() : nullptr;
    a.grad_mask = masked && present(grad_mask) ? grad_mask->data_ptr<scalar_t>() : nullptr;
    a.grad_loc = g_loc.data_ptr<scalar_t>();
    a.grad_log_scale = present(log_scale) ? g_ls.data_ptr<scalar_t>() : nullptr;
    a.grad_mask_logits = masked ? g_ml.data_ptr<scalar_t>() : nullptr;
    const TypedKernels<scalar_t>& kern = typed<scalar_t>(active_kernels());
    const int64_t Lp = round_up(s.L, kern.vec_width);
    at::parallel_for(0, s.U, grain(s.P * s.L * 4), [&](int64_t u0, int64_t u1) {
      DenormalsAreZero ftz;
      std::vector<scalar_t> tmp(5 * Lp);
      kern.emb_backward(a, tmp.data(), u0, u1);
    });
  });
  return {g_loc, g_ls, g_ml};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(samsvae, m) {
  m.def("masked_embedding_fwd(Tensor crow, Tensor local_col, Tensor dose, Tensor index, "
        "Tensor emb_loc, Tensor? emb_log_scale, Tensor? mask_logits, Tensor eps, Tensor? unif, "
        "float temperature) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("masked_embedding_bwd(Tensor grad_z, Tensor? grad_embedding, Tensor? grad_mask, "
        "Tensor crow, Tensor local_col, Tensor dose, Tensor index, Tensor emb_loc, "
        "Tensor? emb_log_scale, Tensor? mask_logits, Tensor eps, Tensor embedding, "
        "Tensor mask, Tensor soft, float temperature) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(samsvae, CPU, m) {
  m.impl("masked_embedding_fwd", &emb_fwd);
  m.impl("masked_embedding_bwd", &emb_bwd);
}

}  // namespace cpu
}  // namespace samsvae
