// Portable SIMD types and elementwise math for the CPU kernels (GCC/Clang vector extensions).
//
// This header is NOT self-contained on purpose: an ISA translation unit (csrc/isa/*.cpp)
// includes every standard header first, then switches the target ISA with a pragma, defines
// SAMSVAE_VEC_BYTES (16, 32 or 64) and includes this file inside its own namespace. Every
// function here is therefore compiled once per ISA under a distinct name, and no inline
// function from a system or torch header is ever emitted with wider instructions (which the
// linker could otherwise pick for the whole program).
//
// Lanes<float> works on W = SAMSVAE_VEC_BYTES / 4 floats at a time with our own exp/log
// (Cody-Waite reduction + minimax polynomials, about 1 ulp); Lanes<double> is a scalar policy
// on top of libm (float64 is the accuracy path used by tests, not the fast path).

#ifndef SAMSVAE_VEC_BYTES
#error "define SAMSVAE_VEC_BYTES before including simd_math.h"
#endif

#define SV_INLINE inline __attribute__((always_inline))

typedef float vf __attribute__((vector_size(SAMSVAE_VEC_BYTES)));
typedef int32_t vi __attribute__((vector_size(SAMSVAE_VEC_BYTES)));
typedef float vfh __attribute__((vector_size(SAMSVAE_VEC_BYTES / 2)));   // W/2 floats
typedef double vdh __attribute__((vector_size(SAMSVAE_VEC_BYTES)));      // W/2 doubles

constexpr int kW = SAMSVAE_VEC_BYTES / 4;

SV_INLINE vf vf_splat(float s) { return vf{} + s; }
SV_INLINE vi vi_splat(int32_t s) { return vi{} + s; }
SV_INLINE vf vf_load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
SV_INLINE void vf_store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
SV_INLINE vf as_vf(vi v) { return (vf)v; }
SV_INLINE vi as_vi(vf v) { return (vi)v; }

#if defined(__x86_64__) && SAMSVAE_VEC_BYTES == 64
#define SV_X86_512 1
// All-lanes mask for the maskz_ forms of the AVX-512 intrinsics: the plain forms pass an
// "undefined" operand through, on which GCC 12 warns (falsely) "may be used uninitialized".
constexpr __mmask16 kAll16 = 0xFFFF;
#elif defined(__x86_64__) && SAMSVAE_VEC_BYTES == 32
#define SV_X86_256 1
#elif defined(__x86_64__) && SAMSVAE_VEC_BYTES == 16
#define SV_X86_128 1
#endif

// Reciprocal of a normal positive u to about 1 ulp without a division (divisions are the
// slowest vector instruction on x86): the hardware estimate (14 bits on AVX-512, 12 bits
// before) refined by Newton steps r <- r + r (1 - u r), each doubling the correct bits.
SV_INLINE vf vf_recip(vf u) {
#if defined(SV_X86_512)
  vf r = (vf)_mm512_maskz_rcp14_ps(kAll16, (__m512)u);
  return r + r * (1.0f - u * r);
#else
#if defined(SV_X86_256)
  vf r = (vf)_mm256_rcp_ps((__m256)u);
#elif defined(SV_X86_128)
  vf r = (vf)_mm_rcp_ps((__m128)u);
#else
  vf r = as_vf(vi_splat(0x7EF311C3) - as_vi(u));  // exponent trick, 12% error
  r = r + r * (1.0f - u * r);
#endif
  r = r + r * (1.0f - u * r);
  return r + r * (1.0f - u * r);
#endif
}

