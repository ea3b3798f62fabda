"""nb_log_prob on every tier: the reference against the textbook formula, the C++ kernels
(csrc/nb/, per ISA, with and without the fused logit bias) and the Triton kernels against the
float64 reference, forward and all gradients.

Accuracy rule (flash-attention's): in float32 a kernel's error against the float64 reference
evaluated on the same float32 inputs is at most twice that of the float32 reference (plus a
small slack stated by each test). Without CUDA the Triton kernels run on CPU tensors through
the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so their shapes stay tiny;
the CUDA-only tests check the registered op, opcheck and torch.compile on a GPU. The C++ tests
skip when samsvae._C is not built.
"""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import CPU_ISAS, HAS_TRITON, INTERPRETER_WARNINGS, needs_cpp, needs_triton
from helpers import make_inputs, random_inputs

from samsvae import ops
from samsvae.ops import backends, cpp_extension, nb_log_prob, nb_log_prob_reference
from samsvae.ops.nb import lgamma_ratio

if HAS_TRITON:
    from samsvae.ops.nb import triton as K
pytestmark = INTERPRETER_WARNINGS


# ------------------------------------------------------------ ops_reference


def naive_nb(x, logits, log_library, log_theta):
    """Textbook NB log-pmf (float64 only: it is the unstable form)."""
    mu = log_library.exp().unsqueeze(-1) * logits.softmax(-1)
    th = log_theta.exp()
    return (torch.lgamma(x + th) - torch.lgamma(th) - torch.lgamma(x + 1)
            + th * (torch.log(th) - torch.log(th + mu)) + x * (torch.log(mu) - torch.log(th + mu))).sum(-1)


@pytest.mark.parametrize("particles", [None, 3])
@pytest.mark.parametrize("layout", ["dense", "csr"])
def test_nb_reference_matches_textbook_formula(particles, layout):
    x, logits, ll, lt = random_inputs(particles=particles)
    counts = x if layout == "dense" else x.to_sparse_csr()
    got = ops.nb_log_prob(counts, logits, ll, lt, backend="reference")
    assert got.shape == logits.shape[:-1]
    torch.testing.assert_close(got, naive_nb(x, logits, ll, lt), rtol=1e-10, atol=1e-9)


def test_nb_reference_edges_empty_rows_and_huge_counts():
    x, logits, ll, lt = random_inputs(cells=4, genes=6)
    x[0] = 0                     # a row with only zeros
    x[1, 2] = 1e5                # a huge count
    lt = torch.tensor([math.log(1e-4), math.log(1e6), 0.0, 3.0, -2.0, 10.0], dtype=torch.float64)
    dense = ops.nb_log_prob(x, logits, ll, lt, backend="reference")
    csr = ops.nb_log_prob(x.to_sparse_csr(), logits, ll, lt, backend="reference")
    torch.testing.assert_close(dense, csr, rtol=1e-12, atol=1e-8)
    torch.testing.assert_close(dense, naive_nb(x, logits, ll, lt), rtol=1e-9, atol=1e-6)
    # an empty CSR matrix (no stored entries at all)
    empty = torch.zeros(4, 6, dtype=torch.float64)
    torch.testing.assert_close(ops.nb_log_prob(empty.to_sparse_csr(), logits, ll, lt),
                               naive_nb(empty, logits, ll, lt))


def test_nb_reference_gradcheck():
    x, logits, ll, lt = random_inputs(cells=3, genes=4, particles=2)
    for counts in (x, x.to_sparse_csr()):
        args = [t.clone().requires_grad_(True) for t in (logits, ll, lt)]
        assert torch.autograd.gradcheck(
            lambda a, b, c: ops.nb_log_prob(counts, a, b, c, backend="reference"), args)


@pytest.mark.parametrize("theta", [1e-4, 1e-1, 1.0, 30.0, 1e3, 1e6])
def test_nb_reference_float32_is_stable_at_extreme_theta(theta):
    x, logits, ll, _ = random_inputs(cells=16, genes=50, seed=3)
    x[0, :5] = torch.tensor([1e5, 3e4, 1.0, 2.0, 50.0], dtype=torch.float64)
    lt = torch.full((50,), math.log(theta), dtype=torch.float64)
    exact = ops.nb_log_prob(x, logits, ll, lt)
    f32 = ops.nb_log_prob(x.float(), logits.float(), ll.float(), lt.float())
    # Budget: 2e-5 nats per element (the naive fp32 lgamma form loses ~1 nat per element at
    # theta = 1e6) plus 4 fp32 ulps of the largest terms a row holds (x log mu and lgamma(x+1):
    # ~1e6 at x = 1e5, which no fp32 evaluation of those terms can beat).
    err = (f32.double() - exact).abs()
    mu_log = (ll.unsqueeze(-1) + logits.log_softmax(-1)).abs()
    scale = (x * mu_log + torch.lgamma(x + 1)).sum(-1)
    assert (err <= 2e-5 * 50 + 4 * 6e-8 * scale).all(), (err.max(), scale.max())


