// Torch custom ops for the negative binomial log-likelihood (CPU):
//
//   samsvae::nb_log_prob_fwd(crow, col, values, logits, log_library, log_theta, logit_bias?)
//       -> (out, lse)
//   samsvae::nb_log_prob_bwd(grad_out, crow, col, values, logits, log_library, log_theta, lse,
//                            logit_bias?) -> (grad_logits, grad_log_library, grad_log_theta,
//                                             grad_logit_bias)
//   samsvae::nb_log_prob_dense_fwd / nb_log_prob_dense_bwd: the same with dense counts (C, G)
//   samsvae::nb_log_prob_fwd_grad(crow, col, values, logits!, log_library, log_theta,
//                                 logit_bias?) -> (out, lse, row_dlog_library,
//                                                  dlog_theta_sum, dlogit_bias_sum)
//   (and nb_log_prob_dense_fwd_grad): the forward plus the gradient for a unit upstream
//   gradient of every row, written over logits, for losses that weight rows alike
//
// logit_bias (G,), optional, is added to every logits row inside the kernel (the decoder's
// last bias: the Linear layer then runs without one, and its gradient, the sum of grad_logits
// over rows, is accumulated by the backward pass); grad_logit_bias is empty (0,) without it.
//
// counts: CSR parts (crow (C+1) int64, col (nnz) int64, values (nnz)) or dense (C, G);
// logits (C, G) or (P, C, G); log_library (C,); log_theta (G,); all of the logits dtype
// (float32 or float64), contiguous, on the CPU. out: logits.shape[:-1] in nats;
// lse: logits.shape[:-1] float64, the per-row logsumexp (of logits + bias) the backward
// recomputes from (the only thing saved between the two, besides the inputs).
// Autograd, fake tensors and the Python-side conversions live in samsvae/ops/nb/cpp.py.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <vector>

#include "common/cpu_dispatch.h"
#include "common/op_support.h"

