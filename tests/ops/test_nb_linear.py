"""nb_log_prob_linear: the fused last Linear + NB head in both forms (recomputing chunks on any
backend; storing the logits, with the C++ forward-with-gradient head on the cpp backend)
against the unfused reference, and the store-or-recompute choice.
"""
import pytest
import torch
import torch.nn.functional as F
from helpers import CPU_ISAS as ISAS
from helpers import make_inputs

from samsvae import ops
from samsvae.ops import (BackendUnavailableError, backends, cpp_extension, nb_log_prob,
                         nb_log_prob_linear, nb_log_prob_reference)
from samsvae.ops.nb import cpp as nb_cpp
from samsvae.ops.nb import linear as nb_linear

needs_cpp = pytest.mark.skipif(not cpp_extension.ext_available(),
                               reason=f"C++ extension not built: {cpp_extension.EXT_ERROR}")


# ------------------------------------------------------------ nb_linear


NB_BACKENDS_CPU = [b for b in ("reference", "cpp") if b in ops.available_backends("nb_log_prob")]


def _inputs(cells=9, genes=13, hidden=6, particles=3, *, layout="dense", bias=True,
            dtype=torch.float64, seed=0, zero_fraction=0.5):
    g = torch.Generator().manual_seed(seed)
    mean = torch.rand(cells, genes, generator=g, dtype=torch.float64) * 6
    x = torch.poisson(mean, generator=g)
    x[torch.rand(cells, genes, generator=g) < zero_fraction] = 0
    x[1] = 0                      # an empty row
    x[0, 0] = 250.0               # a large count
    counts = x.to(dtype)
    if layout == "csr":
        counts = counts.to_sparse_csr()
    shape = (cells, hidden) if particles is None else (particles, cells, hidden)
    h = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(genes, hidden, generator=g, dtype=torch.float64) / hidden ** 0.5).to(dtype)
    b = torch.randn(genes, generator=g, dtype=torch.float64).to(dtype) if bias else None
    log_lib = (torch.log(x.sum(1) + 1.0) + 0.1).to(dtype)
    log_theta = torch.linspace(-3, 5, genes, dtype=torch.float64).to(dtype)
    return counts, h, w, b, log_lib, log_theta


def _leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def _value_and_grads(fn, counts, h, w, b, lib, lt, seed=1):
    h, w, b, lib, lt = _leaves(h, w, b, lib, lt)
    out = fn(counts, h, w, b, lib, lt)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed),
                           dtype=torch.float64).to(out.dtype)
    (out * upstream).sum().backward()
    grads = [None if t is None else t.grad for t in (h, w, b, lib, lt)]
    return out.detach(), grads


def _unfused(counts, h, w, b, lib, lt):
    return nb_log_prob(counts, F.linear(h, w, b), lib, lt, backend="reference")


@pytest.mark.parametrize("layout", ["dense", "csr"])
@pytest.mark.parametrize("particles", [None, 1, 4])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk_rows", [None, 1, 4, 5, 9, 20, 1000])
def test_matches_unfused_float64(layout, particles, bias, chunk_rows):
    args = _inputs(layout=layout, particles=particles, bias=bias)
    want, want_grads = _value_and_grads(_unfused, *args)
    got, got_grads = _value_and_grads(
        lambda *a: nb_log_prob_linear(*a, backend="reference", chunk_rows=chunk_rows), *args)
    assert got.shape == args[1].shape[:-1]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-10)
    for name, g_got, g_want in zip(("hidden", "weight", "bias", "log_library", "log_theta"),
                                   got_grads, want_grads):
        if g_want is None:
            assert g_got is None, name
            continue
        torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("backend", NB_BACKENDS_CPU)
@pytest.mark.parametrize("layout", ["dense", "csr"])
def test_float32_close_to_float64_unfused(backend, layout):
    """Every available NB backend under the fused head, in float32, against the float64 judge."""
    args64 = _inputs(cells=33, genes=70, hidden=16, particles=5, layout=layout, zero_fraction=0.8)
    args32 = [None if t is None else t.float() for t in args64]
    if layout == "csr":
        args32[0] = args64[0].to_dense().float().to_sparse_csr()
    want, want_grads = _value_and_grads(_unfused, *args64)
    got, got_grads = _value_and_grads(
        lambda *a: nb_log_prob_linear(*a, backend=backend, chunk_rows=7), *args32)
    # float32 tolerance relative to the row magnitude (sums over 70 genes)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-3)
    for name, g_got, g_want in zip(("hidden", "weight", "bias", "log_library", "log_theta"),
                                   got_grads, want_grads):
        err = (g_got.double() - g_want).abs().max() / g_want.abs().max().clamp_min(1e-12)
        assert err < 1e-4, (name, float(err))


