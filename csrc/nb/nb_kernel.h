// Plain-data arguments of the negative binomial kernels (no torch types: these structs cross
// from the op layer, compiled for the baseline ISA, into the per-ISA kernel translation units).
//
// Shapes: P particles, C cells, G genes, Gp = G rounded up to the vector width (per-gene
// arrays and scratch rows are padded so every vector load is in bounds; padding genes hold
// theta = 1 and count 0, which contribute exactly 0).
#pragma once

#include <cstdint>

namespace samsvae {
namespace cpu {

// Integer counts x < kNbTableMaxCount take their count-only term from a per-gene table built
// once per call (rows 0 and 1 are exactly 0: D(0) = D(1) - lgamma(2) = 0, and so are their
// derivatives), so the common case is one branch-free load.
constexpr int kNbTableMaxCount = 32;

template <class T>
struct NbGenes {
  int64_t G = 0, Gp = 0;
  const T* log_theta = nullptr;  // (G) log inverse dispersion
  const T* theta = nullptr;      // (Gp) exp(log_theta); padding 1
  const T* inv_theta = nullptr;  // (Gp) 1 / theta; padding 1
  const T* theta_eff = nullptr;  // (Gp) 1 / inv_theta (computed in float64, rounded once):
                                 // multiplying log1p(mu * inv_theta) by it cancels the
                                 // rounding of inv_theta to within one rounding of T
  int K = 2;                     // table covers integer counts 0 .. K-1 (K >= 2)
  const double* table = nullptr; // (K, Gp): forward T(x) = D(x,theta) - lgamma(x+1),
                                 // backward dD(x,theta)/dlog(theta); row x is count x.
                                 // float64 even for float32 inputs: T reaches hundreds of
                                 // nats and cancels against the linear term
};

template <class T>
struct NbCounts {
  // Exactly one of (crow, col, val) and dense is set.
  const int64_t* crow = nullptr;  // (C+1)
  const int64_t* col = nullptr;   // (nnz)
  const T* val = nullptr;         // (nnz)
  const T* dense = nullptr;       // (C, G) row-major
};

// What a kernel call met that the caller must report as an error.
struct NbStatus {
  int64_t bad_counts = 0;  // entries whose count is negative, infinite or NaN
  int64_t bad_cells = 0;   // cells with a column index outside [0, G) (their entries are skipped)
};

template <class T>
struct NbScratch {  // one per thread; rows of Gp elements unless noted
  T* xrow = nullptr;           // backward: counts of the current cell; all zero between cells
  T* aux = nullptr;            // exp(logit - max) of the current row; forward: then log1p(y)
  const T* zeros = nullptr;    // a row of zeros: the logit bias of a call without one
  T* bias_part = nullptr;      // backward with a bias: dL/dbias of the last few rows, in T
                               // (flushed with theta_part)
  T* theta_part = nullptr;     // backward: dL/dlog(theta) of the last few rows except the
                               // per-entry table term, in T (flushed into the thread's
                               // float64 accumulator every 8 rows)
  T* sp = nullptr;              // forward with gradient: log1p(y) of the current row
  T* dl = nullptr;              // forward with gradient: w (x - mu) of the current row
  int64_t* ent_col = nullptr;  // (G) dense counts: genes of the non-zero entries
  T* ent_x = nullptr;          // (G) their counts
  double* ent_t = nullptr;     // (max entries per cell) count-only term of each entry
};

template <class T>
struct NbFwdArgs {
  int64_t P = 1, C = 0;
  NbGenes<T> genes;
  NbCounts<T> counts;
  const T* logits = nullptr;       // (P, C, G)
  const T* log_library = nullptr;  // (C)
  const T* bias = nullptr;         // (G) logit bias added to every logits row, or null
  T* out = nullptr;                // (P, C) log-likelihood, nats
  double* lse = nullptr;           // (P, C) logsumexp of each logits row (saved for backward)
};

template <class T>
struct NbBwdArgs {
  int64_t P = 1, C = 0;
  NbGenes<T> genes;
  NbCounts<T> counts;
  const T* logits = nullptr;       // (P, C, G)
  const T* log_library = nullptr;  // (C)
  const double* lse = nullptr;     // (P, C)
  const T* bias = nullptr;         // (G) logit bias, or null
  const T* grad_out = nullptr;     // (P, C)
  T* grad_logits = nullptr;        // (P, C, G)
  double* row_dlog_library = nullptr;  // (P, C) dL/dlog_library of each row (summed over P by
                                       // the caller: rows of one cell may run on several threads)
};

// The forward pass that also computes the gradient for a unit upstream gradient of every row
// (training: the loss weights every row alike, so the backward only scales these). The logits
// are read, then overwritten row by row with d out_r / d logits_r.
template <class T>
struct NbFwdGradArgs {
  int64_t P = 1, C = 0;
  NbGenes<T> genes;                // table: the forward count terms
  const double* dtable = nullptr;  // (K, Gp) the derivative count terms (same K as genes.table)
  NbCounts<T> counts;
  T* logits = nullptr;             // (P, C, G) in: logits; out: unit gradients
  const T* log_library = nullptr;  // (C)
  const T* bias = nullptr;         // (G) logit bias, or null
  T* out = nullptr;                // (P, C) log-likelihood, nats
  double* lse = nullptr;           // (P, C) logsumexp of each (biased) logits row
  double* row_dlog_library = nullptr;  // (P, C) d out_r / d log_library
};

}  // namespace cpu
}  // namespace samsvae