// exp(x) for x <= 0 to about 1 ulp: 0 below ln(FLT_MIN) (no denormal results); NaN in, NaN
// out. The hot loops only exponentiate logit - max.
SV_INLINE vf vf_exp_nonpos(vf x) {
  const float lo = -87.3365478515625f;
  const vi under = x < lo;
  const vf xc = under ? vf_splat(lo) : x;
#if defined(SV_X86_512)
  const vf n = (vf)_mm512_maskz_roundscale_ps(kAll16, (__m512)(xc * 1.44269504088896341f),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const vf n = (xc * 1.44269504088896341f + magic) - magic;
#endif
  vf r = xc - n * 0.693359375f;     // ln 2 split in two: n * 0.693359375 is exact
  r = r - n * -2.12194440e-4f;
  const vf z = r * r;
  vf p = 1.9875691500e-4f * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * z + r + 1.0f;
#if defined(SV_X86_512)
  const vf res = (vf)_mm512_maskz_scalef_ps(kAll16, (__m512)p, (__m512)n);  // p 2^n, n >= -126
#else
  const vi ni = __builtin_convertvector(n, vi);
  const vf res = p * as_vf((ni + 127) << 23);   // n >= -126: 2^n is normal
#endif
  return under ? vf{} : res;
}

// exp(x) to about 1 ulp over the whole float range; +inf above ln(FLT_MAX).
SV_INLINE vf vf_exp(vf x) {
  const float hi = 88.72283935546875f;
  const vf xc = x > hi ? vf_splat(hi) : x;
  // split 2^n in two factors so that n = 128 stays finite before the final check
  const float lo = -87.3365478515625f;
  const vf xl = xc < lo ? vf_splat(lo) : xc;
  const float magic = 12582912.0f;
  const vf n = (xl * 1.44269504088896341f + magic) - magic;
  vf r = xl - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const vf z = r * r;
  vf p = 1.9875691500e-4f * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * z + r + 1.0f;
  const vi ni = __builtin_convertvector(n, vi);
  const vi n1 = ni >> 1, n2 = ni - n1;
  vf res = p * as_vf((n1 + 127) << 23) * as_vf((n2 + 127) << 23);
  res = x < lo ? vf{} : res;
  res = x > hi ? vf_splat(__builtin_inff()) : res;
  return x != x ? x : res;
}

// log(1 + f) + e log(2) - f for f in [sqrt(1/2) - 1, sqrt(2) - 1]: the kernel without its
// linear term (Cephes-style minimax polynomial).
SV_INLINE vf vf_log_kernel_nonlinear(vf f, vf ef) {
  vf z = f * f;
  vf p = 7.0376836292e-2f * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  return p * f * z + ef * -2.12194440e-4f - 0.5f * z;
}

// log(1 + f) + e log(2), same range
SV_INLINE vf vf_log_kernel(vf f, vf ef) {
  return f + vf_log_kernel_nonlinear(f, ef) + ef * 0.693359375f;
}

// x = 2^e * (1 + f) with 1 + f in [sqrt(1/2), sqrt(2)); x > 0 (normal unless kDenormals).
template <bool kDenormals>
SV_INLINE void vf_log_reduce(vf x, vf* f, vf* ef) {
  vi bits, e;
  if (kDenormals) {
    const vi den = x < 1.17549435e-38f;
    bits = as_vi(den ? x * 8388608.0f : x);   // 2^23
    e = ((bits >> 23) & 0xff) - 127;
    e = den ? e - 23 : e;
  } else {
#if defined(SV_X86_512)
    vf m = (vf)_mm512_maskz_getmant_ps(kAll16, (__m512)x, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_src);
    vf ex = (vf)_mm512_maskz_getexp_ps(kAll16, (__m512)x);
    const vi big = m > 1.41421356237f;
    *f = (big ? m * 0.5f : m) - 1.0f;
    *ef = big ? ex + 1.0f : ex;
    return;
#else
    bits = as_vi(x);
    e = ((bits >> 23) & 0xff) - 127;
#endif
  }
  vf m = as_vf((bits & 0x007fffff) | 0x3f800000);    // mantissa in [1, 2)
  const vi big = m > 1.41421356237f;
  m = big ? m * 0.5f : m;
  e = e - big;                                       // big is -1 where true
  *f = m - 1.0f;
  *ef = __builtin_convertvector(e, vf);
}

// Natural log to about 1 ulp for x > 0; log(0) = -inf, log(<0) = NaN, log(inf) = inf.
SV_INLINE vf vf_log(vf x) {
  vf f, ef;
  vf_log_reduce<true>(x, &f, &ef);
  vf res = vf_log_kernel(f, ef);
  res = x == 0.0f ? vf_splat(-__builtin_inff()) : res;
  res = x < 0.0f ? vf_splat(__builtin_nanf("")) : res;
  res = x == __builtin_inff() ? x : res;
  return x != x ? x : res;
}

// log(1 + y) to about 1 ulp for finite y >= 0, tiny y included: where 1 + y lies in the
// kernel's interval the kernel takes f = y itself (no rounding of 1 + y at all); elsewhere the
// result is >= 0.34 and the rounding of 1 + y costs under an ulp.
SV_INLINE vf vf_log1p_nonneg(vf y) {
  vf f, ef;
  vf_log_reduce<false>(1.0f + y, &f, &ef);
  const vi direct = y < 0.41421356237f;
  return vf_log_kernel(direct ? y : f, direct ? vf{} : ef);
}

// log(1 + y) for any y >= -1 (same method), with log1p(-1) = -inf, NaN below, inf at inf.
SV_INLINE vf vf_log1p(vf y) {
  const vf u = 1.0f + y;
  vf f, ef;
  vf_log_reduce<false>(u, &f, &ef);
  const vi direct = (y > -0.29289321881f) & (y < 0.41421356237f);
  vf res = vf_log_kernel(direct ? y : f, direct ? vf{} : ef);
  res = u == 0.0f ? vf_splat(-__builtin_inff()) : res;
  res = u < 0.0f ? vf_splat(__builtin_nanf("")) : res;
  res = y == __builtin_inff() ? y : res;
  return y != y ? y : res;
}

// The low / high W/2 lanes of a float vector, widened to double, in registers.
SV_INLINE vdh vf_lo_to_double(vf v) {
#if defined(SV_X86_512)
  const vfh h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  return (vdh)_mm512_maskz_cvtps_pd((__mmask8)0xFF, (__m256)h);
#elif defined(SV_X86_256)
  return (vdh)_mm256_cvtps_pd(_mm256_castps256_ps128((__m256)v));
#elif defined(SV_X86_128)
  return (vdh)_mm_cvtps_pd((__m128)v);
#else
  vfh h;
  std::memcpy(&h, &v, sizeof h);
  return __builtin_convertvector(h, vdh);
#endif
}
SV_INLINE vdh vf_hi_to_double(vf v) {
#if defined(SV_X86_512)
  const vfh h = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  return (vdh)_mm512_maskz_cvtps_pd((__mmask8)0xFF, (__m256)h);
#elif defined(SV_X86_256)
  return (vdh)_mm256_cvtps_pd(_mm256_extractf128_ps((__m256)v, 1));
#elif defined(SV_X86_128)
  return (vdh)_mm_cvtps_pd(_mm_movehl_ps((__m128)v, (__m128)v));
#else
  vfh h;
  std::memcpy(&h, reinterpret_cast<const char*>(&v) + sizeof h, sizeof h);
  return __builtin_convertvector(h, vdh);
#endif
}

// Double-precision accumulator for W float lanes (sums of thousands of float terms keep
// float64 accuracy; the float32 reference sums with cascade summation, so plain float
// accumulation would lose to it).
struct DAcc {
  vdh lo, hi;
};
SV_INLINE void dacc_zero(DAcc& a) { a.lo = vdh{}; a.hi = vdh{}; }
SV_INLINE void dacc_add(DAcc& a, vf v) {
  a.lo += vf_lo_to_double(v);
  a.hi += vf_hi_to_double(v);
}
SV_INLINE double dacc_sum(const DAcc& a) {
  vdh s = a.lo + a.hi;
  double t = 0.0;
  for (int i = 0; i < kW / 2; ++i) t += s[i];
  return t;
}
// acc[0:W] += v, with acc a double array
SV_INLINE void dacc_add_to(double* acc, vf v) {
  vdh a0, a1;
  std::memcpy(&a0, acc, sizeof a0);
  std::memcpy(&a1, acc + kW / 2, sizeof a1);
  a0 += vf_lo_to_double(v);
  a1 += vf_hi_to_double(v);
  std::memcpy(acc, &a0, sizeof a0);
  std::memcpy(acc + kW / 2, &a1, sizeof a1);
}

// Sum of float lanes kept in float over blocks of 8 vectors, each block then added in float64:
// a float sum of 8 terms per lane loses at most ~4 ulp and the float64 total keeps that
// accuracy over thousands of blocks, for a fraction of the cost of widening every vector.
struct BlockSumF {
  vf f;
  DAcc d;
  int n;
  SV_INLINE BlockSumF() : f{}, n(0) { dacc_zero(d); }
  SV_INLINE void add(vf v) {
    f += v;
    if (++n == 8) {
      dacc_add(d, f);
      f = vf{};
      n = 0;
    }
  }
  SV_INLINE double sum() const {
    DAcc t = d;
    dacc_add(t, f);
    return dacc_sum(t);
  }
};

// sum_k x[k] * ((double)a[idx[k]] - (double)b[idx[k]]) over n entries, in float64 (the
// products are exact there). The two float arrays are read through gathers where the ISA has
// them; four partial sums elsewhere, since one float64 accumulator would serialise on the add
// latency.
SV_INLINE double gather_diff_dot(const int64_t* idx, const float* x, int64_t n, const float* a,
                                 const float* b) {
  int64_t k = 0;
  double total = 0.0;
#if defined(SV_X86_512)
  __m512d acc0 = _mm512_setzero_pd(), acc1 = _mm512_setzero_pd();
  for (; k + 16 <= n; k += 16) {
    for (int h = 0; h < 2; ++h) {
      const __m512i i = _mm512_loadu_si512((const void*)(idx + k + 8 * h));
      const __m256 ga = _mm512_mask_i64gather_ps(_mm256_setzero_ps(), 0xFF, i, a, 4);
      const __m256 gb = _mm512_mask_i64gather_ps(_mm256_setzero_ps(), 0xFF, i, b, 4);
      const __m512d d = _mm512_sub_pd(_mm512_maskz_cvtps_pd(0xFF, ga),
                                      _mm512_maskz_cvtps_pd(0xFF, gb));
      const __m512d xv = _mm512_maskz_cvtps_pd(0xFF, _mm256_loadu_ps(x + k + 8 * h));
      if (h == 0) acc0 = _mm512_fmadd_pd(xv, d, acc0);
      else acc1 = _mm512_fmadd_pd(xv, d, acc1);
    }
  }
  double lanes[8];
  _mm512_storeu_pd(lanes, _mm512_add_pd(acc0, acc1));
  total = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
          ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
#elif defined(SV_X86_256)
  __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
  const __m128 all = _mm_castsi128_ps(_mm_set1_epi32(-1));
  for (; k + 8 <= n; k += 8) {
    for (int h = 0; h < 2; ++h) {
      const __m256i i = _mm256_loadu_si256((const __m256i*)(idx + k + 4 * h));
      const __m128 ga = _mm256_mask_i64gather_ps(_mm_setzero_ps(), a, i, all, 4);
      const __m128 gb = _mm256_mask_i64gather_ps(_mm_setzero_ps(), b, i, all, 4);
      const __m256d d = _mm256_sub_pd(_mm256_cvtps_pd(ga), _mm256_cvtps_pd(gb));
      const __m256d xv = _mm256_cvtps_pd(_mm_loadu_ps(x + k + 4 * h));
      if (h == 0) acc0 = _mm256_fmadd_pd(xv, d, acc0);
      else acc1 = _mm256_fmadd_pd(xv, d, acc1);
    }
  }
  double lanes[4];
  _mm256_storeu_pd(lanes, _mm256_add_pd(acc0, acc1));
  total = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
#endif
  double part[4] = {0.0, 0.0, 0.0, 0.0};
  for (; k + 4 <= n; k += 4)
    for (int j = 0; j < 4; ++j) {
      const int64_t g = idx[k + j];
      part[j] += (double)x[k + j] * ((double)a[g] - (double)b[g]);
    }
  for (; k < n; ++k) part[0] += (double)x[k] * ((double)a[idx[k]] - (double)b[idx[k]]);
  return total + ((part[0] + part[1]) + (part[2] + part[3]));
}

// Writes the indices and values of the non-zero entries of d[0:G] to col and x (in order)
// and returns how many there are: a branch-free scalar loop, or AVX-512 compress stores.
SV_INLINE int64_t compact_nonzero(const float* d, int64_t G, int64_t* col, float* x) {
  int64_t n = 0, g = 0;
#if defined(SV_X86_512)
  const __m512i step = _mm512_set1_epi64(8);
  __m512i idx = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
  for (; g + 16 <= G; g += 16) {
    const __m512 v = _mm512_loadu_ps(d + g);
    const __mmask16 m = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_NEQ_UQ);
    if (m == 0) {
      idx = _mm512_add_epi64(idx, _mm512_add_epi64(step, step));
      continue;
    }
    _mm512_mask_compressstoreu_ps(x + n, m, v);
    const __mmask8 lo = (__mmask8)(m & 0xFF), hi = (__mmask8)(m >> 8);
    _mm512_mask_compressstoreu_epi64(col + n, lo, idx);
    idx = _mm512_add_epi64(idx, step);
    const int64_t nlo = __builtin_popcount((unsigned)lo);
    _mm512_mask_compressstoreu_epi64(col + n + nlo, hi, idx);
    idx = _mm512_add_epi64(idx, step);
    n += nlo + __builtin_popcount((unsigned)hi);
  }
#endif
  for (; g < G; ++g) {
    const float v = d[g];
    col[n] = g;
    x[n] = v;
    n += v != 0.0f;
  }
  return n;
}

