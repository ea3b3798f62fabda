// Negative binomial log-likelihood kernels, written once against Lanes<T> (simd_math.h) and
// compiled per ISA (csrc/isa/*.cpp include this inside their own namespace).
//
// Per cell c (a row of counts, shared by the P particle rows of logits):
//   lse    = log sum_g exp(logit_g)                       (max pass, then exp-sum pass)
//   mu_g   = library * softmax_g,  y_g = mu_g / theta_g,  s_g = log1p(y_g)
//   loglik = -sum_g theta_g s_g                           (every gene, vectorised)
//            + sum_{entries} [T(x, theta_g) + x (logit_g - s_g)] + X (log_library - lse)
// with X = sum of the cell's counts and T(x, theta) = D(x, theta) - lgamma(x + 1) from the
// per-gene table (small integer counts) or nb_count_term (float64, any count). T depends on
// the cell only, so it is evaluated once for all particles; the per-entry sums are float64.
//
// Backward, with w = 1/(1+y), v = y w, f(y) = log1p(y) - v (nb_log1p_minus_v):
//   dL/dlogmu_g   = go * w_g (x_g - mu_g)          (counts scattered into a zeroed dense row)
//   dL/dlogit_g   = dL/dlogmu_g - softmax_g * S,      S = sum_g dL/dlogmu_g = dL/dlog_library
//   dL/dlogtheta_g += go (x_g v_g - theta_g f(y_g))  (every gene, vectorised)
//                     + (sum of go over the cell's rows) dT(x, theta_g)   (entries, once a cell)
// accumulated in a per-thread float64 row (the every-gene part through a T row flushed every 8
// rows), reduced over threads by the caller.

// f(y) = log1p(y) - y / (1 + y) = -log(w) - v, given w = 1 / (1 + y) and v = y w = 1 - w.
// It is ~v^2/2 for small v, so the direct difference would cancel. Float lanes: for
// v < 1 - sqrt(1/2), log(w) = log(1 - v) comes from the log kernel at f = -v, whose linear
// term -v is dropped symbolically; above, w is reduced as usual and the difference is benign.
SV_INLINE vf nb_log1p_minus_v(vf /*y*/, vf w, vf v) {
  const vi small = v < 0.29289321881f;
  vf fr, er;
  vf_log_reduce<false>(w, &fr, &er);  // w in (0, 1], normal
  const vf arg = small ? -v : fr;
  const vf ef = small ? vf{} : er;
  const vf q = vf_log_kernel_nonlinear(arg, ef);  // log(w) = arg + q + ef * ln2_hi
  const vf lin = small ? vf{} : (vf{} - arg) - ef * 0.693359375f - v;
  return lin - q;
}

// float64: the series sum_{k>=2} v^k / k for small v, the difference elsewhere
SV_INLINE double nb_log1p_minus_v(double y, double /*w*/, double v) {
  if (v < 1e-3) {
    double p = 1.0 / 10.0;
    for (int k = 9; k >= 2; --k) p = p * v + 1.0 / k;
    return p * v * v;
  }
  return std::log1p(y) - v;
}

// Count-only term of an entry off the table (large or non-integer count) in float64, or NaN
// and ++bad for a negative, infinite or NaN count.
template <class T>
__attribute__((noinline, cold)) double nb_entry_term_general(T x, int64_t g,
                                                             const NbGenes<T>& gn,
                                                             bool derivative, int64_t& bad) {
  if (!(x >= (T)0 && x < (T)__builtin_inf())) {
    ++bad;
    return __builtin_nan("");
  }
  const double lt = (double)gn.log_theta[g];
  const double th = std::exp(lt);
  return derivative ? nb_count_term_dlogtheta((double)x, th)
                    : nb_count_term((double)x, th, lt);
}

// Count-only term of one stored entry: one table load for small integer counts.
template <class T>
SV_INLINE double nb_entry_term(T x, int64_t g, const NbGenes<T>& gn, T Kf, bool derivative,
                               int64_t& bad) {
  if (x >= (T)0 && x < Kf) {
    const int xi = (int)x;
    if ((T)xi == x) return gn.table[(int64_t)xi * gn.Gp + g];
  }
  return nb_entry_term_general(x, g, gn, derivative, bad);
}

