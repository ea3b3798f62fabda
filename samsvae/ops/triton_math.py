"""Scalar special functions as Triton device functions, built from ``tl`` primitives only.

libdevice (lgamma, digamma, log1p) is unavailable under the CPU interpreter, and ``tl.log`` /
``tl.exp`` may lower to fast approximations on the GPU whose *absolute* error (~1e-7) is a large
*relative* error near ``log(1)``. So everything that must be accurate near zero (log1p,
softplus, sigmoid - softplus) switches to a series there and calls ``tl.log`` only where its
value is at least ~0.2 in magnitude.

Functions are elementwise on tensors of any shape: float32 unless named ``*_f64``. Importing
this module imports triton: only the ``*_kernels`` modules import it.
"""
import triton
import triton.language as tl

HALF_LOG_2PI = tl.constexpr(0.9189385332046727)  # log(2 pi) / 2
# below this argument lgamma/digamma shift z up with the recurrence before using the series
ASYMPTOTIC_MIN = tl.constexpr(8.0)


LOG2E = tl.constexpr(1.4426950408889634)
LN2_HI_F32 = tl.constexpr(0.693145751953125)  # 15 significant bits: k * LN2_HI_F32 is exact
LN2_LO_F32 = tl.constexpr(1.4286067653302e-06)


@triton.jit
def exp_acc(t):
    """exp(t) for float32 t <= 88 to ~1 ulp (0 below -87).

    ``tl.exp`` lowers to ex2.approx(t * log2 e) on NVIDIA GPUs, whose relative error grows as
    |t| * 6e-8; this Cody-Waite reduction plus a degree-7 polynomial does not."""
    # NaN-propagating clamp: the default min/max of sm_90 return the other operand for NaN,
    # which would turn a NaN input (a NaN mask logit, say) into a finite value
    tc = tl.clamp(t, -87.0, 88.0, propagate_nan=tl.PropagateNan.ALL)
    k = ((tc * LOG2E + 128.5).to(tl.int32) - 128)  # round(t / ln 2); the cast truncates a positive
    kf = k.to(tl.float32)
    r = (tc - kf * LN2_HI_F32) - kf * LN2_LO_F32  # |r| <= ln(2)/2
    p = 1.0 + r * (1.0 + r * (0.5 + r * (0.16666666666666666 + r * (0.041666666666666664 + r * (
        0.008333333333333333 + r * (0.001388888888888889 + r * 0.0001984126984126984))))))
    scale = ((k + 127) << 23).to(tl.float32, bitcast=True)  # 2^k, exact for k >= -126
    return tl.where(t < -87.0, 0.0, p * scale)


@triton.jit
def _atanh_tail(w2):
    # 1/3 + w^2/5 + ... + w^16/19: 2 w (1 + w^2 tail) = 2 atanh(w) to < 1e-9 for |w| <= 1/3
    return 0.3333333333333333 + w2 * (0.2 + w2 * (0.14285714285714285 + w2 * (
        0.1111111111111111 + w2 * (0.09090909090909091 + w2 * (0.07692307692307693 + w2 * (
            0.06666666666666667 + w2 * (0.058823529411764705 + w2 * 0.05263157894736842)))))))


@triton.jit
def _series_region(r):
    # where 1 + r would round away digits that log1p(r) or log1p(r) - r needs
    return (r > -0.3) & (r < 0.5)


@triton.jit
def log1p(r):
    """log(1 + r) for r > -1, relative error ~1e-7 also for tiny |r|.

    Near 0 it uses log1p(r) = 2 atanh(w), w = r / (2 + r), as an odd series in w."""
    w = r / (2.0 + r)
    w2 = w * w
    series = 2.0 * w * (1.0 + w2 * _atanh_tail(w2))
    return tl.where(_series_region(r), series, tl.log(1.0 + r))