namespace samsvae {
namespace cpu {
namespace {

constexpr const char* kOp = "samsvae::nb_log_prob";

struct NbInputs {
  int64_t P = 1, C = 0, G = 0;
  int64_t max_entries = 0;  // most stored entries in one cell (CSR), or G (dense)
};

NbInputs check_common(const at::Tensor& logits, const at::Tensor& log_library,
                      const at::Tensor& log_theta) {
  check_cpu_contiguous(logits, kOp, "logits");
  TORCH_CHECK(logits.dim() == 2 || logits.dim() == 3, kOp,
              ": logits must be (cells, genes) or (particles, cells, genes), got shape ",
              logits.sizes());
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble, kOp,
              ": logits must be float32 or float64, got ", logits.scalar_type(),
              "; convert with .float()");
  NbInputs in;
  in.P = logits.dim() == 3 ? logits.size(0) : 1;
  in.C = logits.size(-2);
  in.G = logits.size(-1);
  check_cpu_contiguous(log_library, kOp, "log_library");
  check_cpu_contiguous(log_theta, kOp, "log_theta");
  check_dtype(log_library, logits.scalar_type(), kOp, "log_library");
  check_dtype(log_theta, logits.scalar_type(), kOp, "log_theta");
  check_shape(log_library, {in.C}, kOp, "log_library");
  check_shape(log_theta, {in.G}, kOp, "log_theta");
  return in;
}

// The optional logit bias: (G,) of the logits dtype, contiguous, or absent.
const at::Tensor* check_bias(const c10::optional<at::Tensor>& bias, const at::Tensor& logits,
                             const NbInputs& in) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  check_cpu_contiguous(*bias, kOp, "logit_bias");
  check_dtype(*bias, logits.scalar_type(), kOp, "logit_bias");
  check_shape(*bias, {in.G}, kOp, "logit_bias");
  return &*bias;
}

void check_csr(const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
               const at::Tensor& logits, NbInputs& in) {
  for (auto* p : {&crow, &col, &values}) check_cpu_contiguous(*p, kOp, "counts CSR part");
  check_dtype(crow, at::kLong, kOp, "crow_indices");
  check_dtype(col, at::kLong, kOp, "col_indices");
  check_dtype(values, logits.scalar_type(), kOp, "counts values");
  check_shape(crow, {in.C + 1}, kOp, "crow_indices");
  TORCH_CHECK(col.dim() == 1 && values.dim() == 1 && col.numel() == values.numel(), kOp,
              ": col_indices and values must be 1-D of equal length, got ", col.sizes(), " and ",
              values.sizes());
  const int64_t* cr = crow.data_ptr<int64_t>();
  const int64_t nnz = col.numel();
  TORCH_CHECK(cr[0] == 0 && cr[in.C] == nnz, kOp, ": crow_indices must start at 0 and end at "
              "nnz = ", nnz, " (got ", cr[0], " and ", cr[in.C], "); pass a valid CSR tensor");
  for (int64_t c = 0; c < in.C; ++c) {
    TORCH_CHECK(cr[c] <= cr[c + 1], kOp, ": crow_indices must be non-decreasing (row ", c, ")");
    in.max_entries = std::max(in.max_entries, cr[c + 1] - cr[c]);
  }
  // column indices are checked by the kernels, cell by cell, as they read them
}

// Per-gene arrays (padded), plus the count table when it pays for itself.
template <class T>
struct GeneData {
  at::Tensor theta, inv_theta, theta_eff, table;
  NbGenes<T> genes;
};

template <class T>
GeneData<T> prepare_genes(const TypedKernels<T>& kern, const at::Tensor& log_theta,
                          const T* counts, int64_t n_counts, bool derivative) {
  GeneData<T> d;
  const int64_t G = log_theta.numel(), Gp = round_up(G, kern.vec_width);
  d.theta = at::ones({Gp}, log_theta.options());
  d.inv_theta = at::ones({Gp}, log_theta.options());
  d.theta.narrow(0, 0, G).copy_(log_theta.exp());
  d.inv_theta.narrow(0, 0, G).copy_(d.theta.narrow(0, 0, G).reciprocal());
  d.theta_eff = d.inv_theta.to(at::kDouble).reciprocal().to(log_theta.scalar_type());
  NbGenes<T>& gn = d.genes;
  gn.G = G;
  gn.Gp = Gp;
  gn.log_theta = log_theta.data_ptr<T>();
  const at::Tensor& th = d.theta;
  const at::Tensor& inv = d.inv_theta;
  gn.theta = th.data_ptr<T>();
  gn.inv_theta = inv.data_ptr<T>();
  const at::Tensor& th_eff = d.theta_eff;
  gn.theta_eff = th_eff.data_ptr<T>();

  // Table rows for counts 0..K-1 (rows 0 and 1 are zeros). Rows 2.. are built when at least
  // one entry per 64 table elements uses them: a table element costs about one vectorised
  // log1p (~1 ns), an entry on the general path (float64 lgamma/digamma) 40-60 ns.
  const int64_t n_chunks = at::divup(n_counts, 1 << 16);
  std::vector<int> mx(n_chunks > 0 ? n_chunks : 1, 1);
  std::vector<int64_t> cnt(n_chunks > 0 ? n_chunks : 1, 0);
  at::parallel_for(0, n_chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t lo = i << 16, n = std::min<int64_t>(n_counts - lo, 1 << 16);
      kern.nb_scan(counts + lo, n, &mx[i], &cnt[i]);
    }
  });
  int max_small = 1;
  int64_t n_small = 0;
  for (size_t i = 0; i < mx.size(); ++i) {
    max_small = std::max(max_small, mx[i]);
    n_small += cnt[i];
  }
  int K = max_small + 1;
  if (K > 2 && n_small * 64 < G * (K - 2)) K = 2;
  gn.K = K;
  at::Tensor table = at::empty({K * Gp}, log_theta.options().dtype(at::kDouble));
  d.table = table;
  double* tab = table.data_ptr<double>();
  const int64_t W = kern.vec_width;
  at::parallel_for(0, Gp / W, std::max<int64_t>(1, 2048 / W / K + 1), [&](int64_t b, int64_t e) {
    DenormalsAreZero ftz;
    kern.nb_table(gn, tab, derivative, b * W, std::min(e * W, Gp));
  });
  gn.table = tab;
  return d;
}

// Per-thread scratch rows (see NbScratch), kept in thread-local buffers across calls so that a
// call costs a memset rather than fresh pages. The kernels leave xrow and theta_part zeroed.
template <class T>
struct Scratch {
  NbScratch<T> s;
  Scratch(const NbInputs& in, int64_t Gp) {
    thread_local std::vector<T> rows;
    thread_local std::vector<int64_t> cols;
    thread_local std::vector<double> terms;
    rows.assign(7 * Gp + in.G, (T)0);
    cols.resize(std::max<int64_t>(1, in.G));
    terms.resize(std::max<int64_t>(1, in.max_entries));
    s.xrow = rows.data();
    s.aux = rows.data() + Gp;
    s.theta_part = rows.data() + 2 * Gp;
    s.zeros = rows.data() + 3 * Gp;  // never written
    s.bias_part = rows.data() + 4 * Gp;
    s.sp = rows.data() + 5 * Gp;
    s.dl = rows.data() + 6 * Gp;
    s.ent_x = rows.data() + 7 * Gp;
    s.ent_col = cols.data();
    s.ent_t = terms.data();
  }
};

