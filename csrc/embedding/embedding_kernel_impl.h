// Masked embedding composition kernels, written against Lanes<T> and compiled per ISA.
//
// Sample (parallel over the U perturbations of the batch; each touches only its own rows):
//   e[k,u]    = loc[t] + exp(log_scale[t]) * eps[k,u]                    t = index[u]
//   soft[k,u] = sigmoid((mask_logits[t] + log(unif) - log1p(-unif)) / temperature)
//   mask[k,u] = soft > 1/2   (straight-through: the gradient is that of soft)
// Compose (parallel over cells):  z[k,i] = sum_{entries (i,u)} dose * (e[k,u] * mask[k,u])
// Backward (parallel over u, through the transposed dosage, so no two threads write the
// same row of a gradient table and no atomics or per-thread copies are needed).

// Rows of L values read and written in vector steps; the last, partial step goes through a
// padded copy.
template <class T>
struct EmbRowIO {
  typedef Lanes<T> L;
  typedef typename L::V V;
  int64_t n, nfull;
  SV_INLINE explicit EmbRowIO(int64_t len) : n(len), nfull(len - len % L::W) {}
  SV_INLINE V load(const T* row, int64_t l, T pad) const {
    if (l < nfull) return L::load(row + l);
    alignas(64) T tmp[L::W];
    for (int i = 0; i < L::W; ++i) tmp[i] = l + i < n ? row[l + i] : pad;
    return L::load(tmp);
  }
  SV_INLINE void store(T* row, int64_t l, V v) const {
    if (l < nfull) {
      L::store(row + l, v);
      return;
    }
    alignas(64) T tmp[L::W];
    L::store(tmp, v);
    for (int64_t i = 0; l + i < n; ++i) row[l + i] = tmp[i];
  }
};

// Scratch: one row of Lp = L rounded up to the vector width.
template <class T>
void emb_sample(const EmbFwdArgs<T>& a, T* tmp, int64_t u0, int64_t u1) {
  typedef Lanes<T> L;
  typedef typename L::V V;
  const int64_t Ld = a.L;
  const EmbRowIO<T> io(Ld);
  T* scale = tmp;  // exp(log_scale) of the current perturbation
  const V one = L::splat((T)1), half = L::splat((T)0.5), zero = L::splat((T)0);
  const T tau = (T)a.temperature;
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t t = a.index[u];
    const T* loc = a.loc + t * Ld;
    if (a.log_scale != nullptr)
      for (int64_t l = 0; l < Ld; l += L::W)
        L::store(scale + l, L::exp(io.load(a.log_scale + t * Ld, l, (T)0)));
    for (int64_t k = 0; k < a.P; ++k) {
      const int64_t base = (k * a.U + u) * Ld;
      if (a.log_scale != nullptr) {
        for (int64_t l = 0; l < Ld; l += L::W)
          io.store(a.emb + base, l,
                   io.load(loc, l, (T)0) + L::load(scale + l) * io.load(a.eps + base, l, (T)0));
      } else {
        std::memcpy(a.emb + base, loc, sizeof(T) * Ld);
      }
      if (a.mask_logits != nullptr) {
        const T* logit = a.mask_logits + t * Ld;
        for (int64_t l = 0; l < Ld; l += L::W) {
          const V uu = io.load(a.unif + base, l, (T)0.5);
          const V logistic = L::log(uu) - L::log1p(zero - uu);
          const V zz = (io.load(logit, l, (T)0) + logistic) / tau;
          const V soft = one / (one + L::exp(zero - zz));
          io.store(a.soft + base, l, soft);
          io.store(a.mask + base, l, L::sel(L::gt(soft, half), one, zero));
        }
      }
    }
  }
}