// Prefetches the table element of entry k when the table outgrows the caches: the lookups are
// data-dependent loads, so without it each miss stalls on its own.
template <class T>
SV_INLINE void nb_prefetch_entry(const int64_t* ecol, const T* ex, int64_t k,
                                 const NbGenes<T>& gn, T Kf) {
  const T x = ex[k];
  const int64_t xi = x >= (T)0 && x < Kf ? (int64_t)x : 0;
  __builtin_prefetch(gn.table + xi * gn.Gp + ecol[k]);
}

SV_INLINE bool nb_table_is_large(int K, int64_t Gp) { return (int64_t)K * Gp * 8 > (256 << 10); }

constexpr int64_t kNbPrefetch = 32;  // entries ahead: enough to cover a memory latency

// Sum of the count-only terms of n entries, in four partial sums (one float64 accumulator
// would serialise on the add latency), prefetching kNbPrefetch entries ahead.
template <class T>
SV_INLINE double nb_entries_term_sum(const int64_t* ecol, const T* ex, int64_t n,
                                     const NbGenes<T>& gn, int64_t& bad) {
  const T Kf = (T)gn.K;
  const bool prefetch = nb_table_is_large(gn.K, gn.Gp);
  double a[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t k = 0;
  for (; k + 4 <= n; k += 4) {
    if (prefetch && k + kNbPrefetch + 4 <= n)
      for (int j = 0; j < 4; ++j) nb_prefetch_entry(ecol, ex, k + kNbPrefetch + j, gn, Kf);
    for (int j = 0; j < 4; ++j) a[j] += nb_entry_term(ex[k + j], ecol[k + j], gn, Kf, false, bad);
  }
  for (; k < n; ++k) a[0] += nb_entry_term(ex[k], ecol[k], gn, Kf, false, bad);
  return (a[0] + a[1]) + (a[2] + a[3]);
}

// out[k] = the count-only derivative term of entry k (same prefetching).
template <class T>
SV_INLINE void nb_entries_dterm(const int64_t* ecol, const T* ex, int64_t n,
                                const NbGenes<T>& gn, double* out, int64_t& bad) {
  const T Kf = (T)gn.K;
  const bool prefetch = nb_table_is_large(gn.K, gn.Gp);
  for (int64_t k = 0; k < n; ++k) {
    if (prefetch && k + kNbPrefetch < n) nb_prefetch_entry(ecol, ex, k + kNbPrefetch, gn, Kf);
    out[k] = nb_entry_term(ex[k], ecol[k], gn, Kf, true, bad);
  }
}

// Builds the table (rows: counts 0..K-1) for genes [g0, g1); g0 is a multiple of the vector
// width.
template <class T>
void nb_build_table(const NbGenes<T>& gn, double* table, bool derivative, int64_t g0,
                    int64_t g1) {
  typedef Lanes<T> L;
  typedef typename L::V V;
  const int64_t Gp = gn.Gp;
  double log_fact[kNbTableMaxCount + 1];  // lgamma(x + 1)
  log_fact[0] = log_fact[1] = 0.0;
  for (int x = 2; x < gn.K; ++x) log_fact[x] = log_fact[x - 1] + std::log((double)x);
  for (int64_t g = g0; g < g1; g += L::W) {
    const V it = L::load(gn.inv_theta + g), th = L::load(gn.theta + g);
    typename L::Acc acc;
    L::acc_zero(acc);
    L::acc_store(table + g, acc, 0.0);
    L::acc_store(table + Gp + g, acc, 0.0);
    for (int x = 2; x < gn.K; ++x) {
      const T j = (T)(x - 1);
      double* row = table + (int64_t)x * Gp + g;
      if (!derivative) {
        // D(x) = sum_{j<x} log1p(j / theta); T(x) = D(x) - lgamma(x + 1)
        L::acc_add(acc, L::log1p_nonneg(it * j));
        L::acc_store(row, acc, -log_fact[x]);
      } else {
        // dD(x)/dlog(theta) = -sum_{j<x} j / (theta + j): exact for integer x, no digamma
        L::acc_add(acc, (T)0 - j / (th + j));
        L::acc_store(row, acc, 0.0);
      }
    }
  }
}

// Largest integer count in [2, kNbTableMaxCount) (1 if none) and how many entries lie there.
template <class T>
void nb_scan_counts(const T* v, int64_t n, int* max_small, int64_t* n_small) {
  typedef Lanes<T> L;
  typedef typename L::V V;
  V mx = L::splat((T)1), cnt = L::splat((T)0);
  const V two = L::splat((T)2), kmax = L::splat((T)kNbTableMaxCount), one = L::splat((T)1);
  int64_t i = 0;
  for (; i + L::W <= n; i += L::W) {
    const V x = L::load(v + i);
    // x is in range and integral: floor via the int conversion of an in-range value
    const V xs = L::sel(L::lt(x, kmax), x, L::splat((T)0));
    const V hit = L::sel(L::lt(xs, two), L::splat((T)0), L::sel(L::eq(L::trunc(xs), xs), one,
                                                                  L::splat((T)0)));
    mx = L::vmax(mx, hit * xs);
    cnt = cnt + hit;
  }
  double m = L::hmax(mx);
  double c = 0.0;
  for (int k = 0; k < L::W; ++k) c += L::lane(cnt, k);
  for (; i < n; ++i) {
    const T x = v[i];
    if (x >= (T)2 && x < (T)kNbTableMaxCount && (T)(int)x == x) {
      m = (double)x > m ? (double)x : m;
      c += 1.0;
    }
  }
  *max_small = (int)m;
  *n_small = (int64_t)c;
}

// Returns cell c's stored entries (genes, counts; for dense counts the non-zeros, gathered
// into scratch) and sets X = sum of its counts.
template <class T>
SV_INLINE int64_t nb_cell_entries(const NbCounts<T>& cnt, int64_t c, int64_t G,
                                  const NbScratch<T>& s, const int64_t** ecol, const T** ex,
                                  double* X, NbStatus& st) {
  const double sum = 0.0;
  int64_t n;
  if (cnt.dense != nullptr) {
    n = compact_nonzero(cnt.dense + c * G, G, s.ent_col, s.ent_x);
    *ecol = s.ent_col;
    *ex = s.ent_x;
  } else {
    const int64_t b = cnt.crow[c];
    n = cnt.crow[c + 1] - b;
    *ecol = cnt.col + b;
    *ex = cnt.val + b;
    uint64_t out_of_range = 0;  // negative indices wrap to huge unsigned values
    for (int64_t k = 0; k < n; ++k) out_of_range |= (uint64_t)(*ecol)[k] >= (uint64_t)G;
    if (out_of_range) {
      ++st.bad_cells;
      n = 0;
    }
  }
  // four partial sums: a single float64 accumulator would serialise on the add latency
  double part[4] = {0.0, 0.0, 0.0, 0.0};
  const T* xv = *ex;
  int64_t k = 0;
  for (; k + 4 <= n; k += 4)
    for (int j = 0; j < 4; ++j) part[j] += (double)xv[k + j];
  for (; k < n; ++k) part[0] += (double)xv[k];
  *X = sum + (part[0] + part[1]) + (part[2] + part[3]);
  return n;
}

// A logits row read in vector steps: full vectors straight from memory, the last partial
// vector from a copy padded with -inf (whose softmax weight is exactly 0).
// A logits row plus the logit bias (added as it is read; no biased copy is written), padded
// with -inf to whole vectors. HasBias = false: the row alone.
template <class T, bool HasBias>
struct NbRow {
  typedef Lanes<T> L;
  typedef typename L::V V;
  const T* row;
  const T* bias;
  int64_t Gfull;
  alignas(64) T tail[Lanes<T>::W];
  SV_INLINE NbRow(const T* r, const T* b, int64_t G) : row(r), bias(b), Gfull(G - G % L::W) {
    for (int i = 0; i < L::W; ++i)
      tail[i] = Gfull + i < G ? r[Gfull + i] + (HasBias ? b[Gfull + i] : (T)0)
                              : (T)-__builtin_inf();
  }
  SV_INLINE V load(int64_t g) const {
    if (g >= Gfull) return L::load(tail);
    return HasBias ? L::load(row + g) + L::load(bias + g) : L::load(row + g);
  }
  SV_INLINE T max(int64_t Gp) const {
    V m = L::splat((T)-__builtin_inf());
    for (int64_t g = 0; g < Gp; g += L::W) m = L::vmax(m, load(g));
    return (T)L::hmax(m);
  }
};

// sum over a cell's stored entries of count * logit bias, in float64 (0 without a bias): the
// bias part of x . logits, the same for every particle row of the cell
template <class T>
SV_INLINE double nb_entries_bias_dot(const int64_t* ecol, const T* ex, int64_t n,
                                     const T* bias) {
  if (bias == nullptr) return 0.0;
  double part[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t k = 0;
  for (; k + 4 <= n; k += 4)
    for (int j = 0; j < 4; ++j) part[j] += (double)ex[k + j] * (double)bias[ecol[k + j]];
  for (; k < n; ++k) part[0] += (double)ex[k] * (double)bias[ecol[k]];
  return (part[0] + part[1]) + (part[2] + part[3]);
}

// Rows are numbered q = c * P + p (cell-major): a thread's range holds runs of particles of the
// same cell, whose counts it loads once per run. Returns the logits row that follows q in the
// range [q, q1) (q itself at the end), for prefetching.
template <class T>
SV_INLINE const T* nb_next_row(const T* logits, int64_t q, int64_t q1, int64_t P, int64_t C,
                               int64_t G) {
  const int64_t qn = q + 1 < q1 ? q + 1 : q;
  return logits + ((qn % P) * C + qn / P) * G;
}

// exp(logit_g + bias_g - max) of row r into s.aux; its max and sum_g exp(logit_g + bias_g - max)
template <class T, bool HasBias>
SV_INLINE void nb_row_exp_pass(const T* lrow, const T* bias, int64_t G, int64_t Gp,
                               const T* next, const NbScratch<T>& s, T* max_out,
                               double* sum_out) {
  typedef Lanes<T> L;
  typedef typename L::V V;
  const NbRow<T, HasBias> row(lrow, bias, G);
  const T m_s = row.max(Gp);
  const V m = L::splat(m_s);
  typename L::BlockSum se;
  for (int64_t g = 0; g < Gp; g += L::W) {
    __builtin_prefetch(next + g);  // the next row streams in while this one computes
    const V e = L::exp_nonpos(row.load(g) - m);
    L::store(s.aux + g, e);
    se.add(e);
  }
  *max_out = m_s;
  *sum_out = se.sum();
}

// Row r of the logits plus the bias: stores exp(logit_g + bias_g - max) in s.aux and returns
// the logits row (without the bias), its max and sum_g exp(logit_g + bias_g - max).
// next: the row to prefetch meanwhile.
template <class T>
SV_INLINE const T* nb_row_exp(const T* logits, const T* bias, int64_t r, int64_t G, int64_t Gp,
                              const T* next, const NbScratch<T>& s, T* max_out,
                              double* sum_out) {
  const T* lrow = logits + r * G;
  if (bias != nullptr) nb_row_exp_pass<T, true>(lrow, bias, G, Gp, next, s, max_out, sum_out);
  else nb_row_exp_pass<T, false>(lrow, bias, G, Gp, next, s, max_out, sum_out);
  return lrow;
}

// What the forward kernels need of cell c once for all its particle rows: its stored entries
// (n of them; total count X), the sum of their count-only terms and the bias part of
// x . logits, in float64, and its library size.
template <class T>
struct NbCellForward {
  const int64_t* ecol;
  const T* ex;
  int64_t n;
  double X, tsum, xbias, log_lib, lib;
  SV_INLINE NbCellForward(const NbCounts<T>& counts, int64_t c, const NbGenes<T>& gn,
                          const T* bias, const T* log_library, const NbScratch<T>& s,
                          NbStatus& st) {
    n = nb_cell_entries(counts, c, gn.G, s, &ecol, &ex, &X, st);
    tsum = nb_entries_term_sum(ecol, ex, n, gn, st.bad_counts);
    xbias = nb_entries_bias_dot(ecol, ex, n, bias);
    log_lib = (double)log_library[c];
    lib = std::exp(log_lib);
  }
};

template <class T>
NbStatus nb_forward_rows(const NbFwdArgs<T>& a, const NbScratch<T>& s, int64_t q0, int64_t q1) {
  typedef Lanes<T> L;
  typedef typename L::V V;
  const NbGenes<T>& gn = a.genes;
  const int64_t G = gn.G, Gp = gn.Gp, C = a.C, P = a.P;
  NbStatus st;
  for (int64_t q = q0; q < q1;) {
    const int64_t c = q / P, p0 = q % P, p1 = p0 + (q1 - q) < P ? p0 + (q1 - q) : P;
    const NbCellForward<T> cell(a.counts, c, gn, a.bias, a.log_library, s, st);
    const double lib = cell.lib;
    for (int64_t p = p0; p < p1; ++p, ++q) {
      const int64_t r = p * C + c;
      T m_s;
      double sum;
      const T* lrow = nb_row_exp(a.logits, a.bias, r, G, Gp,
                                 nb_next_row(a.logits, q, q1, P, C, G), s, &m_s, &sum);
      const double lse = (double)m_s + std::log(sum);
      // library / sum as an unevaluated sum hi + lo: its rounding would otherwise bias every
      // gene of the row the same way (errors that add up instead of averaging out)
      const T cl_hi = (T)(lib / sum);
      const V clh = L::splat(cl_hi), cll = L::splat((T)(lib / sum - (double)cl_hi));
      // theta_g s_g summed in T over blocks of vectors, each block then in float64: theta_eff
      // makes each product mu_g (1 + one rounding), so the block errors are random, not biased
      typename L::BlockSum zero_part;
      for (int64_t g = 0; g < Gp; g += L::W) {
        const V q = L::load(s.aux + g) * L::load(gn.inv_theta + g);
        const V sp = L::log1p_nonneg(q * clh + q * cll);
        L::store(s.aux + g, sp);
        zero_part.add(L::load(gn.theta_eff + g) * sp);
      }
      // x (logit - s) per stored entry in float64: the products are exact there, and the
      // terms are large (hundreds of nats) where they cancel against X (log_library - lse)
      const double lin = gather_diff_dot(cell.ecol, cell.ex, cell.n, lrow, s.aux) + cell.xbias;
      a.out[r] = (T)(cell.tsum + lin + cell.X * (cell.log_lib - lse) - zero_part.sum());
      a.lse[r] = lse;
    }
  }
  return st;
}

// acc[g] += part[g] in float64; part = 0
template <class T>
SV_INLINE void nb_flush_theta(T* part, double* acc, int64_t Gp) {
  typedef Lanes<T> L;
  for (int64_t g = 0; g < Gp; g += L::W) {
    L::add_to(acc + g, L::load(part + g));
    L::store(part + g, L::splat((T)0));
  }
}

template <class T>
NbStatus nb_backward_rows(const NbBwdArgs<T>& a, const NbScratch<T>& s, double* theta_acc,
                          double* bias_acc, int64_t q0, int64_t q1) {
  typedef Lanes<T> L;
  typedef typename L::V V;
  constexpr int W = L::W;
  const NbGenes<T>& gn = a.genes;
  const int64_t G = gn.G, Gp = gn.Gp, C = a.C, P = a.P;
  NbStatus st;
  int64_t& bad = st.bad_counts;
  alignas(64) T gtail[W];
  int rows_in_part = 0;
  for (int64_t q = q0; q < q1;) {
    const int64_t c = q / P, p0 = q % P, p1 = p0 + (q1 - q) < P ? p0 + (q1 - q) : P;
    const int64_t* ecol;
    const T* ex;
    double X;
    const int64_t n = nb_cell_entries(a.counts, c, G, s, &ecol, &ex, &X, st);
    nb_entries_dterm(ecol, ex, n, gn, s.ent_t, bad);
    for (int64_t k = 0; k < n; ++k)
      s.xrow[ecol[k]] += ex[k];  // duplicate columns add up, as in the reference
    const double lib = std::exp((double)a.log_library[c]);
    double go_cell = 0.0;  // sum of grad_out over this cell's rows here: weight of dT(x, theta)
    for (int64_t p = p0; p < p1; ++p, ++q) {
      const int64_t r = p * C + c;
      T* grow = a.grad_logits + r * G;
      const T go_s = a.grad_out[r];
      a.row_dlog_library[r] = 0.0;
      if (go_s == (T)0) {
        std::memset(grow, 0, sizeof(T) * G);
        continue;
      }
      // the bias (or the scratch row of zeros) added as the row is read
      const NbRow<T, true> row(a.logits + r * G, a.bias != nullptr ? a.bias : s.zeros, G);
      const T m_s = row.max(Gp);
      const double sum = std::exp(a.lse[r] - (double)m_s);
      const T* next = nb_next_row(a.logits, q, q1, P, C, G);
      const T cl_hi = (T)(lib / sum);
      const V clh = L::splat(cl_hi), cll = L::splat((T)(lib / sum - (double)cl_hi));
      const V m = L::splat(m_s), go = L::splat(go_s);
      const V one = L::splat((T)1);
      typename L::BlockSum S;
      for (int64_t g = 0; g < Gp; g += W) {
        __builtin_prefetch(next + g);
        const V e = L::exp_nonpos(row.load(g) - m);
        const V mu = e * clh + e * cll;
        const V y = mu * L::load(gn.inv_theta + g);
        const V w = L::recip(one + y);
        const V v = y * w;
        const V x = L::load(s.xrow + g);
        const V dlm = go * w * (x - mu);
        L::store(s.aux + g, e);
        if (g < row.Gfull) L::store(grow + g, dlm);
        else L::store(gtail, dlm);
        S.add(dlm);
        const V f = nb_log1p_minus_v(y, w, v);
        L::store(s.theta_part + g,
                 L::load(s.theta_part + g) + go * (x * v - L::load(gn.theta + g) * f));
      }
      go_cell += (double)go_s;
      const double Sd = S.sum();
      a.row_dlog_library[r] = Sd;
      const T k = (T)(Sd / sum);  // softmax_g * S = e_g * (S / sum)
      const V kv = L::splat(k);
      if (bias_acc == nullptr) {
        for (int64_t g = 0; g < row.Gfull; g += W)
          L::store(grow + g, L::load(grow + g) - L::load(s.aux + g) * kv);
      } else {  // dL/dbias_g = sum over rows of dL/dlogit_g
        for (int64_t g = 0; g < row.Gfull; g += W) {
          const V d = L::load(grow + g) - L::load(s.aux + g) * kv;
          L::store(grow + g, d);
          L::store(s.bias_part + g, L::load(s.bias_part + g) + d);
        }
      }
      for (int64_t g = row.Gfull; g < G; ++g) {
        grow[g] = gtail[g - row.Gfull] - s.aux[g] * k;
        if (bias_acc != nullptr) s.bias_part[g] += grow[g];
      }
      if (++rows_in_part == 8) {
        nb_flush_theta(s.theta_part, theta_acc, Gp);
        if (bias_acc != nullptr) nb_flush_theta(s.bias_part, bias_acc, Gp);
        rows_in_part = 0;
      }
    }
    // count-only part of dL/dlog(theta): the same for every particle row of the cell
    if (go_cell != 0.0)
      for (int64_t k = 0; k < n; ++k) theta_acc[ecol[k]] += go_cell * s.ent_t[k];
    for (int64_t k = 0; k < n; ++k) s.xrow[ecol[k]] = (T)0;
  }
  nb_flush_theta(s.theta_part, theta_acc, Gp);
  if (bias_acc != nullptr) nb_flush_theta(s.bias_part, bias_acc, Gp);
  return st;
}

// Forward and unit-gradient in one pass over each logits row (see NbFwdGradArgs), for a loss
// that weights every row alike. Per row: max, exp pass (e_g kept), one pass computing
// s_g = log1p(y_g) for the value and w, v, f for the gradient from a single log, then
//   d out_r / d logit_g = w_g (x_g - mu_g) - softmax_g S_r,  S_r = sum_g w_g (x_g - mu_g)
// written over the logits row. theta_acc / bias_acc receive the sums over rows of
// d out_r / d log(theta_g) and d out_r / d bias_g (unit weights), as nb_backward_rows does
// with go = 1. Against a forward then a backward, this saves one max pass, one exp and one
// log per element and the backward's read of the logits and write of a fresh gradient tensor.
template <class T>
NbStatus nb_forward_grad_rows(const NbFwdGradArgs<T>& a, const NbScratch<T>& s,
                              double* theta_acc, double* bias_acc, int64_t q0, int64_t q1) {
  typedef Lanes<T> L;
  typedef typename L::V V;
  constexpr int W = L::W;
  const NbGenes<T>& gn = a.genes;
  NbGenes<T> dgn = gn;
  dgn.table = a.dtable;
  const int64_t G = gn.G, Gp = gn.Gp, C = a.C, P = a.P;
  NbStatus st;
  int64_t& bad = st.bad_counts;
  int rows_in_part = 0;
  for (int64_t q = q0; q < q1;) {
    const int64_t c = q / P, p0 = q % P, p1 = p0 + (q1 - q) < P ? p0 + (q1 - q) : P;
    const NbCellForward<T> cell(a.counts, c, gn, a.bias, a.log_library, s, st);
    const int64_t* ecol = cell.ecol;
    const T* ex = cell.ex;
    const int64_t n = cell.n;
    const double lib = cell.lib;
    nb_entries_dterm(ecol, ex, n, dgn, s.ent_t, bad);
    for (int64_t k = 0; k < n; ++k)
      s.xrow[ecol[k]] += ex[k];  // duplicate columns add up, as in the reference
    const double rows_cell = (double)(p1 - p0);  // unit weight of each of the cell's rows here
    for (int64_t p = p0; p < p1; ++p, ++q) {
      const int64_t r = p * C + c;
      T* grow = a.logits + r * G;
      T m_s;
      double sum;
      const T* lrow = nb_row_exp<T>(a.logits, a.bias, r, G, Gp,
                                    nb_next_row<T>(a.logits, q, q1, P, C, G), s, &m_s, &sum);
      const double lse = (double)m_s + std::log(sum);
      const T cl_hi = (T)(lib / sum);
      const V clh = L::splat(cl_hi), cll = L::splat((T)(lib / sum - (double)cl_hi));
      const V one = L::splat((T)1);
      typename L::BlockSum zero_part, S;
      for (int64_t g = 0; g < Gp; g += W) {
        const V e = L::load(s.aux + g);
        const V mu = e * clh + e * cll;
        const V y = mu * L::load(gn.inv_theta + g);
        const V w = L::recip(one + y);
        const V v = y * w;
        const V f = nb_log1p_minus_v(y, w, v);  // log1p(y) - v, accurate for small v
        const V sp = f + v;                     // log1p(y)
        L::store(s.sp + g, sp);
        zero_part.add(L::load(gn.theta_eff + g) * sp);
        const V x = L::load(s.xrow + g);
        const V dlm = w * (x - mu);
        L::store(s.dl + g, dlm);
        S.add(dlm);
        L::store(s.theta_part + g,
                 L::load(s.theta_part + g) + (x * v - L::load(gn.theta + g) * f));
      }
      // read the logits at the entries before the row is overwritten below
      const double lin = gather_diff_dot(ecol, ex, n, lrow, s.sp) + cell.xbias;
      a.out[r] = (T)(cell.tsum + lin + cell.X * (cell.log_lib - lse) - zero_part.sum());
      a.lse[r] = lse;
      const double Sd = S.sum();
      a.row_dlog_library[r] = Sd;
      const V kv = L::splat((T)(Sd / sum));  // softmax_g * S = e_g * (S / sum)
      const int64_t Gfull = G - G % W;
      if (bias_acc == nullptr) {
        for (int64_t g = 0; g < Gfull; g += W)
          L::store(grow + g, L::load(s.dl + g) - L::load(s.aux + g) * kv);
      } else {
        for (int64_t g = 0; g < Gfull; g += W) {
          const V d = L::load(s.dl + g) - L::load(s.aux + g) * kv;
          L::store(grow + g, d);
          L::store(s.bias_part + g, L::load(s.bias_part + g) + d);
        }
      }
      const T k = (T)(Sd / sum);
      for (int64_t g = Gfull; g < G; ++g) {
        grow[g] = s.dl[g] - s.aux[g] * k;
        if (bias_acc != nullptr) s.bias_part[g] += grow[g];
      }
      if (++rows_in_part == 8) {
        nb_flush_theta(s.theta_part, theta_acc, Gp);
        if (bias_acc != nullptr) nb_flush_theta(s.bias_part, bias_acc, Gp);
        rows_in_part = 0;
      }
    }
    for (int64_t k = 0; k < n; ++k) theta_acc[ecol[k]] += rows_cell * s.ent_t[k];
    for (int64_t k = 0; k < n; ++k) s.xrow[ecol[k]] = (T)0;
  }
  nb_flush_theta(s.theta_part, theta_acc, Gp);
  if (bias_acc != nullptr) nb_flush_theta(s.bias_part, bias_acc, Gp);
  return st;
}