@triton.jit
def _log1p_unit(t):
    # log(1 + t) for t in [0, 1] by the series alone (w <= 1/3), no tl.log
    w = t / (2.0 + t)
    w2 = w * w
    return 2.0 * w * (1.0 + w2 * _atanh_tail(w2))


@triton.jit
def log1p_minus_x(r):
    """log(1 + r) - r without cancellation for small |r| (r > -1)."""
    w = r / (2.0 + r)
    w2 = w * w
    # 2w - r = -r^2 / (2 + r) exactly, so the leading terms cancel symbolically
    series = -r * r / (2.0 + r) + 2.0 * w * w2 * _atanh_tail(w2)
    return tl.where(_series_region(r), series, tl.log(1.0 + r) - r)


@triton.jit
def softplus(y):
    """log(1 + exp(y)), stable for all y."""
    return tl.maximum(y, 0.0) + _log1p_unit(exp_acc(-tl.abs(y)))


@triton.jit
def softplus_pair(y):
    """(softplus(y), softplus(-y)) sharing one exp and one log1p."""
    common = _log1p_unit(exp_acc(-tl.abs(y)))
    return tl.maximum(y, 0.0) + common, tl.maximum(-y, 0.0) + common


@triton.jit
def _sigmoid_pair_from_t(y, t):
    """(sigmoid(y), sigmoid(-y)) given t = exp(-|y|)."""
    a = 1.0 / (1.0 + t)
    b = t * a
    pos = y >= 0.0
    return tl.where(pos, a, b), tl.where(pos, b, a)


@triton.jit
def sigmoid_pair(y):
    """(sigmoid(y), sigmoid(-y)) = (q, 1 - q), each with small relative error."""
    return _sigmoid_pair_from_t(y, exp_acc(-tl.abs(y)))


@triton.jit
def _sms_from_t(y, t):
    # sigmoid(y) - softplus(y) given t = exp(-|y|)
    w = t / (2.0 + t)
    w2 = w * w
    tail = 2.0 * w * w2 * _atanh_tail(w2)  # log1p(t) - 2w
    # y < 0, t = exp(y): t/(1+t) - log1p(t) with t/(1+t) - 2w = -t^2 / ((1+t)(2+t))
    neg = -t * t / ((1.0 + t) * (2.0 + t)) - tail
    pos = 1.0 / (1.0 + t) - y - (2.0 * w + tail)
    return tl.where(y < 0.0, neg, pos)


@triton.jit
def sigmoid_minus_softplus(y):
    """sigmoid(y) - softplus(y); for y << 0 both are ~exp(y) and the difference is
    -exp(2y)/2, which the direct form loses entirely in float32."""
    return _sms_from_t(y, exp_acc(-tl.abs(y)))


@triton.jit
def softplus_sigmoid(y):
    """(softplus(y), softplus(-y), sigmoid(y), sigmoid(-y)) from one exp."""
    t = exp_acc(-tl.abs(y))
    common = _log1p_unit(t)
    q, qc = _sigmoid_pair_from_t(y, t)
    return tl.maximum(y, 0.0) + common, tl.maximum(-y, 0.0) + common, q, qc


@triton.jit
def sigmoid_pair_sms(y):
    """(sigmoid(y), sigmoid(-y), sigmoid(y) - softplus(y)) from one exp."""
    t = exp_acc(-tl.abs(y))
    q, qc = _sigmoid_pair_from_t(y, t)
    return q, qc, _sms_from_t(y, t)


