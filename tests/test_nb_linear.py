"""nb_log_prob_linear (fused last decoder layer + NB) against the unfused float64 computation."""
import pytest
import torch
import torch.nn.functional as F

from samsvae import ops
from samsvae.ops import BackendUnavailableError, backends, nb_log_prob, nb_log_prob_linear
from samsvae.ops import nb_linear

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

    monkeypatch.setattr(nb_linear.backends, "resolve", spy_resolve)
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


def test_registered_as_reference_op():
    name, fn = backends.resolve("nb_log_prob_linear", "reference", "cpu")
    assert name == "reference" and fn is nb_linear.nb_log_prob_linear_reference


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
