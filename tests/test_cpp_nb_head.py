"""The training form of the decoder head on the C++ backend (``nb_log_prob_linear(...,
recompute=False)``): the NB forward also computes the unit-weight gradient
(``samsvae::nb_log_prob_fwd_grad``) and backward combines it with the upstream gradient.

Judged against the float64 reference ``nb_log_prob_reference(counts, F.linear(h, W, b), ...)``:
value and the gradients of hidden, weight, bias, log_library and log_theta, for rows weighted
alike (the fast path) and unequally (exact through U for hidden/weight/bias/log_library; the
log_theta gradient through the recompute path), every ISA, CSR and dense counts.
"""
import pytest
import torch
import torch.nn.functional as F

from samsvae.ops import _cpp, nb_log_prob_linear, nb_log_prob_reference

from conftest import CPU_ISAS as ISAS
from test_cpp_nb import make_inputs

pytestmark = pytest.mark.skipif(not _cpp.ext_available(), reason="C++ extension not built")

NAMES = ("loglik", "d_hidden", "d_weight", "d_bias", "d_log_library", "d_log_theta")


def head_inputs(cells, genes, particles, hidden=6, *, seed=0, **kw):
    """float64 counts (C, G) and leaves hidden (P, C, H), weight (G, H), bias (G,),
    log_library (C,), log_theta (G,)."""
    counts, _, log_library, log_theta = make_inputs(cells, genes, seed=seed, **kw)
    g = torch.Generator().manual_seed(seed + 100)
    f64 = torch.float64
    h = torch.randn(particles, cells, hidden, generator=g, dtype=f64)
    w = torch.randn(genes, hidden, generator=g, dtype=f64) * 0.7
    b = torch.randn(genes, generator=g, dtype=f64)
    return counts, [h, w, b, log_library, log_theta]


def reference_head(counts, h, w, b, lib, lt):
    return nb_log_prob_reference(counts, F.linear(h, w, b), lib, lt)


def cpp_head(counts, h, w, b, lib, lt):
    return nb_log_prob_linear(counts, h, w, b, lib, lt, backend="cpp", recompute=False)


def value_and_grads(fn, counts, leaves, *, csr, weights, dtype=torch.float64, bias=True,
                    theta_grad=True):
    ts = [t.detach().to(dtype).clone() for t in leaves]
    if not bias:
        ts[2] = None
    for i, t in enumerate(ts):
        if t is not None and (theta_grad or i != 4):
            t.requires_grad_()
    c = counts.to(dtype)
    c = c.to_sparse_csr() if csr else c
    out = fn(c, *ts)
    if weights == "uniform":
        w = torch.full(out.shape, -0.37, dtype=torch.float64)
    else:
        w = torch.linspace(-1.5, 0.5, out.numel(), dtype=torch.float64).reshape(out.shape)
    (out * w.to(out.dtype)).sum().backward()
    return [out.detach()] + [None if t is None else t.grad for t in ts]


CASES = {
    "typical": dict(cells=20, genes=203, particles=3),
    "one_particle_odd_genes": dict(cells=7, genes=17, particles=1, zero_fraction=0.5),
    "counts_to_1e5": dict(cells=10, genes=50, particles=2, max_count=100_000,
                          zero_fraction=0.5),
    "theta_extremes": dict(cells=8, genes=40, particles=2, theta=(-4, 6)),
}