// Kernel statuses summed over threads, raised as one error.
struct StatusSum {
  std::atomic<int64_t> bad_counts{0}, bad_cells{0};
  void add(const NbStatus& s) {
    bad_counts += s.bad_counts;
    bad_cells += s.bad_cells;
  }
  void check(int64_t G) const {
    TORCH_CHECK(bad_cells.load() == 0, kOp, ": col_indices must lie in [0, ", G, "); ",
                bad_cells.load(), " cells have indices outside; pass a valid CSR tensor");
    TORCH_CHECK(bad_counts.load() == 0, kOp, ": counts must be finite and non-negative; found ",
                bad_counts.load(), " invalid entries");
  }
};

// The inputs the forward and backward argument structs share.
template <class Args, class T>
void fill_row_inputs(Args& a, const NbInputs& in, const GeneData<T>& gd, const NbCounts<T>& counts,
                     const at::Tensor& logits, const at::Tensor& log_library,
                     const at::Tensor* bias) {
  a.P = in.P;
  a.C = in.C;
  a.genes = gd.genes;
  a.counts = counts;
  a.logits = logits.data_ptr<T>();
  a.log_library = log_library.data_ptr<T>();
  a.bias = bias != nullptr ? bias->data_ptr<T>() : nullptr;
}

int64_t row_grain(const NbInputs& in) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, in.G));
}

// Runs kernel(scratch, thread id, q0, q1) -> NbStatus over the rows q in [0, C * P), split by
// at::parallel_for, with denormals flushed and per-thread scratch; raises what they report.
template <class T, class Kernel>
void run_rows(const NbInputs& in, int64_t Gp, Kernel&& kernel) {
  StatusSum status;
  at::parallel_for(0, in.C * in.P, row_grain(in), [&](int64_t q0, int64_t q1) {
    DenormalsAreZero ftz;
    Scratch<T> sc(in, Gp);
    status.add(kernel(sc.s, at::get_thread_num(), q0, q1));
  });
  status.check(in.G);
}

template <class T>
std::tuple<at::Tensor, at::Tensor> forward_impl(const NbCounts<T>& counts, const T* count_values,
                                                int64_t n_counts, const at::Tensor& logits,
                                                const at::Tensor& log_library,
                                                const at::Tensor& log_theta, const at::Tensor* bias,
                                                const NbInputs& in) {
  const at::IntArrayRef lead = logits.sizes().slice(0, logits.dim() - 1);
  at::Tensor out = at::empty(lead, logits.options());
  at::Tensor lse = at::empty(lead, logits.options().dtype(at::kDouble));
  if (in.P * in.C == 0) return {out, lse};
  if (in.G == 0) {  // empty softmax: the sum over genes is empty
    out.zero_();
    lse.fill_(-std::numeric_limits<double>::infinity());
    return {out, lse};
  }
  const TypedKernels<T>& kern = typed<T>(active_kernels());
  GeneData<T> gd = prepare_genes<T>(kern, log_theta, count_values, n_counts, false);
  NbFwdArgs<T> a;
  fill_row_inputs(a, in, gd, counts, logits, log_library, bias);
  a.out = out.data_ptr<T>();
  a.lse = lse.data_ptr<double>();
  run_rows<T>(in, gd.genes.Gp, [&](const NbScratch<T>& sc, int, int64_t q0, int64_t q1) {
    return kern.nb_forward(a, sc, q0, q1);
  });
  return {out, lse};
}