def test_lgamma_ratio_zero_at_zero_counts_and_matches_float64():
    theta = torch.logspace(-4, 6, 41, dtype=torch.float64)
    x = torch.tensor([0.0, 1.0, 7.0, 300.0, 1e5], dtype=torch.float64)[:, None]
    exact = lgamma_ratio(x, theta, theta.log())
    assert (exact[0] == 0).all()
    f32 = lgamma_ratio(x.float(), theta.float(), theta.log().float())
    assert (f32[0] == 0).all()
    err = (f32.double() - exact).abs()
    assert (err <= 1e-5 + 3e-7 * exact.abs() + 1e-7 * x * theta.log().abs()).all(), err.max()


def test_bad_shapes_are_named():
    x, logits, ll, lt = random_inputs()
    with pytest.raises(ValueError, match="log_theta"):
        ops.nb_log_prob(x, logits, ll, lt[:-1])
    with pytest.raises(ValueError, match="logits"):
        ops.nb_log_prob(x, logits[:, :-1], ll, lt)
    with pytest.raises(ValueError, match="sparse_csr"):
        ops.masked_embedding_sum(torch.zeros(4, 8, dtype=torch.float64), torch.zeros(8, 2),
                                 None, None, particles=1)


# ------------------------------------------------------------ cpp_nb


ISAS = CPU_ISAS


NAMES = ("loglik", "d_logits", "d_log_library", "d_log_theta")


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


@needs_cpp
@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("csr", [True, False], ids=["csr", "dense"])
@pytest.mark.parametrize("case", list(CASES))
def test_float64_matches_reference(isa, csr, case):
    assert_float64_matches(make_inputs(**CASES[case], seed=len(case)), csr=csr)


@needs_cpp
@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("csr", [True, False], ids=["csr", "dense"])
@pytest.mark.parametrize("case", list(CASES))
def test_float32_error_at_most_twice_the_float32_reference(isa, csr, case):
    assert_float32_within_twice_reference(make_inputs(**CASES[case], seed=len(case) + 1),
                                          csr=csr)


@needs_cpp
@pytest.mark.parametrize("csr", [True, False], ids=["csr", "dense"])
def test_empty_and_all_zero_rows(csr):
    counts, logits, log_library, log_theta = make_inputs(8, 40, particles=2, zero_fraction=0.6)
    counts[2] = 0.0
    counts[5] = 0.0
    if csr:  # an explicitly stored zero is a valid (if odd) CSR entry
        counts[6, 3] = 0.0
    assert_float64_matches((counts, logits, log_library, log_theta), csr=csr)
    assert_float32_within_twice_reference((counts, logits, log_library, log_theta), csr=csr)


@needs_cpp
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


