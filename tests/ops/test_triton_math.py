"""Device math of the Triton kernels (samsvae/ops/triton_math.py) against float64 torch.

Runs under the Triton CPU interpreter (TRITON_INTERPRET=1, set by conftest.py without CUDA)."""
import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from samsvae.ops import triton_math as tm  # noqa: E402

EPS32 = torch.finfo(torch.float32).eps
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter runs CPU tensors
# a few ulps: the interpreter's numpy math is correctly rounded, a GPU's division
# (div.full.f32) and log (possibly lg2.approx) add up to ~2 ulp each
ULPS = 8 * EPS32
F = torch.nn.functional

@triton.jit
def _apply_kernel(x_ptr, o_ptr, o2_ptr, n, WHICH: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=1.0)
    r2 = x
    if WHICH == 0:
        r = tm.lgamma_pos(x)
    elif WHICH == 1:
        r = tm.digamma_pos(x)
    elif WHICH == 2:
        r = tm.lgamma_stirling(x)
    elif WHICH == 3:
        r = tm.exp_acc(x)
    elif WHICH == 4:
        r = tm.log1p(x)
    elif WHICH == 5:
        r = tm.log1p_minus_x(x)
    elif WHICH == 6:
        r, r2 = tm.softplus_pair(x)
    elif WHICH == 7:
        r, r2 = tm.sigmoid_pair(x)
    elif WHICH == 8:
        r = tm.sigmoid_minus_softplus(x)
    elif WHICH == 9:
        r = tm.exp_f64(x)
    elif WHICH == 10:
        r = tm.log_f64(x)
    elif WHICH == 11:
        r = tm.lgamma_pos_f64(x)
    else:
        r = tm.digamma_pos_f64(x)
    tl.store(o_ptr + offs, r, mask=m)
    tl.store(o2_ptr + offs, r2, mask=m)


_WHICH = {"lgamma_pos": 0, "digamma_pos": 1, "lgamma_stirling": 2, "exp_acc": 3, "log1p": 4,
          "log1p_minus_x": 5, "softplus_pair": 6, "sigmoid_pair": 7,
          "sigmoid_minus_softplus": 8, "exp_f64": 9, "log_f64": 10, "lgamma_pos_f64": 11,
          "digamma_pos_f64": 12}


def _apply(name, x):
    """Evaluate device function ``name`` on x; returns float64 tensor(s)."""
    x = x.to(DEVICE).contiguous()
    out, out2 = torch.empty_like(x), torch.empty_like(x)
    n = x.numel()
    _apply_kernel[(triton.cdiv(n, 1024),)](x, out, out2, n, WHICH=_WHICH[name], BLOCK=1024)
    return out.double().cpu(), out2.double().cpu()


def _f32_grid(lo, hi, n=4001):
    return torch.logspace(lo, hi, n, dtype=torch.float64).float()


def test_lgamma_float32_accuracy():
    # documented accuracy: relative 5e-7 from z >= 8 on, absolute 1e-5 below (the shift
    # recurrence subtracts ~lgamma(z + 8) near the zeros at 1 and 2)
    z = torch.cat([_f32_grid(-4, 6), torch.linspace(0.5, 3.0, 1001).float()])
    ref = torch.lgamma(z.double())
    out, _ = _apply("lgamma_pos", z)
    big = z >= 8
    rel = ((out - ref).abs() / ref.abs())[big]
    assert rel.max() < 5e-7, rel.max()
    assert (out - ref).abs()[~big].max() < 1e-5
    # the large-argument series alone, as used for counts >= the table size
    out_s, _ = _apply("lgamma_stirling", z[big])
    assert ((out_s - ref[big]).abs() / ref[big].abs()).max() < 5e-7
    # and it is within a few float32 ulps of torch.lgamma in float32 where that is exact
    err32 = (torch.lgamma(z).double() - ref).abs()[big]
    assert ((out - ref).abs()[big] <= 8 * err32 + 8 * EPS32 * ref.abs()[big]).all()