def _close(got, want, rtol, names=NAMES):
    for name, a, b in zip(names, got, want):
        if b is None:
            assert a is None, name
            continue
        scale = b.abs().max().item()
        err = (a.double() - b).abs().max().item()
        assert err <= rtol * scale + 1e-9, f"{name}: error {err:.3g} at scale {scale:.3g}"


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("csr", [True, False], ids=["csr", "dense"])
@pytest.mark.parametrize("weights", ["uniform", "unequal"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_float64_matches_reference(isa, csr, weights, case):
    counts, leaves = head_inputs(**CASES[case], seed=len(case))
    counts[1] = 0.0  # a cell without counts
    want = value_and_grads(reference_head, counts, leaves, csr=csr, weights=weights)
    got = value_and_grads(cpp_head, counts, leaves, csr=csr, weights=weights)
    _close(got, want, 1e-8)


@pytest.mark.parametrize("weights", ["uniform", "unequal"])
@pytest.mark.parametrize("theta_grad", [True, False], ids=["theta_grad", "theta_fixed"])
def test_without_bias_and_with_fixed_theta(weights, theta_grad):
    counts, leaves = head_inputs(cells=12, genes=33, particles=2, seed=7)
    kw = dict(csr=True, weights=weights, bias=False, theta_grad=theta_grad)
    want = value_and_grads(reference_head, counts, leaves, **kw)
    got = value_and_grads(cpp_head, counts, leaves, **kw)
    assert got[3] is None and (got[5] is None) == (not theta_grad)
    _close(got, want, 1e-8)


@pytest.mark.parametrize("weights", ["uniform", "unequal"])
def test_float32_error_at_most_twice_the_float32_reference(weights):
    counts, leaves = head_inputs(cells=16, genes=301, particles=2, hidden=8, seed=3)
    judge = value_and_grads(reference_head, counts, leaves, csr=True, weights=weights)
    ref32 = value_and_grads(reference_head, counts, leaves, csr=True, weights=weights,
                            dtype=torch.float32)
    got = value_and_grads(cpp_head, counts, leaves, csr=True, weights=weights,
                          dtype=torch.float32)
    for name, a, r, j in zip(NAMES, got, ref32, judge):
        err = (a.double() - j).abs().max().item()
        ref_err = (r.double() - j).abs().max().item()
        assert err <= 2 * ref_err + 1e-6 * j.abs().max().item(), (name, err, ref_err)


def test_kernel_equals_forward_then_unit_backward():
    """The op itself: out, lse equal the forward kernel's; the overwritten logits and the sums
    equal the backward kernel's at grad_out = 1."""
    counts, logits, lib, lt = make_inputs(9, 61, 3, seed=11, max_count=300)
    bias = torch.randn(61, dtype=torch.float64)
    c = counts.to_sparse_csr()
    parts = (c.crow_indices(), c.col_indices(), c.values())
    out, lse = torch.ops.samsvae.nb_log_prob_fwd(*parts, logits, lib, lt, bias)
    ones = torch.ones_like(out)
    d_logits, d_lib, d_theta, d_bias = torch.ops.samsvae.nb_log_prob_bwd(
        ones, *parts, logits, lib, lt, lse, bias)
    U = logits.clone()
    out2, lse2, row_dlib, d_theta2, d_bias2 = torch.ops.samsvae.nb_log_prob_fwd_grad(
        *parts, U, lib, lt, bias)
    torch.testing.assert_close(out2, out, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(lse2, lse, rtol=1e-14, atol=0)
    torch.testing.assert_close(U, d_logits, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(row_dlib.sum(0), d_lib, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(d_theta2, d_theta, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(d_bias2, d_bias, rtol=1e-10, atol=1e-10)


def test_opcheck():
    counts, logits, lib, lt = make_inputs(5, 9, 2, seed=2, zero_fraction=0.5)
    bias = torch.randn(9, dtype=torch.float64)
    c = counts.to_sparse_csr()
    parts = (c.crow_indices().clone(), c.col_indices().clone(), c.values().clone())
    torch.library.opcheck(torch.ops.samsvae.nb_log_prob_fwd_grad.default,
                          (*parts, logits.clone(), lib, lt, bias))
    torch.library.opcheck(torch.ops.samsvae.nb_log_prob_dense_fwd_grad.default,
                          (counts, logits.clone(), lib, lt, None))


def test_bad_counts_raise():
    counts, logits, lib, lt = make_inputs(4, 7, 1, seed=1, zero_fraction=0.3)
    counts[0, 0] = -1.0
    with pytest.raises(RuntimeError, match="finite and non-negative"):
        torch.ops.samsvae.nb_log_prob_dense_fwd_grad(counts, logits.clone(), lib, lt)


def test_training_step_uses_the_gradient_from_the_forward(monkeypatch):
    """A model's ELBO weights every row alike: backward must not take the recompute path."""
    import numpy as np

    from samsvae.bench import synth_batch
    from samsvae.models import build_model
    from samsvae.ops import _cpp_nb_head

    def refuse(*args, **kwargs):
        raise AssertionError("the training step took the recompute path")
    monkeypatch.setattr(_cpp_nb_head, "_recompute_backward", refuse)
    batch = synth_batch(32, 50, 6, seed=0)
    model = build_model("sams_vae", "mean_field", n_genes=50, n_perturbations=6, n_latent=4,
                        n_hidden=16, perturbation_counts=np.full(6, 10.0), backend="cpp")
    calls = []
    original = _cpp_nb_head._HeadGradInForward.apply
    monkeypatch.setattr(_cpp_nb_head._HeadGradInForward, "apply",
                        lambda *a: calls.append(1) or original(*a))
    model.loss(batch, particles=3)["loss"].backward()
    assert calls, "the training step did not use the C++ training head"
    assert model.decoder.out.weight.grad.abs().sum() > 0
    assert model.likelihood.log_theta.grad.abs().sum() > 0


def test_torch_compile_fullgraph_matches_eager():
    """Under torch.compile the head runs the forward and backward kernels (the gradient-in-
    forward Function branches on the upstream gradient, which a graph cannot hold)."""
    counts, leaves = head_inputs(10, 30, 2, seed=1)
    want = value_and_grads(cpp_head, counts, leaves, csr=False, weights="unequal")
    got = value_and_grads(torch.compile(cpp_head, fullgraph=True), counts, leaves, csr=False,
                          weights="unequal")
    _close(got, want, 1e-10)