@needs_cpp
def test_double_backward_raises_a_clear_error():
    counts, logits, log_library, log_theta = make_inputs(3, 8)
    logits.requires_grad_()
    g, = torch.autograd.grad(cpp(counts, logits, log_library, log_theta).sum(), logits,
                             create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(g.sum(), logits)


@needs_cpp
def test_dense_and_csr_counts_give_identical_results():
    inputs = make_inputs(16, 90, particles=2, max_count=300)
    a = value_and_grads(cpp, *inputs, csr=True)
    b = value_and_grads(cpp, *inputs, csr=False)
    for name, x, y in zip(NAMES, a, b):
        assert torch.equal(x, y), name


@needs_cpp
def test_every_isa_agrees_closely():
    inputs = [t.float() for t in make_inputs(12, 157, particles=2, max_count=60)]
    results = {}
    for name in cpp_extension.supported_isas():
        cpp_extension.set_cpu_isa(name)
        results[name] = value_and_grads(cpp, *inputs, csr=True)
    cpp_extension.set_cpu_isa("auto")
    base = results["baseline"]
    for isa_name, res in results.items():
        for name, a, b in zip(NAMES, res, base):
            scale = b.abs().max().item()
            assert (a - b).abs().max().item() <= 1e-5 * scale, (isa_name, name)


@needs_cpp
def test_zero_cells_and_particles():
    _, logits, _, log_theta = make_inputs(3, 20)
    empty = torch.zeros(0, 20, dtype=torch.float64)
    out = cpp(empty.to_sparse_csr(), logits[:0], torch.zeros(0, dtype=torch.float64), log_theta)
    assert out.shape == (0,)
    counts, logits, log_library, log_theta = make_inputs(3, 20, particles=2)
    out = cpp(counts, logits[:0], log_library, log_theta)
    assert out.shape == (0, 3)


@needs_cpp
def test_half_precision_logits_computed_in_float32():
    counts, logits, log_library, log_theta = make_inputs(6, 30)
    got = cpp(counts, logits.bfloat16(), log_library.bfloat16(), log_theta.bfloat16())
    assert got.dtype == torch.bfloat16
    want = nb_log_prob_reference(counts, logits.bfloat16().double(),
                                 log_library.bfloat16().double(), log_theta.bfloat16().double())
    torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=0)


@needs_cpp
def test_invalid_counts_raise_a_clear_error():
    counts, logits, log_library, log_theta = make_inputs(4, 10, zero_fraction=0.0)
    counts[1, 3] = -2.0
    with pytest.raises(RuntimeError, match="finite and non-negative"):
        cpp(counts.to_sparse_csr(), logits, log_library, log_theta)
    counts[1, 3] = float("nan")
    with pytest.raises(RuntimeError, match="finite and non-negative"):
        cpp(counts, logits, log_library, log_theta)


@needs_cpp
def test_out_of_range_column_raises_a_clear_error():
    crow = torch.tensor([0, 1, 2])
    col = torch.tensor([0, 7])
    values = torch.tensor([1.0, 2.0], dtype=torch.float64)
    logits = torch.randn(2, 5, dtype=torch.float64)
    log_library, log_theta = torch.ones(2, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"col_indices must lie in \[0, 5\)"):
        torch.ops.samsvae.nb_log_prob_fwd(crow, col, values, logits, log_library, log_theta)


@needs_cpp
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


@needs_cpp
def test_opcheck_forward_ops():
    dense, parts, diff = _op_args()
    torch.library.opcheck(torch.ops.samsvae.nb_log_prob_fwd.default, (*parts, *diff))
    torch.library.opcheck(torch.ops.samsvae.nb_log_prob_dense_fwd.default, (dense, *diff))


@needs_cpp
def test_opcheck_backward_ops():
    dense, parts, diff = _op_args()
    diff = tuple(t.detach() for t in diff)
    _, lse = torch.ops.samsvae.nb_log_prob_fwd(*parts, *diff)
    grad = torch.randn(lse.shape, dtype=torch.float64)
    torch.library.opcheck(torch.ops.samsvae.nb_log_prob_bwd.default, (grad, *parts, *diff, lse))
    torch.library.opcheck(torch.ops.samsvae.nb_log_prob_dense_bwd.default,
                          (grad, dense, *diff, lse))


@needs_cpp
def test_gradcheck_float64():
    dense, _, diff = _op_args()
    assert torch.autograd.gradcheck(
        lambda *d: cpp(dense.to_sparse_csr(), *d), diff)


@needs_cpp
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


@needs_cpp
def test_auto_backend_on_cpu_is_cpp_and_isa_selection_is_validated():
    assert backends.resolve("nb_log_prob", "auto", "cpu")[0] == "cpp"
    assert cpp_extension.cpu_isa() in cpp_extension.supported_isas()
    with pytest.raises(ValueError, match="choose one of: auto"):
        cpp_extension.set_cpu_isa("avx9000")


# ------------------------------------------------------------ cpp_nb_bias


BIAS_NAMES = ("loglik", "d_logits", "d_log_library", "d_log_theta", "d_logit_bias")


def _bias(genes, dtype=torch.float64, seed=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(genes, generator=g, dtype=torch.float64) * 2.0).to(dtype)


def _value_and_grads(backend, counts, logits, log_library, log_theta, bias, *, csr):
    leaves = [t.detach().clone().requires_grad_() for t in (logits, log_library, log_theta, bias)]
    c = counts.to_sparse_csr() if csr else counts
    out = nb_log_prob(c, *leaves[:3], logit_bias=leaves[3], backend=backend)
    w = torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64).reshape(out.shape)
    (out * w.to(out.dtype)).sum().backward()
    return [out.detach()] + [t.grad for t in leaves]