def test_gradcheck_tiny():
    counts, h, w, b, lib, lt = _inputs(cells=4, genes=5, hidden=3, particles=2, layout="csr")
    h, w, b, lib, lt = _leaves(h, w, b, lib, lt)
    assert torch.autograd.gradcheck(
        lambda h, w, b, lib, lt: nb_log_prob_linear(counts, h, w, b, lib, lt,
                                                    backend="reference", chunk_rows=3),
        (h, w, b, lib, lt))


def test_only_some_inputs_need_grad():
    counts, h, w, b, lib, lt = _inputs()
    h = h.clone().requires_grad_()
    out = nb_log_prob_linear(counts, h, w, b, lib, lt, chunk_rows=4)
    out.sum().backward()
    want_h = h.detach().clone().requires_grad_()
    _unfused(counts, want_h, w, b, lib, lt).sum().backward()
    torch.testing.assert_close(h.grad, want_h.grad, rtol=1e-10, atol=1e-10)


def test_chunks_bound_the_rows_evaluated(monkeypatch):
    """The NB op only ever sees <= chunk_rows logit rows at once, and all rows exactly once."""
    seen = []
    real_resolve = backends.resolve

    def spy_resolve(op, backend="auto", device="cpu"):
        name, fn = real_resolve(op, backend, device)
        if op != "nb_log_prob":
            return name, fn

        def spy(counts, logits, log_library, log_theta):
            seen.append(logits.shape[0] * logits.shape[1])
            assert counts.shape[0] == logits.shape[1]
            return fn(counts, logits, log_library, log_theta)
        return name, spy

    monkeypatch.setattr(backends, "resolve", spy_resolve)
    counts, h, w, b, lib, lt = _inputs(cells=9, particles=4, layout="csr")
    for chunk_rows in (4, 9, 20):
        seen.clear()
        with torch.no_grad():
            nb_log_prob_linear(counts, h, w, b, lib, lt, chunk_rows=chunk_rows)
        assert max(seen) <= chunk_rows
        assert sum(seen) == 4 * 9


def test_default_chunk_is_about_32_mib():
    rows = nb_linear.default_chunk_rows(8000, torch.float32)
    assert 32 * 2**20 - 8000 * 4 < rows * 8000 * 4 <= 32 * 2**20
    assert nb_linear.default_chunk_rows(10**9, torch.float64) == 1


def test_follows_the_nb_log_prob_backend():
    """The head registers no implementation of its own: it resolves like nb_log_prob."""
    assert backends.resolve("nb_log_prob_linear", "reference", "cpu") == \
        backends.resolve("nb_log_prob", "reference", "cpu")
    assert backends.resolve("nb_log_prob_linear", "auto", "cpu")[0] == \
        backends.resolve("nb_log_prob", "auto", "cpu")[0]
    line = [ln for ln in ops.backend_report().splitlines()
            if ln.startswith("nb_log_prob_linear:")]
    assert len(line) == 1 and line[0].endswith("(composite: runs the nb_log_prob kernel of that backend inside)")
    assert "nb_log_prob_linear_stored" not in ops.backend_report()


@pytest.mark.parametrize("grad, budget, stores", [
    (True, 2**40, True), (True, 0, False), (False, 2**40, False)])
def test_recompute_none_stores_when_grad_is_on_and_the_logits_fit(monkeypatch, grad, budget,
                                                                  stores):
    """recompute=None: the one store-or-recompute choice (samsvae.ops.nb)."""
    import samsvae.ops.nb as nb
    monkeypatch.setattr(nb, "STORED_LOGITS_BYTES", budget)
    chunked = []
    real = nb.nb_log_prob_linear_chunked
    monkeypatch.setattr(nb, "nb_log_prob_linear_chunked",
                        lambda *a, **k: chunked.append(1) or real(*a, **k))
    counts, h, w, b, lib, lt = _inputs()
    with torch.set_grad_enabled(grad):
        out = nb_log_prob_linear(counts, h, w, b, lib, lt, recompute=None)
    assert bool(chunked) != stores
    torch.testing.assert_close(out, _unfused(counts, h, w, b, lib, lt), rtol=1e-10,
                               atol=1e-10)


@pytest.mark.parametrize("change, message", [
    (lambda a: {**a, "weight": a["weight"][:, :-1]}, "weight must be"),
    (lambda a: {**a, "weight": a["weight"][:-1]}, "weight must be"),
    (lambda a: {**a, "bias": a["bias"][:-1]}, "bias must be"),
    (lambda a: {**a, "hidden": a["hidden"][:, :-1]}, "hidden must be"),
    (lambda a: {**a, "hidden": a["hidden"][None]}, "hidden must be"),
    (lambda a: {**a, "counts": a["counts"][None]}, "counts must be"),
    (lambda a: {**a, "log_library": a["log_library"][:-1]}, "log_library must be"),
    (lambda a: {**a, "log_theta": a["log_theta"][:-1]}, "log_theta must be"),
    (lambda a: {**a, "chunk_rows": 0}, "chunk_rows must be"),
    (lambda a: {**a, "chunk_rows": 2.5}, "chunk_rows must be"),
])
def test_bad_shapes_raise_clear_errors(change, message):
    counts, h, w, b, lib, lt = _inputs()
    kwargs = dict(counts=counts, hidden=h, weight=w, bias=b, log_library=lib, log_theta=lt,
                  chunk_rows=None)
    with pytest.raises(ValueError, match=message):
        nb_log_prob_linear(**change(kwargs))


