"""The reference ops are the spec: check them against independent formulas in float64,
autograd.gradcheck, float32 stability at extreme theta, and the dispatcher's rules."""
import math

import pytest
import torch

from samsvae import ops
from samsvae.ops import backends
from samsvae.ops.masked_embedding import masked_embedding_sum_reference
from samsvae.ops.nb_log_prob import lgamma_ratio


def naive_nb(x, logits, log_library, log_theta):
    """Textbook NB log-pmf (float64 only: it is the unstable form)."""
    mu = log_library.exp().unsqueeze(-1) * logits.softmax(-1)
    th = log_theta.exp()
    return (torch.lgamma(x + th) - torch.lgamma(th) - torch.lgamma(x + 1)
            + th * (torch.log(th) - torch.log(th + mu)) + x * (torch.log(mu) - torch.log(th + mu))).sum(-1)


def random_inputs(cells=5, genes=9, particles=None, dtype=torch.float64, seed=0, zero_frac=0.6):
    g = torch.Generator().manual_seed(seed)
    x = torch.poisson(torch.rand(cells, genes, generator=g, dtype=torch.float64) * 8, generator=g)
    x[torch.rand(cells, genes, generator=g) < zero_frac] = 0
    shape = (cells, genes) if particles is None else (particles, cells, genes)
    logits = torch.randn(*shape, generator=g, dtype=dtype)
    log_library = (torch.rand(cells, generator=g, dtype=dtype) * 3 + 5)
    log_theta = torch.randn(genes, generator=g, dtype=dtype) * 2
    return x, logits, log_library, log_theta


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


def dosage_batch():
    # cell 0: one perturbation, cell 1: none, cell 2: five (real-valued dosages), cell 3: two
    dense = torch.zeros(4, 8, dtype=torch.float64)
    dense[0, 3] = 1
    dense[2, [0, 1, 3, 5, 7]] = torch.tensor([1.0, 0.5, 2.0, 1.0, 1.0], dtype=torch.float64)
    dense[3, [1, 6]] = 1
    return dense


@pytest.mark.parametrize("masked", [True, False])
def test_masked_embedding_reference_equals_dense_composition(masked):
    dense = dosage_batch()
    T, L, P = 8, 3, 2
    g = torch.Generator().manual_seed(1)
    loc, log_scale, mlog = (torch.randn(T, L, dtype=torch.float64, generator=g) for _ in range(3))
    out = masked_embedding_sum_reference(dense.to_sparse_csr(), loc, log_scale, mlog if masked else None,
                                         particles=P, generator=torch.Generator().manual_seed(5))
    assert out.index.tolist() == [0, 1, 3, 5, 6, 7]
    # redraw the same noise and compose densely over ALL perturbations
    eps, u = ops.draw_noise(P, 6, L, dtype=torch.float64, device="cpu",
                            generator=torch.Generator().manual_seed(5), masked=masked)
    E = torch.zeros(P, T, L, dtype=torch.float64)
    E[:, out.index] = loc[out.index] + log_scale[out.index].exp() * eps
    M = torch.ones(P, T, L, dtype=torch.float64)
    if masked:
        logistic = u.log() - (-u).log1p()
        M[:, out.index] = ((mlog[out.index] + logistic) > 0).double()
    expected = torch.einsum("ct,ptl->pcl", dense, E * M)
    torch.testing.assert_close(out.z_p, expected)
    assert (out.z_p[:, 1] == 0).all()          # the cell without perturbation
    torch.testing.assert_close(out.embedding, E[:, out.index])


def test_masked_embedding_reference_gradcheck_and_straight_through():
    dense = dosage_batch()
    T, L = 8, 2
    g = torch.Generator().manual_seed(2)
    loc, log_scale, mlog = (torch.randn(T, L, dtype=torch.float64, generator=g).requires_grad_(True)
                            for _ in range(3))

    def f(a, b, c):
        s = masked_embedding_sum_reference(dense.to_sparse_csr(), a, b, c, particles=2,
                                           generator=torch.Generator().manual_seed(0))
        return s.z_p, s.mask
    # exact derivatives in loc and log_scale (the hard mask is piecewise constant in the logits)
    assert torch.autograd.gradcheck(lambda a, b: f(a, b, mlog.detach())[0], (loc, log_scale))
    z, mask = f(loc, log_scale, mlog)
    assert set(mask.detach().unique().tolist()) <= {0.0, 1.0}
    z.sum().backward()
    untouched = [2, 4]   # perturbations that no cell in the batch carries get no gradient
    assert (loc.grad[untouched] == 0).all() and (mlog.grad[untouched] == 0).all()
    # straight-through: the logits' gradient is that of the relaxed (soft) sample
    P, index = 2, torch.tensor([0, 1, 3, 5, 6, 7])
    gen = torch.Generator().manual_seed(0)
    eps, u = ops.draw_noise(P, 6, L, dtype=torch.float64, device="cpu", generator=gen)
    c = mlog.detach().clone().requires_grad_(True)
    soft = torch.sigmoid(c[index] + u.log() - (-u).log1p())
    emb = (loc[index] + log_scale[index].exp() * eps).detach()
    weight = torch.einsum("ct->t", dense)[index]          # d z.sum() / d (e*m) per perturbation
    (soft * emb * weight[None, :, None]).sum().backward()
    torch.testing.assert_close(mlog.grad, c.grad)


def test_perturbation_sum_matches_dense():
    dense = dosage_batch()
    index = torch.tensor([0, 1, 3, 5, 6, 7])
    values = torch.randn(3, 6, 4, dtype=torch.float64)
    full = torch.zeros(3, 8, 4, dtype=torch.float64)
    full[:, index] = values
    torch.testing.assert_close(ops.perturbation_sum(dense.to_sparse_csr(), index, values),
                               torch.einsum("ct,ptl->pcl", dense, full))


@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
def test_iwelbo_streaming_equals_dense_logmeanexp(chunk):
    lw = torch.randn(23, 5, dtype=torch.float64) * 30
    lw[:, 2] = -torch.inf          # a column with zero weight everywhere
    got = ops.iwelbo(lambda s, n: lw[s:s + n], particles=23, chunk=chunk)
    expected = torch.logsumexp(lw, 0) - math.log(23)
    torch.testing.assert_close(got, expected)


def test_dispatcher_rules(monkeypatch):
    x, logits, ll, lt = random_inputs()
    with pytest.raises(ValueError, match="unknown backend"):
        ops.nb_log_prob(x, logits, ll, lt, backend="cuda-magic")
    if "triton" not in backends._REGISTRY.get("nb_log_prob", {}) or not torch.cuda.is_available():
        with pytest.raises(ops.BackendUnavailableError):
            ops.nb_log_prob(x, logits, ll, lt, backend="triton")
    monkeypatch.setenv("SAMSVAE_BACKEND", "reference")
    assert backends.resolve("nb_log_prob", "auto", "cpu")[0] == "reference"
    monkeypatch.setenv("SAMSVAE_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="SAMSVAE_BACKEND"):
        backends.resolve("nb_log_prob", "auto", "cpu")
    assert "reference" in ops.available_backends()


def test_bad_shapes_are_named():
    x, logits, ll, lt = random_inputs()
    with pytest.raises(ValueError, match="log_theta"):
        ops.nb_log_prob(x, logits, ll, lt[:-1])
    with pytest.raises(ValueError, match="logits"):
        ops.nb_log_prob(x, logits[:, :-1], ll, lt)
    with pytest.raises(ValueError, match="sparse_csr"):
        ops.masked_embedding_sum(dosage_batch(), torch.zeros(8, 2), None, None, particles=1)