BIAS_CASES = {
    "typical": dict(cells=24, genes=203),
    "particles": dict(cells=9, genes=77, particles=3),
    "genes_odd": dict(cells=7, genes=17, particles=2, zero_fraction=0.5),
    "counts_to_1e5": dict(cells=10, genes=50, max_count=100_000, zero_fraction=0.5),
}


@needs_cpp
@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("csr", [True, False], ids=["csr", "dense"])
@pytest.mark.parametrize("case", sorted(BIAS_CASES))
def test_bias_float64_matches_reference(isa, csr, case):
    inputs = make_inputs(**BIAS_CASES[case], seed=len(case))
    bias = _bias(inputs[0].shape[1])
    want = _value_and_grads("reference", *inputs, bias, csr=csr)
    got = _value_and_grads("cpp", *inputs, bias, csr=csr)
    for name, a, b in zip(BIAS_NAMES, got, want):
        scale = b.abs().max().item()
        assert (a - b).abs().max().item() <= 1e-8 * scale + 1e-9, name


@needs_cpp
@pytest.mark.parametrize("csr", [True, False], ids=["csr", "dense"])
def test_bias_float32_error_at_most_twice_the_float32_reference(csr):
    inputs = [t.float() for t in make_inputs(cells=16, genes=301, particles=2, seed=3)]
    bias = _bias(301, torch.float32)
    judge = _value_and_grads("reference", *[t.double() for t in inputs], bias.double(), csr=csr)
    ref32 = _value_and_grads("reference", *inputs, bias, csr=csr)
    got32 = _value_and_grads("cpp", *inputs, bias, csr=csr)
    for name, k, r, j in zip(BIAS_NAMES, got32, ref32, judge):
        err_k = (k.double() - j).abs().max().item()
        err_r = (r.double() - j).abs().max().item()
        assert err_k <= 2 * err_r + 1e-6 * j.abs().max().item(), (name, err_k, err_r)


@needs_cpp
def test_bias_equals_adding_it_to_the_logits():
    counts, logits, log_library, log_theta = make_inputs(cells=12, genes=40, particles=2)
    bias = _bias(40)
    with_bias = nb_log_prob(counts.to_sparse_csr(), logits, log_library, log_theta,
                            logit_bias=bias, backend="cpp")
    added = nb_log_prob(counts.to_sparse_csr(), logits + bias, log_library, log_theta,
                        backend="cpp")
    torch.testing.assert_close(with_bias, added, rtol=1e-12, atol=1e-9)


@needs_cpp
def test_bias_of_the_wrong_shape_names_the_fix():
    counts, logits, log_library, log_theta = make_inputs(cells=3, genes=5)
    with pytest.raises(ValueError, match=r"logit_bias must be \(5,\)"):
        nb_log_prob(counts, logits, log_library, log_theta, logit_bias=torch.zeros(4),
                    backend="cpp")


def _bias_op_args():
    counts, logits, log_library, log_theta = make_inputs(4, 9, particles=2, zero_fraction=0.5)
    c = counts.to_sparse_csr()
    parts = (c.crow_indices().clone(), c.col_indices().clone(), c.values().clone())
    diff = tuple(t.requires_grad_() for t in (logits, log_library, log_theta))
    return counts, parts, diff, _bias(9).requires_grad_()


@needs_cpp
def test_opcheck_with_bias():
    dense, parts, diff, bias = _bias_op_args()
    torch.library.opcheck(torch.ops.samsvae.nb_log_prob_fwd.default, (*parts, *diff, bias))
    torch.library.opcheck(torch.ops.samsvae.nb_log_prob_dense_fwd.default, (dense, *diff, bias))
    plain = tuple(t.detach() for t in diff)
    _, lse = torch.ops.samsvae.nb_log_prob_fwd(*parts, *plain, bias.detach())
    grad = torch.randn(lse.shape, dtype=torch.float64)
    torch.library.opcheck(torch.ops.samsvae.nb_log_prob_bwd.default,
                          (grad, *parts, *plain, lse, bias.detach()))
    torch.library.opcheck(torch.ops.samsvae.nb_log_prob_dense_bwd.default,
                          (grad, dense, *plain, lse, bias.detach()))