def test_dtype_mismatch_names_the_fix():
    counts, h, w, b, lib, lt = _inputs()
    with pytest.raises(TypeError, match="weight has dtype"):
        nb_log_prob_linear(counts, h, w.float(), b, lib, lt)
    with pytest.raises(TypeError, match="hidden must be floating point"):
        nb_log_prob_linear(counts, h.long(), w, b, lib, lt)


def test_explicit_unavailable_backend_raises():
    counts, h, w, b, lib, lt = _inputs()
    missing = [b_ for b_ in ("cpp", "triton")
               if b_ not in ops.available_backends("nb_log_prob") or b_ == "triton"]
    with pytest.raises(BackendUnavailableError):
        nb_log_prob_linear(counts, h, w, b, lib, lt, backend=missing[0])


# ------------------------------------------------------------ cpp_nb_head


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


@needs_cpp
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


@needs_cpp
@pytest.mark.parametrize("weights", ["uniform", "unequal"])
@pytest.mark.parametrize("theta_grad", [True, False], ids=["theta_grad", "theta_fixed"])
def test_without_bias_and_with_fixed_theta(weights, theta_grad):
    counts, leaves = head_inputs(cells=12, genes=33, particles=2, seed=7)
    kw = dict(csr=True, weights=weights, bias=False, theta_grad=theta_grad)
    want = value_and_grads(reference_head, counts, leaves, **kw)
    got = value_and_grads(cpp_head, counts, leaves, **kw)
    assert got[3] is None and (got[5] is None) == (not theta_grad)
    _close(got, want, 1e-8)


@needs_cpp
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


@needs_cpp
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


@needs_cpp
def test_opcheck():
    counts, logits, lib, lt = make_inputs(5, 9, 2, seed=2, zero_fraction=0.5)
    bias = torch.randn(9, dtype=torch.float64)
    c = counts.to_sparse_csr()
    parts = (c.crow_indices().clone(), c.col_indices().clone(), c.values().clone())
    torch.library.opcheck(torch.ops.samsvae.nb_log_prob_fwd_grad.default,
                          (*parts, logits.clone(), lib, lt, bias))
    torch.library.opcheck(torch.ops.samsvae.nb_log_prob_dense_fwd_grad.default,
                          (counts, logits.clone(), lib, lt, None))


@needs_cpp
def test_bad_counts_raise():
    counts, logits, lib, lt = make_inputs(4, 7, 1, seed=1, zero_fraction=0.3)
    counts[0, 0] = -1.0
    with pytest.raises(RuntimeError, match="finite and non-negative"):
        torch.ops.samsvae.nb_log_prob_dense_fwd_grad(counts, logits.clone(), lib, lt)


@needs_cpp
def test_training_step_uses_the_gradient_from_the_forward(monkeypatch):
    """A model's ELBO weights every row alike: backward must not take the recompute path."""
    import numpy as np

    from samsvae.data import synth_batch
    from samsvae.models import build_model

    def refuse(*args, **kwargs):
        raise AssertionError("the training step took the recompute path")
    monkeypatch.setattr(nb_cpp, "_recompute_backward", refuse)
    batch = synth_batch(32, 50, 6, seed=0)
    model = build_model("sams_vae", "mean_field", n_genes=50, n_perturbations=6, n_latent=4,
                        n_hidden=16, perturbation_counts=np.full(6, 10.0))
    calls = []
    original = nb_cpp._HeadGradInForward.apply
    monkeypatch.setattr(nb_cpp._HeadGradInForward, "apply",
                        lambda *a: calls.append(1) or original(*a))
    with ops.use_backend("cpp"):
        model.loss(batch, particles=3)["loss"].backward()
    assert calls, "the training step did not use the C++ training head"
    assert model.decoder.out.weight.grad.abs().sum() > 0
    assert model.likelihood.log_theta.grad.abs().sum() > 0


@needs_cpp
def test_torch_compile_fullgraph_matches_eager():
    """Under torch.compile the head runs the forward and backward kernels (the gradient-in-
    forward Function branches on the upstream gradient, which a graph cannot hold)."""
    counts, leaves = head_inputs(10, 30, 2, seed=1)
    want = value_and_grads(cpp_head, counts, leaves, csr=False, weights="unequal")
    got = value_and_grads(torch.compile(cpp_head, fullgraph=True), counts, leaves, csr=False,
                          weights="unequal")
    _close(got, want, 1e-10)