template <class T>
void emb_compose(const EmbFwdArgs<T>& a, int64_t i0, int64_t i1) {
  const int64_t Ld = a.L;
  for (int64_t i = i0; i < i1; ++i) {
    for (int64_t k = 0; k < a.P; ++k) {
      T* __restrict__ z = a.z + (k * a.C + i) * Ld;
      for (int64_t l = 0; l < Ld; ++l) z[l] = (T)0;
      for (int64_t e = a.crow[i]; e < a.crow[i + 1]; ++e) {
        const int64_t base = (k * a.U + a.lcol[e]) * Ld;
        const T d = a.dose[e];
        const T* __restrict__ em = a.emb + base;
        if (a.mask != nullptr) {
          const T* __restrict__ mk = a.mask + base;
          for (int64_t l = 0; l < Ld; ++l) z[l] += (em[l] * mk[l]) * d;
        } else {
          for (int64_t l = 0; l < Ld; ++l) z[l] += em[l] * d;
        }
      }
    }
  }
}

// Scratch: 5 rows of Lp.
template <class T>
void emb_backward(const EmbBwdArgs<T>& a, T* tmp, int64_t u0, int64_t u1) {
  typedef Lanes<T> L;
  const int64_t Ld = a.L, Lp = (Ld + L::W - 1) / L::W * L::W;
  const EmbRowIO<T> io(Ld);
  T* __restrict__ scale = tmp;
  T* __restrict__ dval = tmp + Lp;
  T* __restrict__ g_loc = tmp + 2 * Lp;
  T* __restrict__ g_ls = tmp + 3 * Lp;
  T* __restrict__ g_ml = tmp + 4 * Lp;
  const T tau = (T)a.temperature;
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t t = a.index[u];
    if (a.log_scale != nullptr)
      for (int64_t l = 0; l < Ld; l += L::W)
        L::store(scale + l, L::exp(io.load(a.log_scale + t * Ld, l, (T)0)));
    for (int64_t l = 0; l < Ld; ++l) g_loc[l] = g_ls[l] = g_ml[l] = (T)0;
    for (int64_t k = 0; k < a.P; ++k) {
      for (int64_t l = 0; l < Ld; ++l) dval[l] = (T)0;
      for (int64_t e = a.ccol[u]; e < a.ccol[u + 1]; ++e) {
        const T* __restrict__ gz = a.grad_z + (k * a.C + a.crow_of[e]) * Ld;
        const T d = a.cdose[e];
        for (int64_t l = 0; l < Ld; ++l) dval[l] += gz[l] * d;
      }
      const int64_t base = (k * a.U + u) * Ld;
      const T* __restrict__ ge = a.grad_emb != nullptr ? a.grad_emb + base : nullptr;
      if (a.mask != nullptr) {
        const T* __restrict__ mk = a.mask + base;
        const T* __restrict__ em = a.emb + base;
        const T* __restrict__ sf = a.soft + base;
        const T* __restrict__ gm = a.grad_mask != nullptr ? a.grad_mask + base : nullptr;
        for (int64_t l = 0; l < Ld; ++l) {
          const T gmask = dval[l] * em[l] + (gm != nullptr ? gm[l] : (T)0);
          g_ml[l] += gmask * (((T)1 - sf[l]) * sf[l]) / tau;
          dval[l] = dval[l] * mk[l];
        }
      }
      if (ge != nullptr)
        for (int64_t l = 0; l < Ld; ++l) dval[l] += ge[l];
      for (int64_t l = 0; l < Ld; ++l) g_loc[l] += dval[l];
      if (a.log_scale != nullptr) {
        const T* __restrict__ ep = a.eps + base;
        for (int64_t l = 0; l < Ld; ++l) g_ls[l] += dval[l] * scale[l] * ep[l];
      }
    }
    T* gl = a.grad_loc + t * Ld;
    for (int64_t l = 0; l < Ld; ++l) gl[l] += g_loc[l];
    if (a.grad_log_scale != nullptr) {
      T* gs = a.grad_log_scale + t * Ld;
      for (int64_t l = 0; l < Ld; ++l) gs[l] += g_ls[l];
    }
    if (a.grad_mask_logits != nullptr) {
      T* gm = a.grad_mask_logits + t * Ld;
      for (int64_t l = 0; l < Ld; ++l) gm[l] += g_ml[l];
    }
  }
}