def test_digamma_float32_accuracy():
    z = torch.cat([_f32_grid(-4, 6), torch.linspace(0.5, 3.0, 1001).float()])
    ref = torch.digamma(z.double())
    out, _ = _apply("digamma_pos", z)
    err = (out - ref).abs() / ref.abs().clamp_min(1.0)
    assert err.max() < 2e-6, err.max()


def test_exp_acc_is_accurate_over_the_float32_range():
    t = torch.linspace(-87.0, 88.0, 200001).float()
    out, _ = _apply("exp_acc", t)
    ref = t.double().exp()
    assert ((out - ref).abs() / ref).max() < 2 * EPS32
    out_low, _ = _apply("exp_acc", torch.tensor([-88.0, -100.0, -float("inf")]))
    assert (out_low == 0).all()


def test_log1p_and_softplus_family():
    r = torch.cat([-torch.logspace(-10, -1e-4, 2000, dtype=torch.float64),
                   torch.logspace(-10, 10, 4000, dtype=torch.float64)]).float()
    rd = r.double()
    out, _ = _apply("log1p", r)
    assert ((out - torch.log1p(rd)) / torch.log1p(rd)).abs().max() < ULPS
    out, _ = _apply("log1p_minus_x", r)
    ref = torch.log1p(rd) - rd
    ok = ref.abs() > 1e-30
    assert ((out - ref) / ref)[ok].abs().max() < 1e-5  # 1 + r rounding just outside the series

    y = torch.linspace(-80.0, 80.0, 20001).float()
    yd = y.double()
    s, s_neg = _apply("softplus_pair", y)
    for got, ref in ((s, F.softplus(yd)), (s_neg, F.softplus(-yd))):
        assert ((got - ref) / ref).abs().max() < ULPS
    q, qc = _apply("sigmoid_pair", y)
    for got, ref in ((q, torch.sigmoid(yd)), (qc, torch.sigmoid(-yd))):
        assert ((got - ref) / ref).abs().max() < ULPS
    # sigma(y) - softplus(y) ~ -exp(2y)/2 for y << 0: the float32 direct form loses it all
    y = torch.linspace(-40.0, 40.0, 8001).float()
    out, _ = _apply("sigmoid_minus_softplus", y)
    t = torch.exp(y.double())
    # float64 reference: below y = -5 the power series sum_{n>=2} (-1)^(n+1) (1 - 1/n) t^n
    series = sum((-1) ** (n + 1) * (1 - 1 / n) * t ** n for n in range(2, 16))
    ref = torch.where(y.double() < -5, series, torch.sigmoid(y.double()) - F.softplus(y.double()))
    assert ((out - ref) / ref).abs().max() < 1e-5


def test_float64_helpers():
    t = torch.linspace(-700.0, 700.0, 20001, dtype=torch.float64)
    out, _ = _apply("exp_f64", t)
    assert ((out - t.exp()) / t.exp()).abs().max() < 1e-15
    v = torch.cat([torch.logspace(-300, 300, 6001, dtype=torch.float64),
                   torch.linspace(0.5, 2.0, 1001, dtype=torch.float64)])
    out, _ = _apply("log_f64", v)
    assert (out - v.log()).abs().max() < 1e-12
    z = torch.cat([torch.logspace(-4, 6, 3001, dtype=torch.float64),
                   torch.linspace(0.5, 3.0, 1001, dtype=torch.float64)])
    out, _ = _apply("lgamma_pos_f64", z)
    assert ((out - torch.lgamma(z)).abs() / torch.lgamma(z).abs().clamp_min(1)).max() < 1e-12
    out, _ = _apply("digamma_pos_f64", z)
    assert ((out - torch.digamma(z)).abs() / torch.digamma(z).abs().clamp_min(1)).max() < 1e-12
