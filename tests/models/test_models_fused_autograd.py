"""The fused global log-ratio equals the elementwise expression it replaces (float64)."""
import pytest
import torch

from samsvae.models.distributions import (HALF_LOG_2PI, bernoulli_log_prob,
                                          bernoulli_log_prob_const, normal_log_prob)
from samsvae.models.fused_autograd import global_log_ratio

P, U, L = 3, 7, 5


def expression(emb, loc, log_scale, mask, logits, prior_scale, prior_prob):
    z = (emb - loc) * torch.exp(-log_scale)
    log_q_e = -0.5 * z * z - log_scale - HALF_LOG_2PI
    ratio = (normal_log_prob(emb, 0.0, prior_scale) - log_q_e).sum(-1)
    if mask is not None:
        ratio = (ratio + bernoulli_log_prob_const(mask, prior_prob).sum(-1)
                 - bernoulli_log_prob(mask, logits).sum(-1))
    return ratio


def _inputs(param_shape, masked, seed):
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=f64) * scale).requires_grad_()

    emb, loc, log_scale = randn(P, U, L), randn(*param_shape), randn(*param_shape, scale=0.5)
    mask = logits = None
    if masked:
        mask = (torch.rand(P, U, L, generator=g, dtype=f64) > 0.5).to(f64).requires_grad_()
        logits = randn(*param_shape, scale=3.0)
    return emb, loc, log_scale, mask, logits


@pytest.mark.parametrize("param_shape", [(U, L), (P, U, L)], ids=["mean_field", "per_particle"])
@pytest.mark.parametrize("masked", [True, False], ids=["masked", "unmasked"])
@pytest.mark.parametrize("prior", [(1.0, 0.01), (2.5, 0.3)])
def test_value_and_gradients_match_the_expression(param_shape, masked, prior):
    inputs = _inputs(param_shape, masked, seed=len(param_shape) + masked)
    leaves = [t for t in inputs if t is not None]
    w = torch.linspace(-1.0, 2.0, P * U, dtype=torch.float64).reshape(P, U)
    want = expression(*inputs, *prior)
    got = global_log_ratio(*inputs, *prior)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g_want = torch.autograd.grad((want * w).sum(), leaves)
    g_got = torch.autograd.grad((got * w).sum(), leaves)
    for a, b in zip(g_got, g_want):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_gradcheck():
    inputs = _inputs((U, L), True, seed=3)
    assert torch.autograd.gradcheck(lambda *t: global_log_ratio(*t, 1.3, 0.02), inputs)


def test_only_requested_gradients_are_computed():
    emb, loc, log_scale, mask, logits = _inputs((U, L), True, seed=4)
    mask = mask.detach()
    (g_loc,) = torch.autograd.grad(global_log_ratio(emb, loc, log_scale, mask, logits, 1.0,
                                                    0.01).sum(), (loc,))
    assert g_loc.shape == loc.shape and torch.isfinite(g_loc).all()


@pytest.mark.parametrize("param_shape", [(4, 6), (3, 4, 6)], ids=["shared", "per_particle"])
def test_diag_gaussian_sample_kl_matches_the_expression(param_shape):
    from samsvae.models.distributions import GaussianPosterior
    g = torch.Generator().manual_seed(7)
    f64 = torch.float64
    loc = torch.randn(*param_shape, generator=g, dtype=f64).requires_grad_()
    scale = (torch.rand(*param_shape, generator=g, dtype=f64) + 0.1).requires_grad_()
    eps = torch.randn(3, 4, 6, generator=g, dtype=f64)
    q = GaussianPosterior(loc, scale)
    w_z = torch.randn(3, 4, 6, generator=g, dtype=f64)
    w_k = torch.randn(param_shape[:-1], generator=g, dtype=f64)
    z1, kl1 = q.sample(eps), q.kl_normal()
    z2, kl2 = q.sample_and_kl(eps)
    torch.testing.assert_close(z2, z1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kl2, kl1, rtol=1e-12, atol=1e-12)
    g1 = torch.autograd.grad((z1 * w_z).sum() + (kl1 * w_k).sum(), (loc, scale))
    g2 = torch.autograd.grad((z2 * w_z).sum() + (kl2 * w_k).sum(), (loc, scale))
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    (g_kl_only,) = torch.autograd.grad(q.sample_and_kl(eps)[1].sum(), (scale,))
    torch.testing.assert_close(g_kl_only, scale.detach() - 1.0 / scale.detach())


def test_diag_gaussian_sample_kl_gradcheck():
    from samsvae.models.fused_autograd import diag_gaussian_sample_kl
    g = torch.Generator().manual_seed(8)
    loc = torch.randn(4, 3, generator=g, dtype=torch.float64).requires_grad_()
    scale = (torch.rand(4, 3, generator=g, dtype=torch.float64) + 0.2).requires_grad_()
    eps = torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: diag_gaussian_sample_kl(a, b, eps), (loc, scale))