@needs_cpp
def test_gradcheck_with_bias():
    dense, _, diff, bias = _bias_op_args()
    assert torch.autograd.gradcheck(
        lambda lg, lib, lt, b: nb_log_prob(dense.to_sparse_csr(), lg, lib, lt, logit_bias=b,
                                           backend="cpp"), (*diff, bias))


@needs_cpp
def test_torch_compile_with_bias_matches_eager():
    counts, logits, log_library, log_theta = (t.float() for t in make_inputs(6, 20, seed=2))
    bias = _bias(20, torch.float32)

    def f(lg, b):
        return nb_log_prob(counts, lg, log_library, log_theta, logit_bias=b, backend="cpp")

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(logits, bias), f(logits, bias))


@needs_cpp
def test_reference_backend_takes_the_bias_too():
    counts, logits, log_library, log_theta = make_inputs(cells=5, genes=11)
    bias = _bias(11)
    torch.testing.assert_close(
        nb_log_prob(counts, logits, log_library, log_theta, logit_bias=bias,
                    backend="reference"),
        nb_log_prob_reference(counts, logits + bias, log_library, log_theta))


@needs_cpp
@pytest.mark.parametrize("csr", [True, False], ids=["csr", "dense"])
def test_bias_gradient_adds_up_across_threads(csr):
    # each thread accumulates its rows' bias gradient in its own row; the rows must add up
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        inputs = make_inputs(3, 3000, particles=7, zero_fraction=0.8, seed=9)
        bias = _bias(3000)
        want = _value_and_grads("reference", *inputs, bias, csr=csr)
        got = _value_and_grads("cpp", *inputs, bias, csr=csr)
    finally:
        torch.set_num_threads(before)
    for name, a, b in zip(BIAS_NAMES, got, want):
        assert (a - b).abs().max().item() <= 1e-8 * b.abs().max().item() + 1e-9, name


# ------------------------------------------------------------ triton_nb


EPS32 = torch.finfo(torch.float32).eps


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter runs CPU tensors


# small tiles so that every path runs: G = 100 is 2 gene blocks (the second partial), 13 cells
# x 2 particles = 26 rows is 4 row tiles (the last partial), rows hold several CSR blocks
CFG = K.NBConfig(rows=8, block_g=64, block_nnz=32, num_warps=4)


P, C, G = 2, 13, 100


def _inputs(seed, heavy=False):
    """(counts (C, G), logits (P, C, G), log_library (C,), log_theta (G,)) float32.

    theta spans 1e-4 .. 1e6 over the genes (both forms of the count term); row 0 is all
    zeros (an empty CSR row); row 1 holds counts around the table size and up to 1e5; row 2
    non-integer counts. ``heavy`` makes every other row a library of ~2e5."""
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(P, C, G, generator=g)
    lt = torch.linspace(math.log(1e-4), math.log(1e6), G)[torch.randperm(G, generator=g)]
    size = torch.logspace(1, 4, C)
    if heavy:
        size[::2] = 2e5
    counts = torch.poisson(torch.softmax(logits[0], -1) * size[:, None], generator=g)
    counts[0] = 0
    counts[1, :8] = torch.tensor([1e5, 3e4, 700.0, 65.0, 64.0, 63.0, 2.0, 1.0])
    counts[2, :4] = torch.tensor([2.5, 0.5, 70.25, 7.0])
    log_library = torch.log(counts.sum(1) + 1.0)
    return [t.to(DEVICE) for t in (counts, logits, log_library, lt)]