// Per-thread float64 accumulators of the (G,) log_theta and bias gradients (rows Gp wide);
// reduce() sums over threads and drops the padding.
struct GeneGradAccumulators {
  int n_threads;
  int64_t G, Gp;
  at::Tensor theta, bias;
  GeneGradAccumulators(const at::Tensor& like, int64_t G_, int64_t Gp_, bool with_bias)
      : n_threads(at::get_num_threads()), G(G_), Gp(Gp_) {
    const auto f64 = like.options().dtype(at::kDouble);
    theta = at::zeros({n_threads, Gp}, f64);
    bias = at::zeros({with_bias ? n_threads : 0, Gp}, f64);
  }
  double* theta_row(int tid) {
    TORCH_INTERNAL_ASSERT(tid >= 0 && tid < n_threads, "thread id out of range");
    return theta.data_ptr<double>() + tid * Gp;
  }
  double* bias_row(int tid) {
    return bias.size(0) == 0 ? nullptr : bias.data_ptr<double>() + tid * Gp;
  }
  std::pair<at::Tensor, at::Tensor> reduce(at::ScalarType dtype) const {
    at::Tensor t = theta.sum(0).narrow(0, 0, G).to(dtype);
    at::Tensor b = bias.size(0) == 0 ? at::zeros({0}, theta.options().dtype(dtype))
                                     : bias.sum(0).narrow(0, 0, G).to(dtype);
    return {t, b};
  }
};

template <class T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const at::Tensor& grad_out, const NbCounts<T>& counts, const T* count_values,
    int64_t n_counts, const at::Tensor& logits, const at::Tensor& log_library,
    const at::Tensor& log_theta, const at::Tensor& lse, const at::Tensor* bias,
    const NbInputs& in) {
  const at::IntArrayRef lead = logits.sizes().slice(0, logits.dim() - 1);
  check_cpu_contiguous(grad_out, kOp, "grad_out");
  check_dtype(grad_out, logits.scalar_type(), kOp, "grad_out");
  check_shape(grad_out, lead, kOp, "grad_out");
  check_cpu_contiguous(lse, kOp, "lse");
  check_dtype(lse, at::kDouble, kOp, "lse");
  check_shape(lse, lead, kOp, "lse");
  at::Tensor grad_logits = at::empty_like(logits);
  const int64_t n_bias = bias != nullptr ? in.G : 0;
  if (in.P * in.C == 0 || in.G == 0) {
    grad_logits.zero_();
    return {grad_logits, at::zeros({in.C}, logits.options()), at::zeros({in.G}, logits.options()),
            at::zeros({n_bias}, logits.options())};
  }
  at::Tensor row_dlib = at::empty({in.P, in.C}, logits.options().dtype(at::kDouble));
  const TypedKernels<T>& kern = typed<T>(active_kernels());
  GeneData<T> gd = prepare_genes<T>(kern, log_theta, count_values, n_counts, true);
  const int64_t Gp = gd.genes.Gp;
  GeneGradAccumulators acc(logits, in.G, Gp, bias != nullptr);
  NbBwdArgs<T> a;
  fill_row_inputs(a, in, gd, counts, logits, log_library, bias);
  a.lse = lse.data_ptr<double>();
  a.grad_out = grad_out.data_ptr<T>();
  a.grad_logits = grad_logits.data_ptr<T>();
  a.row_dlog_library = row_dlib.data_ptr<double>();
  run_rows<T>(in, Gp, [&](const NbScratch<T>& sc, int tid, int64_t q0, int64_t q1) {
    return kern.nb_backward(a, sc, acc.theta_row(tid), acc.bias_row(tid), q0, q1);
  });
  at::Tensor grad_lib = row_dlib.sum(0).to(logits.scalar_type());
  auto [grad_theta, grad_bias] = acc.reduce(logits.scalar_type());
  return {grad_logits, grad_lib, grad_theta, grad_bias};
}

