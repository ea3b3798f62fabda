"""The C++ CPU kernels of nb_log_prob (csrc/nb/) against the float64 reference.

float64: forward and every gradient equal the reference to rounding. float32 follows
flash-attention's rule: against the float64 reference evaluated on the same float32 inputs, the
kernel's max error (forward and each gradient) is at most twice that of the float32 reference
`nb_log_prob_reference`, plus a tiny slack of 1e-6 x the magnitude (both near zero).
Skipped when samsvae._C is not built.
"""
import pytest
import torch
from conftest import CPU_ISAS

from samsvae.ops import _cpp, backends, nb_log_prob, nb_log_prob_reference

if not _cpp.ext_available():
    pytest.skip(f"C++ extension not built: {_cpp.EXT_ERROR}", allow_module_level=True)

ISAS = CPU_ISAS
NAMES = ("loglik", "d_logits", "d_log_library", "d_log_theta")


def make_inputs(cells, genes, particles=None, *, seed=0, zero_fraction=0.9, theta=(-4, 6),
                max_count=None, integer=True, logit_scale=1.5):
    """float64 (counts (C, G), logits, log_library (C,), log_theta (G,)); log10 theta uniform
    in `theta`; counts 1 + Poisson(lognormal) on a random (1 - zero_fraction) of the entries,
    a few of them up to `max_count`."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    keep = torch.rand(cells, genes, generator=g, dtype=f64) >= zero_fraction
    rate = torch.exp(torch.randn(cells, genes, generator=g, dtype=f64) * 1.2)
    x = 1.0 + torch.poisson(rate, generator=g)
    if max_count is not None:
        big = torch.rand(cells, genes, generator=g, dtype=f64) < 0.05
        wide = torch.randint(0, max_count + 1, (cells, genes), generator=g).to(f64)
        x = torch.where(big, wide, x)
    if not integer:
        x = x * torch.rand(cells, genes, generator=g, dtype=f64) * 1.7
    counts = x * keep
    shape = (cells, genes) if particles is None else (particles, cells, genes)
    logits = torch.randn(*shape, generator=g, dtype=f64) * logit_scale
    log_library = torch.log(counts.sum(1).clamp_min(1.0) + 50.0)
    lo, hi = theta
    log_theta = (torch.rand(genes, generator=g, dtype=f64) * (hi - lo) + lo) * 2.302585092994046
    return counts, logits, log_library, log_theta


def value_and_grads(fn, counts, logits, log_library, log_theta, *, csr):
    """(loglik, d_logits, d_log_library, d_log_theta) of sum(w * fn(...)) with fixed weights."""
    logits, log_library, log_theta = (t.detach().clone().requires_grad_()
                                      for t in (logits, log_library, log_theta))
    c = counts.to_sparse_csr() if csr else counts
    out = fn(c, logits, log_library, log_theta)
    w = torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64).reshape(out.shape)
    (out * w.to(out.dtype)).sum().backward()
    return [out.detach(), logits.grad, log_library.grad, log_theta.grad]


def cpp(counts, logits, log_library, log_theta):
    return nb_log_prob(counts, logits, log_library, log_theta, backend="cpp")


def assert_float64_matches(inputs, *, csr, rtol=1e-8):
    want = value_and_grads(nb_log_prob_reference, *inputs, csr=csr)
    got = value_and_grads(cpp, *inputs, csr=csr)
    counts, logits, _, log_theta = inputs
    # The float64 reference is not exact either: its lgamma(x + theta) - lgamma(theta) and
    # theta (digamma(x + theta) - digamma(theta)) cancel ~theta log(theta) eps per entry.
    theta = log_theta.exp().max().item()
    ref_noise = 1e-15 * theta * (1.0 + abs(log_theta).max().item()) * logits[..., 0].numel()
    for name, a, b in zip(NAMES, got, want):
        assert a.dtype == torch.float64 and a.shape == b.shape, name
        if not b.numel():
            continue
        scale = b.abs().max().item()
        err = (a - b).abs().max().item()
        tol = rtol * scale + (ref_noise if name in ("loglik", "d_log_theta") else 0.0)
        assert err <= tol, f"{name}: max error {err:.3e} > {tol:.3e} (magnitude {scale:.3e})"


def assert_float32_within_twice_reference(inputs, *, csr):
    x32 = [t.float() for t in inputs]
    judge = value_and_grads(nb_log_prob_reference, *[t.double() for t in x32], csr=csr)
    ref32 = value_and_grads(nb_log_prob_reference, *x32, csr=csr)
    got32 = value_and_grads(cpp, *x32, csr=csr)
    for name, k, r, j in zip(NAMES, got32, ref32, judge):
        assert k.dtype == torch.float32 and k.shape == j.shape, name
        if not j.numel():
            continue
        err_k = (k.double() - j).abs().max().item()
        err_r = (r.double() - j).abs().max().item()
        slack = 1e-6 * j.abs().max().item()
        assert err_k <= 2 * err_r + slack, (
            f"{name}: cpp float32 error {err_k:.3e} > 2 x reference float32 error {err_r:.3e} "
            f"+ {slack:.1e}")


CASES = {
    "typical": dict(cells=24, genes=203),
    "particles": dict(cells=9, genes=77, particles=3),
    "genes_1": dict(cells=11, genes=1, zero_fraction=0.3),
    "genes_odd": dict(cells=7, genes=17, particles=2, zero_fraction=0.5),
    "theta_1e-4": dict(cells=10, genes=60, theta=(-4, -4), zero_fraction=0.5),
    "theta_1e6": dict(cells=10, genes=60, theta=(6, 6), zero_fraction=0.5),
    "counts_to_1e5": dict(cells=10, genes=50, max_count=100_000, zero_fraction=0.5),
    "non_integer_counts": dict(cells=10, genes=50, integer=False, zero_fraction=0.5),
    "wide_logits": dict(cells=10, genes=64, logit_scale=6.0),
}


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("csr", [True, False], ids=["csr", "dense"])
@pytest.mark.parametrize("case", list(CASES))
def test_float64_matches_reference(isa, csr, case):
    assert_float64_matches(make_inputs(**CASES[case], seed=len(case)), csr=csr)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("csr", [True, False], ids=["csr", "dense"])
@pytest.mark.parametrize("case", list(CASES))
def test_float32_error_at_most_twice_the_float32_reference(isa, csr, case):
    assert_float32_within_twice_reference(make_inputs(**CASES[case], seed=len(case) + 1),
                                          csr=csr)


@pytest.mark.parametrize("csr", [True, False], ids=["csr", "dense"])
def test_empty_and_all_zero_rows(csr):
    counts, logits, log_library, log_theta = make_inputs(8, 40, particles=2, zero_fraction=0.6)
    counts[2] = 0.0
    counts[5] = 0.0
    if csr:  # an explicitly stored zero is a valid (if odd) CSR entry
        counts[6, 3] = 0.0
    assert_float64_matches((counts, logits, log_library, log_theta), csr=csr)
    assert_float32_within_twice_reference((counts, logits, log_library, log_theta), csr=csr)


@pytest.mark.parametrize("csr", [True, False], ids=["csr", "dense"])
def test_particles_of_one_cell_split_across_threads(csr):
    # rows are parallelised as (cell, particle) pairs: one cell's particles may land on several
    # threads, whose d_log_library and d_log_theta parts must add up
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        inputs = make_inputs(2, 5000, particles=9, zero_fraction=0.8)
        assert_float64_matches(inputs, csr=csr)
    finally:
        torch.set_num_threads(before)


def test_double_backward_raises_a_clear_error():
    counts, logits, log_library, log_theta = make_inputs(3, 8)
    logits.requires_grad_()
    g, = torch.autograd.grad(cpp(counts, logits, log_library, log_theta).sum(), logits,
                             create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(g.sum(), logits)


def test_dense_and_csr_counts_give_identical_results():
    inputs = make_inputs(16, 90, particles=2, max_count=300)
    a = value_and_grads(cpp, *inputs, csr=True)
    b = value_and_grads(cpp, *inputs, csr=False)
    for name, x, y in zip(NAMES, a, b):
        assert torch.equal(x, y), name


def test_every_isa_agrees_closely():
    inputs = [t.float() for t in make_inputs(12, 157, particles=2, max_count=60)]
    results = {}
    for name in _cpp._C.supported_isas():
        _cpp._C.set_cpu_isa(name)
        results[name] = value_and_grads(cpp, *inputs, csr=True)
    _cpp._C.set_cpu_isa("auto")
    base = results["baseline"]
    for isa_name, res in results.items():
        for name, a, b in zip(NAMES, res, base):
            scale = b.abs().max().item()
            assert (a - b).abs().max().item() <= 1e-5 * scale, (isa_name, name)


def test_zero_cells_and_particles():
    _, logits, _, log_theta = make_inputs(3, 20)
    empty = torch.zeros(0, 20, dtype=torch.float64)
    out = cpp(empty.to_sparse_csr(), logits[:0], torch.zeros(0, dtype=torch.float64), log_theta)
    assert out.shape == (0,)
    counts, logits, log_library, log_theta = make_inputs(3, 20, particles=2)
    out = cpp(counts, logits[:0], log_library, log_theta)
    assert out.shape == (0, 3)


def test_half_precision_logits_computed_in_float32():
    counts, logits, log_library, log_theta = make_inputs(6, 30)
    got = cpp(counts, logits.bfloat16(), log_library.bfloat16(), log_theta.bfloat16())
    assert got.dtype == torch.bfloat16
    want = nb_log_prob_reference(counts, logits.bfloat16().double(),
                                 log_library.bfloat16().double(), log_theta.bfloat16().double())
    torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=0)


def test_invalid_counts_raise_a_clear_error():
    counts, logits, log_library, log_theta = make_inputs(4, 10, zero_fraction=0.0)
    counts[1, 3] = -2.0
    with pytest.raises(RuntimeError, match="finite and non-negative"):
        cpp(counts.to_sparse_csr(), logits, log_library, log_theta)
    counts[1, 3] = float("nan")
    with pytest.raises(RuntimeError, match="finite and non-negative"):
        cpp(counts, logits, log_library, log_theta)


def test_out_of_range_column_raises_a_clear_error():
    crow = torch.tensor([0, 1, 2])
    col = torch.tensor([0, 7])
    values = torch.tensor([1.0, 2.0], dtype=torch.float64)
    logits = torch.randn(2, 5, dtype=torch.float64)
    log_library, log_theta = torch.ones(2, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"col_indices must lie in \[0, 5\)"):
        torch.ops.samsvae.nb_log_prob_fwd(crow, col, values, logits, log_library, log_theta)


def test_op_rejects_mismatched_dtypes_with_the_fix():
    crow, col, values = torch.tensor([0, 1]), torch.tensor([0]), torch.tensor([1.0])
    with pytest.raises(RuntimeError, match=r"log_theta must have dtype.*convert it"):
        torch.ops.samsvae.nb_log_prob_fwd(crow, col, values, torch.randn(1, 3),
                                          torch.ones(1), torch.zeros(3, dtype=torch.float64))


def _op_args(dtype=torch.float64):
    counts, logits, log_library, log_theta = make_inputs(4, 9, particles=2, zero_fraction=0.5)
    c = counts.to(dtype).to_sparse_csr()
    parts = (c.crow_indices().clone(), c.col_indices().clone(), c.values().clone())
    diff = tuple(t.to(dtype).requires_grad_() for t in (logits, log_library, log_theta))
    return counts.to(dtype), parts, diff


def test_opcheck_forward_ops():
    dense, parts, diff = _op_args()
    torch.library.opcheck(torch.ops.samsvae.nb_log_prob_fwd.default, (*parts, *diff))
    torch.library.opcheck(torch.ops.samsvae.nb_log_prob_dense_fwd.default, (dense, *diff))


def test_opcheck_backward_ops():
    dense, parts, diff = _op_args()
    diff = tuple(t.detach() for t in diff)
    _, lse = torch.ops.samsvae.nb_log_prob_fwd(*parts, *diff)
    grad = torch.randn(lse.shape, dtype=torch.float64)
    torch.library.opcheck(torch.ops.samsvae.nb_log_prob_bwd.default, (grad, *parts, *diff, lse))
    torch.library.opcheck(torch.ops.samsvae.nb_log_prob_dense_bwd.default,
                          (grad, dense, *diff, lse))


def test_gradcheck_float64():
    dense, _, diff = _op_args()
    assert torch.autograd.gradcheck(
        lambda *d: cpp(dense.to_sparse_csr(), *d), diff)


def test_torch_compile_matches_eager():
    counts, logits, log_library, log_theta = make_inputs(6, 33, particles=2, zero_fraction=0.5)

    def loss(c, lg, ll, lt):
        return nb_log_prob(c, lg, ll, lt, backend="cpp").sum()

    compiled = torch.compile(loss, fullgraph=True)  # dense counts: one graph
    # (inductor may sum the per-cell values in another order)
    torch.testing.assert_close(compiled(counts, logits, log_library, log_theta),
                               loss(counts, logits, log_library, log_theta), rtol=1e-12, atol=0)
    lg = logits.clone().requires_grad_()
    torch.compile(loss)(counts.to_sparse_csr(), lg, log_library, log_theta).backward()
    want = torch.autograd.grad(loss(counts.to_sparse_csr(), logits.requires_grad_(), log_library,
                                    log_theta), logits)[0]
    torch.testing.assert_close(lg.grad, want, rtol=0, atol=0)


def test_auto_backend_on_cpu_is_cpp_and_isa_selection_is_validated():
    assert backends.resolve("nb_log_prob", "auto", "cpu")[0] == "cpp"
    assert _cpp._C.cpu_isa() in _cpp._C.supported_isas()
    with pytest.raises(ValueError, match="choose one of: auto"):
        _cpp._C.set_cpu_isa("avx9000")