SV_INLINE int64_t compact_nonzero(const double* d, int64_t G, int64_t* col, double* x) {
  int64_t n = 0;
  for (int64_t g = 0; g < G; ++g) {
    const double v = d[g];
    col[n] = g;
    x[n] = v;
    n += v != 0.0;
  }
  return n;
}

// float64 arrays: the plain loop with four partial sums
SV_INLINE double gather_diff_dot(const int64_t* idx, const double* x, int64_t n, const double* a,
                                 const double* b) {
  double part[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t k = 0;
  for (; k + 4 <= n; k += 4)
    for (int j = 0; j < 4; ++j) part[j] += x[k + j] * (a[idx[k + j]] - b[idx[k + j]]);
  for (; k < n; ++k) part[0] += x[k] * (a[idx[k]] - b[idx[k]]);
  return (part[0] + part[1]) + (part[2] + part[3]);
}

// ---- the two lane policies the kernels are written against ----------------------------
template <class T> struct Lanes;

template <> struct Lanes<float> {
  typedef vf V;
  typedef vi M;
  typedef DAcc Acc;
  typedef BlockSumF BlockSum;
  static constexpr int W = kW;
  static SV_INLINE V load(const float* p) { return vf_load(p); }
  static SV_INLINE void store(float* p, V v) { vf_store(p, v); }
  static SV_INLINE V splat(float s) { return vf_splat(s); }
  static SV_INLINE V exp(V x) { return vf_exp(x); }
  static SV_INLINE V exp_nonpos(V x) { return vf_exp_nonpos(x); }
  static SV_INLINE V log(V x) { return vf_log(x); }
  static SV_INLINE V log1p(V x) { return vf_log1p(x); }
  static SV_INLINE V log1p_nonneg(V x) { return vf_log1p_nonneg(x); }
  static SV_INLINE V recip(V x) { return vf_recip(x); }
  static SV_INLINE V sel(M m, V a, V b) { return m ? a : b; }
  static SV_INLINE M lt(V a, V b) { return a < b; }
  static SV_INLINE M gt(V a, V b) { return a > b; }
  static SV_INLINE M eq(V a, V b) { return a == b; }
  // toward zero, for |x| < 2^31
  static SV_INLINE V trunc(V x) {
    return __builtin_convertvector(__builtin_convertvector(x, vi), vf);
  }
  static SV_INLINE float lane(V v, int i) { return v[i]; }
  static SV_INLINE V vmax(V a, V b) { return a > b ? a : b; }
  static SV_INLINE float hmax(V v) {
    float m = v[0];
    for (int i = 1; i < W; ++i) m = v[i] > m ? v[i] : m;
    return m;
  }
  static SV_INLINE void acc_zero(Acc& a) { dacc_zero(a); }
  static SV_INLINE void acc_add(Acc& a, V v) { dacc_add(a, v); }
  static SV_INLINE double acc_sum(const Acc& a) { return dacc_sum(a); }
  static SV_INLINE void add_to(double* acc, V v) { dacc_add_to(acc, v); }
  // dst[0:W] = accumulated lanes + offset
  static SV_INLINE void acc_store(double* dst, const Acc& a, double offset) {
    const vdh lo = a.lo + offset, hi = a.hi + offset;
    std::memcpy(dst, &lo, sizeof lo);
    std::memcpy(dst + W / 2, &hi, sizeof hi);
  }
};

template <> struct Lanes<double> {
  typedef double V;
  typedef bool M;
  typedef double Acc;
  struct BlockSum {
    double s = 0.0;
    SV_INLINE void add(double v) { s += v; }
    SV_INLINE double sum() const { return s; }
  };
  static constexpr int W = 1;
  static SV_INLINE V load(const double* p) { return *p; }
  static SV_INLINE void store(double* p, V v) { *p = v; }
  static SV_INLINE V splat(double s) { return s; }
  static SV_INLINE V exp(V x) { return std::exp(x); }
  static SV_INLINE V exp_nonpos(V x) { return std::exp(x); }
  static SV_INLINE V log(V x) { return std::log(x); }
  static SV_INLINE V log1p(V x) { return std::log1p(x); }
  static SV_INLINE V log1p_nonneg(V x) { return std::log1p(x); }
  static SV_INLINE V recip(V x) { return 1.0 / x; }
  static SV_INLINE V sel(M m, V a, V b) { return m ? a : b; }
  static SV_INLINE M lt(V a, V b) { return a < b; }
  static SV_INLINE M gt(V a, V b) { return a > b; }
  static SV_INLINE M eq(V a, V b) { return a == b; }
  static SV_INLINE V trunc(V x) { return (double)(int64_t)x; }
  static SV_INLINE double lane(V v, int) { return v; }
  static SV_INLINE V vmax(V a, V b) { return a > b ? a : b; }
  static SV_INLINE double hmax(V v) { return v; }
  static SV_INLINE void acc_zero(Acc& a) { a = 0.0; }
  static SV_INLINE void acc_add(Acc& a, V v) { a += v; }
  static SV_INLINE double acc_sum(const Acc& a) { return a; }
  static SV_INLINE void add_to(double* acc, V v) { *acc += v; }
  static SV_INLINE void acc_store(double* dst, const Acc& a, double offset) { *dst = a + offset; }
};