// Forward plus the unit-weight gradient (NbFwdGradArgs): logits are overwritten with
// d out_r / d logits_r. Returns (out, lse, row_dlog_library (P, C) float64,
// sum over rows of d out_r / d log_theta (G,), of d out_r / d logit_bias (G,) or (0,)).
template <class T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_grad_impl(
    const NbCounts<T>& counts, const T* count_values, int64_t n_counts, at::Tensor& logits,
    const at::Tensor& log_library, const at::Tensor& log_theta, const at::Tensor* bias,
    const NbInputs& in) {
  const at::IntArrayRef lead = logits.sizes().slice(0, logits.dim() - 1);
  const auto f64 = logits.options().dtype(at::kDouble);
  at::Tensor out = at::empty(lead, logits.options());
  at::Tensor lse = at::empty(lead, f64);
  at::Tensor row_dlib = at::zeros({in.P, in.C}, f64);
  const int64_t n_bias = bias != nullptr ? in.G : 0;
  if (in.P * in.C == 0 || in.G == 0) {
    out.zero_();
    lse.fill_(-std::numeric_limits<double>::infinity());
    logits.zero_();
    return {out, lse, row_dlib, at::zeros({in.G}, logits.options()),
            at::zeros({n_bias}, logits.options())};
  }
  const TypedKernels<T>& kern = typed<T>(active_kernels());
  GeneData<T> gd = prepare_genes<T>(kern, log_theta, count_values, n_counts, false);
  GeneData<T> dgd = prepare_genes<T>(kern, log_theta, count_values, n_counts, true);
  TORCH_INTERNAL_ASSERT(gd.genes.K == dgd.genes.K, "count tables of different sizes");
  const int64_t Gp = gd.genes.Gp;
  GeneGradAccumulators acc(logits, in.G, Gp, bias != nullptr);
  NbFwdGradArgs<T> a;
  fill_row_inputs(a, in, gd, counts, logits, log_library, bias);
  a.dtable = dgd.genes.table;
  a.out = out.data_ptr<T>();
  a.lse = lse.data_ptr<double>();
  a.row_dlog_library = row_dlib.data_ptr<double>();
  run_rows<T>(in, Gp, [&](const NbScratch<T>& sc, int tid, int64_t q0, int64_t q1) {
    return kern.nb_forward_grad(a, sc, acc.theta_row(tid), acc.bias_row(tid), q0, q1);
  });
  auto [d_theta, d_bias] = acc.reduce(logits.scalar_type());
  return {out, lse, row_dlib, d_theta, d_bias};
}

template <class T>
NbCounts<T> csr_counts(const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values) {
  NbCounts<T> c;
  c.crow = crow.data_ptr<int64_t>();
  c.col = col.data_ptr<int64_t>();
  c.val = values.data_ptr<T>();
  return c;
}

template <class T>
NbCounts<T> dense_counts(const at::Tensor& counts) {
  NbCounts<T> c;
  c.dense = counts.data_ptr<T>();
  return c;
}

void check_dense(const at::Tensor& counts, const at::Tensor& logits, NbInputs& in) {
  in.max_entries = in.G;
  check_cpu_contiguous(counts, kOp, "counts");
  check_dtype(counts, logits.scalar_type(), kOp, "counts");
  check_shape(counts, {in.C, in.G}, kOp, "counts");
}