def _evaluate(fn, counts, logits, log_library, log_theta, dtype):
    """Forward and the gradients of a random projection of it: (out, dlogits, dll, dlt)."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (logits, log_library, log_theta)]
    out = fn(counts, *leaves)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.device,
                                                                                   dtype)
    (out * weight).sum().backward()
    return [out.detach()] + [t.grad for t in leaves]


def _layout(counts, layout, dtype=torch.float32):
    counts = counts.to(dtype)
    return counts.to_sparse_csr() if layout == "csr" else counts


def _assert_float32_rule(kernel, ref32, ref64, names):
    for name, k, r32, r64 in zip(names, kernel, ref32, ref64):
        err_k = (k.double() - r64).norm().item()
        err_r = (r32.double() - r64).norm().item()
        slack = EPS32 * r64.norm().item()
        assert math.isfinite(err_k), f"{name}: non-finite values"
        assert err_k <= 2 * err_r + slack, (
            f"{name}: kernel error {err_k:.3e} > 2 x float32 reference error {err_r:.3e} "
            f"+ {slack:.3e}")


TRITON_NAMES = ("loglik", "d logits", "d log_library", "d log_theta")


@needs_triton
@pytest.mark.parametrize("layout,heavy", [("dense", False), ("csr", False), ("dense", True),
                                          ("csr", True)])
def test_matches_float64_reference(layout, heavy):
    counts, logits, ll, lt = _inputs(seed=1 + heavy, heavy=heavy)
    with K.override_config(CFG):
        kernel = _evaluate(K.nb_log_prob_triton, _layout(counts, layout), logits, ll, lt,
                           torch.float32)
    ref64 = _evaluate(nb_log_prob_reference, _layout(counts, layout, torch.float64), logits,
                      ll, lt, torch.float64)
    ref32 = _evaluate(nb_log_prob_reference, _layout(counts, layout), logits, ll, lt,
                      torch.float32)
    _assert_float32_rule(kernel, ref32, ref64, TRITON_NAMES)
    # the all-zero row is finite and its likelihood is -sum theta log1p(mu/theta)
    assert torch.isfinite(kernel[0]).all() and (kernel[0][:, 0] < 0).all()


@needs_triton
def test_every_count_branch_per_element():
    """One count per row against one theta per gene: table, table edge, large-count series
    (both theta forms, mu near and far from x) and non-integer counts, each row checked."""
    xs = torch.tensor([1.0, 2.0, 63.0, 64.0, 65.0, 700.0, 3e4, 1e5, 0.5, 2.5, 63.5, 1e5])
    thetas = torch.tensor([1e-4, 0.3, 1.0, 1.5, 9.99, 10.0, 10.01, 300.0, 1e4, 1e6])
    n_rows, n_genes = xs.numel(), thetas.numel()
    counts = torch.zeros(n_rows, n_genes)
    counts[:] = xs[:, None]
    # mu equal to x for most rows (the likelihood's mode), 1000x off for the last one
    logits = torch.zeros(1, n_rows, n_genes)
    ll = torch.log(xs * n_genes)
    ll[-1] -= math.log(1000.0)
    lt = thetas.log()
    counts, logits, ll, lt = [t.to(DEVICE) for t in (counts, logits, ll, lt)]
    with K.override_config(K.NBConfig(rows=4, block_g=8, block_nnz=8, num_warps=4)):
        kernel = _evaluate(K.nb_log_prob_triton, counts, logits, ll, lt, torch.float32)
    ref64 = _evaluate(nb_log_prob_reference, counts.double(), logits, ll, lt, torch.float64)
    ref32 = _evaluate(nb_log_prob_reference, counts, logits, ll, lt, torch.float32)
    _assert_float32_rule(kernel, ref32, ref64, TRITON_NAMES)
    # per row: within 2x the float32 reference's own error plus a few ulps of the row's size
    err_k = (kernel[0].double() - ref64[0]).abs()[0].cpu()
    err_r = (ref32[0].double() - ref64[0]).abs()[0].cpu()
    scale = (ref64[0].abs().cpu() + xs.double() * torch.log(xs.double() + 1))[0]
    bad = err_k > 2 * err_r + 4 * EPS32 * scale
    assert not bad.any(), (f"rows x={xs[bad].tolist()}: kernel errors {err_k[bad].tolist()}, "
                           f"float32 reference {err_r[bad].tolist()}")


@needs_triton
def test_particles_share_counts():
    """(P, C, G) logits against (C, G) counts equal P separate single-particle calls."""
    counts, logits, ll, lt = _inputs(seed=3)
    weight = torch.randn(P, C, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    leaves = [t.clone().requires_grad_() for t in (logits, ll, lt)]
    singles = [[t.clone().requires_grad_() for t in (logits[p:p + 1], ll, lt)] for p in range(P)]
    with K.override_config(CFG):
        joint = K.nb_log_prob_triton(counts, *leaves)
        (joint * weight).sum().backward()
        outs = []
        for p, single in enumerate(singles):
            outs.append(K.nb_log_prob_triton(counts, *single))
            (outs[-1] * weight[p:p + 1]).sum().backward()
    # rows are computed independently: identical values and logit gradients
    assert torch.equal(joint.detach(), torch.cat(outs).detach())
    assert torch.equal(leaves[0].grad, torch.cat([s[0].grad for s in singles]))
    # d log_library and d log_theta sum over particles (float32 sums in another order)
    for i in (1, 2):
        total = sum(s[i].grad for s in singles)
        assert torch.allclose(leaves[i].grad, total, rtol=1e-5,
                              atol=1e-6 * total.abs().max().item())


@needs_triton
def test_log_theta_without_grad_and_empty_batch():
    counts, logits, ll, lt = _inputs(seed=4)
    grads = []
    for theta_grad in (False, True):  # the backward skips d log_theta when not needed
        lg = logits.clone().requires_grad_()
        t = lt.clone().requires_grad_(theta_grad)
        with K.override_config(CFG):
            K.nb_log_prob_triton(counts, lg, ll, t).sum().backward()
        grads.append(lg.grad)
        assert (t.grad is not None) == theta_grad
    assert torch.equal(grads[0], grads[1])

    def zeros(*shape):
        return torch.zeros(*shape, device=DEVICE)

    empty = K.nb_log_prob_triton(zeros(0, G), zeros(3, 0, G), zeros(0), lt)
    assert empty.shape == (3, 0)
    no_genes = zeros(2, 0)
    assert torch.equal(K.nb_log_prob_triton(no_genes, no_genes, zeros(2), zeros(0)),
                       nb_log_prob_reference(no_genes, no_genes, zeros(2), zeros(0)))


@needs_triton
def test_float64_goes_to_the_reference():
    counts, logits, ll, lt = _inputs(seed=5)
    args = (counts.double(), logits.double(), ll.double(), lt.double())
    assert torch.equal(K.nb_log_prob_triton(*args), nb_log_prob_reference(*args))


@needs_triton
def test_tables_are_exact_sums():
    theta = torch.logspace(-4, 6, 50)
    tab, dtab = [t.cpu() for t in K.nb_tables(theta.to(DEVICE))]
    x = torch.arange(K.X_TAB, dtype=torch.float64)[:, None]
    t = theta.double()[None]
    j = torch.arange(K.X_TAB - 1, dtype=torch.float64)[:, None]
    # exact finite sums in float64 (no lgamma/digamma cancellation in the check either)
    e = torch.cat([torch.zeros(1, t.shape[1], dtype=torch.float64),
                   torch.cumsum(torch.log1p(j / t) - torch.log(j + 1), 0)])
    f = e + x * torch.log(t)
    de = torch.cat([torch.zeros(1, t.shape[1], dtype=torch.float64),
                    torch.cumsum(-j / (t + j), 0)])
    df = de + x
    big = t >= 10
    assert torch.allclose(tab[:-1].double(), torch.where(big, e, f), rtol=4 * EPS32, atol=1e-5)
    assert torch.allclose(dtab[:-1].double(), torch.where(big, de, df), rtol=4 * EPS32,
                          atol=1e-6)
    assert torch.allclose(tab[-1].double(), torch.lgamma(theta.double()), rtol=EPS32)
    assert torch.allclose(dtab[-1].double(), torch.digamma(theta.double()), rtol=EPS32)


@needs_triton
def test_rejects_inputs_on_different_devices():
    counts, logits, ll, lt = _inputs(seed=6)
    with pytest.raises(ValueError, match="one device"):
        K.nb_log_prob_triton(counts.to("meta"), logits, ll, lt)


@needs_triton
def test_import_samsvae_does_not_import_triton():
    code = ("import sys, samsvae; from samsvae.ops import backends; "
            "print('triton' in sys.modules, "
            "'triton' in backends._REGISTRY['nb_log_prob'], "
            "'triton' in backends._REGISTRY['masked_embedding_sum'])")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=str(Path(__file__).resolve().parents[2]), check=True).stdout.split()
    imported, nb_registered, emb_registered = out
    assert nb_registered == "True" and emb_registered == "True"
    if not torch.cuda.is_available():
        assert imported == "False"


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_explicit_triton_backend_without_cuda_is_a_clear_error():
    with pytest.raises(backends.BackendUnavailableError, match="CUDA is not available"):
        backends.resolve("nb_log_prob", "triton", "cpu")
    assert backends.resolve("nb_log_prob", "auto", "cpu")[0] != "triton"


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_triton
@cuda
@pytest.mark.parametrize("layout", ["dense", "csr"])
def test_cuda_registered_backend_matches_reference(layout):
    counts, logits, ll, lt = [t.cuda() for t in _inputs(seed=8, heavy=True)]

    def triton_fn(c, lg, l, t):
        return nb_log_prob(c, lg, l, t, backend="triton")

    kernel = _evaluate(triton_fn, _layout(counts, layout), logits, ll, lt, torch.float32)
    ref64 = _evaluate(nb_log_prob_reference, _layout(counts, layout, torch.float64), logits,
                      ll, lt, torch.float64)
    ref32 = _evaluate(nb_log_prob_reference, _layout(counts, layout), logits, ll, lt,
                      torch.float32)
    _assert_float32_rule(kernel, ref32, ref64, TRITON_NAMES)


@needs_triton
@cuda
def test_cuda_opcheck_and_compile():
    counts, logits, ll, lt = [t.cuda() for t in _inputs(seed=9)]
    lg = logits.clone().requires_grad_()
    t = lt.clone().requires_grad_()
    torch.library.opcheck(K._nb_fwd_op, (lg, ll, t, counts, None, None, None))
    csr = counts.to_sparse_csr()
    # contiguous copies: opcheck must not see views into the sparse tensor
    torch.library.opcheck(K._nb_fwd_op, (lg, ll, t, None, csr.crow_indices().contiguous(),
                                         csr.col_indices().contiguous(),
                                         csr.values().clone()))

    def loss(lg_, t_):
        return K.nb_log_prob_triton(counts, lg_, ll, t_).sum()

    eager = loss(lg, t)
    g_eager = torch.autograd.grad(eager, (lg, t))
    compiled = torch.compile(loss, fullgraph=True)(lg, t)
    g_comp = torch.autograd.grad(compiled, (lg, t))
    assert torch.allclose(compiled, eager, rtol=1e-6)
    for a, b in zip(g_comp, g_eager):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@needs_triton
@cuda
def test_cuda_bfloat16_logits():
    counts, logits, ll, lt = [t.cuda() for t in _inputs(seed=10)]
    lg = logits.bfloat16().requires_grad_()
    out = K.nb_log_prob_triton(counts, lg, ll, lt)
    out.sum().backward()
    ref = nb_log_prob_reference(counts.double(), lg.detach().double(), ll.double(), lt.double())
    assert out.dtype == torch.bfloat16 and lg.grad.dtype == torch.bfloat16
    assert torch.allclose(out.double(), ref, rtol=1e-2)


@needs_triton
def test_logit_bias_is_added_before_the_kernel():
    wrapper = K.nb_log_prob_triton
    g = torch.Generator().manual_seed(11)
    counts = torch.poisson(torch.rand(4, 16, generator=g) * 3)
    logits = torch.randn(4, 16, generator=g)
    ll, lt = torch.full((4,), 4.0), torch.randn(16, generator=g)
    bias = torch.randn(16, generator=g, requires_grad=True)
    out = wrapper(counts, logits, ll, lt, bias)
    want = nb_log_prob_reference(counts.double(), (logits + bias).double(), ll.double(),
                                 lt.double())
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-3)
    out.sum().backward()
    assert bias.grad is not None and torch.isfinite(bias.grad).all()


def test_float32_reference_gradient_at_theta_1e6_within_3e_4():
    """Issue 15: at theta = 1e6 the float32 reference's gradients (logits, log_theta) stay
    within 3e-4 (relative, max-norm) of float64: the theta-gradient of theta * log1p(mu/theta)
    and of the Stirling form cancel O(mu/theta) terms unless written as O((mu/theta)^2) ones."""
    from samsvae.ops.nb.reference import nb_log_prob_reference
    g = torch.Generator().manual_seed(0)
    cells, genes = 64, 50
    counts = torch.poisson(torch.rand(cells, genes, generator=g) * 5, generator=g)
    logits = torch.randn(cells, genes, generator=g)
    ll = math.log(1e4) + 0.2 * torch.randn(cells, generator=g)
    lt = torch.full((genes,), math.log(1e6))

    def grads(dtype):
        lg = logits.to(dtype).detach().requires_grad_()
        th = lt.to(dtype).detach().requires_grad_()
        nb_log_prob_reference(counts.to(dtype), lg, ll.to(dtype), th).sum().backward()
        return lg.grad.double(), th.grad.double()
    for got, want in zip(grads(torch.float32), grads(torch.float64)):
        rel = float((got - want).abs().max() / want.abs().max())
        assert rel < 3e-4, rel