@triton.jit
def two_sum(a, b):
    """(s, e) with s = fl(a + b) and s + e = a + b exactly (Knuth's TwoSum)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


@triton.jit
def stirling_correction(z):
    """lgamma(z) - [(z - 1/2) log z - z + log(2 pi)/2] for z >= 7 (error < 1e-10)."""
    r = 1.0 / z
    r2 = r * r
    return r * (0.08333333333333333 - r2 * (0.002777777777777778 - r2 * (
        0.0007936507936507937 - r2 * 0.0005952380952380953)))


@triton.jit
def stirling_correction_deriv(z):
    """d/dz of :func:`stirling_correction` (also digamma(z) - log z + 1/(2z)), z >= 7."""
    r = 1.0 / z
    r2 = r * r
    return -r2 * (0.08333333333333333 - r2 * (0.008333333333333333 - r2 * (
        0.003968253968253968 - r2 * 0.004166666666666667)))


@triton.jit
def lgamma_stirling(z):
    """lgamma(z) for z >= 8 (Stirling series, no shifting)."""
    return (z - 0.5) * tl.log(z) - z + HALF_LOG_2PI + stirling_correction(z)


@triton.jit
def digamma_stirling(z):
    """digamma(z) for z >= 8 (asymptotic series, no shifting)."""
    return tl.log(z) - 0.5 / z + stirling_correction_deriv(z)


@triton.jit
def _shift_product(z, p):
    """(zs, p * z (z + 1) ... (zs - 1)): z raised by unit steps to >= ASYMPTOTIC_MIN (at most 8
    steps, enough for any z > 0), so that lgamma(z) = lgamma(zs) - log(product)."""
    zs = z
    for _ in tl.static_range(8):
        small = zs < ASYMPTOTIC_MIN
        p = tl.where(small, p * zs, p)
        zs = tl.where(small, zs + 1.0, zs)
    return zs, p


@triton.jit
def _shift_reciprocals(z, acc):
    """(zs, acc - 1/z - 1/(z + 1) - ... - 1/(zs - 1)): the shift of :func:`_shift_product`, so
    that digamma(z) = digamma(zs) - sum of the reciprocals."""
    zs = z
    for _ in tl.static_range(8):
        small = zs < ASYMPTOTIC_MIN
        acc = tl.where(small, acc - 1.0 / zs, acc)
        zs = tl.where(small, zs + 1.0, zs)
    return zs, acc


@triton.jit
def lgamma_pos(z):
    """lgamma(z) for z > 0 (float32, absolute error ~1e-6 near the zeros at 1 and 2,
    relative ~1e-7 elsewhere)."""
    p = tl.full(z.shape, 1.0, tl.float32)
    zs, p = _shift_product(z, p)
    # any z > 0 ends at zs >= 8 after at most 8 shifts, where the series is accurate
    return lgamma_stirling(zs) - tl.log(p)


@triton.jit
def digamma_pos(z):
    """digamma(z) for z > 0 (float32)."""
    acc = tl.zeros(z.shape, tl.float32)
    zs, acc = _shift_reciprocals(z, acc)
    return acc + digamma_stirling(zs)


# ----------------------------------------------------------------------------- float64
# For per-row and per-gene quantities (logsumexp, lgamma(theta)) whose float32 rounding would
# shift every element of a row or gene alike. Only float64 add/mul/div and integer bit
# operations are used: ``tl.log``/``tl.exp`` on float64 would need libdevice.

LN2 = tl.constexpr(0.6931471805599453)
LN2_HI = tl.constexpr(0.6931471803691238)  # LN2_HI + LN2_LO = log(2) to ~1e-26
LN2_LO = tl.constexpr(1.9082149292705877e-10)
INV_LN2 = tl.constexpr(1.4426950408889634)
SQRT2 = tl.constexpr(1.4142135623730951)


@triton.jit
def exp_f64(t):
    """exp(t) for float64 t (0 below -708, +inf-free up to 709; relative error ~1e-16)."""
    tc = tl.clamp(t, -708.0, 709.0, propagate_nan=tl.PropagateNan.ALL)
    kf = tc * INV_LN2
    k = tl.where(kf >= 0.0, kf + 0.5, kf - 0.5).to(tl.int64)  # round half away from zero
    r = (tc - k.to(tl.float64) * LN2_HI) - k.to(tl.float64) * LN2_LO  # |r| <= 0.35
    p = 1.0 + r * (1.0 + r * (0.5 + r * (1.6666666666666666e-01 + r * (
        4.1666666666666664e-02 + r * (8.3333333333333332e-03 + r * (
            1.3888888888888889e-03 + r * (1.9841269841269841e-04 + r * (
                2.4801587301587302e-05 + r * (2.7557319223985893e-06 + r * (
                    2.7557319223985888e-07 + r * (2.5052108385441720e-08 + r * (
                        2.0876756987868100e-09 + r * 1.6059043836821613e-10))))))))))))
    scale = ((k + 1023) << 52).to(tl.float64, bitcast=True)  # 2^k, exact
    return tl.where(t < -708.0, 0.0, p * scale)


@triton.jit
def _atanh_tail_f64(w2):
    # 1/3 + w^2/5 + ... + w^22/25: with |w| <= 0.2 the rest is below 1e-17
    return 1.0 / 3.0 + w2 * (1.0 / 5.0 + w2 * (1.0 / 7.0 + w2 * (1.0 / 9.0 + w2 * (
        1.0 / 11.0 + w2 * (1.0 / 13.0 + w2 * (1.0 / 15.0 + w2 * (1.0 / 17.0 + w2 * (
            1.0 / 19.0 + w2 * (1.0 / 21.0 + w2 * (1.0 / 23.0 + w2 / 25.0))))))))))


@triton.jit
def _atanh_series_f64(w):
    # 2 atanh(w) for |w| <= 0.2
    w2 = w * w
    return 2.0 * w * (1.0 + w2 * _atanh_tail_f64(w2))


@triton.jit
def log_f64(v):
    """log(v) for positive normal float64 v (relative error ~1e-16)."""
    bits = v.to(tl.int64, bitcast=True)
    e = ((bits >> 52) & 0x7FF) - 1023
    m = ((bits & 0xFFFFFFFFFFFFF) | (1023 << 52)).to(tl.float64, bitcast=True)  # [1, 2)
    hi = m > SQRT2
    m = tl.where(hi, m * 0.5, m)
    e = tl.where(hi, e + 1, e)
    return e.to(tl.float64) * LN2 + _atanh_series_f64((m - 1.0) / (m + 1.0))


@triton.jit
def stirling_correction_f64(z):
    """lgamma(z) - [(z - 1/2) log z - z + log(2 pi)/2], float64, z >= 8 (error < 1e-13)."""
    r = 1.0 / z
    r2 = r * r
    return r * (1.0 / 12.0 - r2 * (1.0 / 360.0 - r2 * (1.0 / 1260.0 - r2 * (
        1.0 / 1680.0 - r2 * (1.0 / 1188.0 - r2 * (691.0 / 360360.0))))))


@triton.jit
def stirling_correction_deriv_f64(z):
    """d/dz of :func:`stirling_correction_f64`."""
    r = 1.0 / z
    r2 = r * r
    return -r2 * (1.0 / 12.0 - r2 * (3.0 / 360.0 - r2 * (5.0 / 1260.0 - r2 * (
        7.0 / 1680.0 - r2 * (9.0 / 1188.0 - r2 * (11.0 * 691.0 / 360360.0))))))


@triton.jit
def lgamma_pos_f64(z):
    """lgamma(z) for float64 z > 0."""
    p = tl.full(z.shape, 1.0, tl.float64)
    zs, p = _shift_product(z, p)
    return ((zs - 0.5) * log_f64(zs) - zs + HALF_LOG_2PI + stirling_correction_f64(zs)
            - log_f64(p))


@triton.jit
def digamma_pos_f64(z):
    """digamma(z) for float64 z > 0."""
    acc = tl.zeros(z.shape, tl.float64)
    zs, acc = _shift_reciprocals(z, acc)
    return acc + log_f64(zs) - 0.5 / zs + stirling_correction_deriv_f64(zs)