std::tuple<at::Tensor, at::Tensor> nb_fwd_csr(const at::Tensor& crow, const at::Tensor& col,
                                              const at::Tensor& values, const at::Tensor& logits,
                                              const at::Tensor& log_library,
                                              const at::Tensor& log_theta,
                                              const c10::optional<at::Tensor>& logit_bias) {
  NbInputs in = check_common(logits, log_library, log_theta);
  check_csr(crow, col, values, logits, in);
  const at::Tensor* bias = check_bias(logit_bias, logits, in);
  return AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "nb_log_prob_fwd", [&] {
    return forward_impl<scalar_t>(csr_counts<scalar_t>(crow, col, values),
                                  values.data_ptr<scalar_t>(), values.numel(), logits,
                                  log_library, log_theta, bias, in);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> nb_bwd_csr(
    const at::Tensor& grad_out, const at::Tensor& crow, const at::Tensor& col,
    const at::Tensor& values, const at::Tensor& logits, const at::Tensor& log_library,
    const at::Tensor& log_theta, const at::Tensor& lse,
    const c10::optional<at::Tensor>& logit_bias) {
  NbInputs in = check_common(logits, log_library, log_theta);
  check_csr(crow, col, values, logits, in);
  const at::Tensor* bias = check_bias(logit_bias, logits, in);
  return AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "nb_log_prob_bwd", [&] {
    return backward_impl<scalar_t>(grad_out, csr_counts<scalar_t>(crow, col, values),
                                   values.data_ptr<scalar_t>(), values.numel(), logits,
                                   log_library, log_theta, lse, bias, in);
  });
}

std::tuple<at::Tensor, at::Tensor> nb_fwd_dense(const at::Tensor& counts,
                                                const at::Tensor& logits,
                                                const at::Tensor& log_library,
                                                const at::Tensor& log_theta,
                                                const c10::optional<at::Tensor>& logit_bias) {
  NbInputs in = check_common(logits, log_library, log_theta);
  check_dense(counts, logits, in);
  const at::Tensor* bias = check_bias(logit_bias, logits, in);
  return AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "nb_log_prob_dense_fwd", [&] {
    return forward_impl<scalar_t>(dense_counts<scalar_t>(counts), counts.data_ptr<scalar_t>(),
                                  counts.numel(), logits, log_library, log_theta, bias, in);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> nb_bwd_dense(
    const at::Tensor& grad_out, const at::Tensor& counts, const at::Tensor& logits,
    const at::Tensor& log_library, const at::Tensor& log_theta, const at::Tensor& lse,
    const c10::optional<at::Tensor>& logit_bias) {
  NbInputs in = check_common(logits, log_library, log_theta);
  check_dense(counts, logits, in);
  const at::Tensor* bias = check_bias(logit_bias, logits, in);
  return AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "nb_log_prob_dense_bwd", [&] {
    return backward_impl<scalar_t>(grad_out, dense_counts<scalar_t>(counts),
                                   counts.data_ptr<scalar_t>(), counts.numel(), logits,
                                   log_library, log_theta, lse, bias, in);
  });
}

using FwdGradResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

FwdGradResult nb_fwd_grad_csr(const at::Tensor& crow, const at::Tensor& col,
                              const at::Tensor& values, at::Tensor& logits,
                              const at::Tensor& log_library, const at::Tensor& log_theta,
                              const c10::optional<at::Tensor>& logit_bias) {
  NbInputs in = check_common(logits, log_library, log_theta);
  check_csr(crow, col, values, logits, in);
  const at::Tensor* bias = check_bias(logit_bias, logits, in);
  return AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "nb_log_prob_fwd_grad", [&] {
    return forward_grad_impl<scalar_t>(csr_counts<scalar_t>(crow, col, values),
                                       values.data_ptr<scalar_t>(), values.numel(), logits,
                                       log_library, log_theta, bias, in);
  });
}

FwdGradResult nb_fwd_grad_dense(const at::Tensor& counts, at::Tensor& logits,
                                const at::Tensor& log_library, const at::Tensor& log_theta,
                                const c10::optional<at::Tensor>& logit_bias) {
  NbInputs in = check_common(logits, log_library, log_theta);
  check_dense(counts, logits, in);
  const at::Tensor* bias = check_bias(logit_bias, logits, in);
  return AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "nb_log_prob_dense_fwd_grad", [&] {
    return forward_grad_impl<scalar_t>(dense_counts<scalar_t>(counts),
                                       counts.data_ptr<scalar_t>(), counts.numel(), logits,
                                       log_library, log_theta, bias, in);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(samsvae, m) {
  m.def("nb_log_prob_fwd(Tensor crow, Tensor col, Tensor values, Tensor logits, "
        "Tensor log_library, Tensor log_theta, Tensor? logit_bias=None) -> (Tensor, Tensor)");
  m.def("nb_log_prob_bwd(Tensor grad_out, Tensor crow, Tensor col, Tensor values, "
        "Tensor logits, Tensor log_library, Tensor log_theta, Tensor lse, "
        "Tensor? logit_bias=None) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("nb_log_prob_dense_fwd(Tensor counts, Tensor logits, Tensor log_library, "
        "Tensor log_theta, Tensor? logit_bias=None) -> (Tensor, Tensor)");
  m.def("nb_log_prob_dense_bwd(Tensor grad_out, Tensor counts, Tensor logits, "
        "Tensor log_library, Tensor log_theta, Tensor lse, Tensor? logit_bias=None) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // forward + unit-weight gradient; logits is overwritten with d out_r / d logits_r
  m.def("nb_log_prob_fwd_grad(Tensor crow, Tensor col, Tensor values, Tensor(a!) logits, "
        "Tensor log_library, Tensor log_theta, Tensor? logit_bias=None) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("nb_log_prob_dense_fwd_grad(Tensor counts, Tensor(a!) logits, Tensor log_library, "
        "Tensor log_theta, Tensor? logit_bias=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(samsvae, CPU, m) {
  m.impl("nb_log_prob_fwd", &nb_fwd_csr);
  m.impl("nb_log_prob_bwd", &nb_bwd_csr);
  m.impl("nb_log_prob_dense_fwd", &nb_fwd_dense);
  m.impl("nb_log_prob_dense_bwd", &nb_bwd_dense);
  m.impl("nb_log_prob_fwd_grad", &nb_fwd_grad_csr);
  m.impl("nb_log_prob_dense_fwd_grad", &nb_fwd_grad_dense);
}

}  // namespace cpu
}  // namespace samsvae
