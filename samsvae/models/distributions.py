"""Elementwise log densities and KL terms used by the models (nats, no reduction)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .fused_autograd import diag_gaussian_sample_kl

HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def normal_log_prob(x: torch.Tensor, loc, scale) -> torch.Tensor:
    """log N(x | loc, scale^2), elementwise."""
    z = (x - loc) / scale
    log_scale = torch.log(scale) if torch.is_tensor(scale) else math.log(scale)
    return -0.5 * z * z - log_scale - HALF_LOG_2PI


def std_normal_log_prob(x: torch.Tensor) -> torch.Tensor:
    """log N(x | 0, 1), elementwise."""
    return -0.5 * x * x - HALF_LOG_2PI


def kl_normal(loc: torch.Tensor, scale: torch.Tensor, prior_loc=0.0) -> torch.Tensor:
    """KL(N(loc, scale^2) || N(prior_loc, 1)), elementwise."""
    d = loc - prior_loc
    return 0.5 * (scale * scale + d * d - 1.0) - torch.log(scale)


def bernoulli_log_prob(value: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """log Bernoulli(value | sigmoid(logits)) for value in {0, 1} (gradients flow to both)."""
    return value * F.logsigmoid(logits) + (1.0 - value) * F.logsigmoid(-logits)


def bernoulli_log_prob_const(value: torch.Tensor, prob: float) -> torch.Tensor:
    """log Bernoulli(value | prob) for a fixed prior probability."""
    return value * math.log(prob) + (1.0 - value) * math.log1p(-prob)


class GaussianPosterior:
    """A Gaussian guide over the local latent: diagonal (``scale``, (..., L)) or full
    covariance (``scale_tril``, (..., L, L) lower-triangular with positive diagonal).

    All methods broadcast over leading (particle, cell) dimensions; results are summed over
    the latent dimension.
    """

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor = None,
                 scale_tril: torch.Tensor = None):
        if (scale is None) == (scale_tril is None):
            raise ValueError("give exactly one of scale (diagonal) and scale_tril (full)")
        self.loc, self.scale, self.scale_tril = loc, scale, scale_tril

    @property
    def full(self) -> bool:
        return self.scale_tril is not None

    def shifted(self, delta: torch.Tensor) -> "GaussianPosterior":
        """The same distribution moved by ``delta``."""
        return GaussianPosterior(self.loc + delta, self.scale, self.scale_tril)

    def sample(self, eps: torch.Tensor) -> torch.Tensor:
        """loc + scale * eps (diagonal) or loc + scale_tril @ eps (full); eps (..., L)."""
        if not self.full:
            return self.loc + self.scale * eps
        return self.loc + torch.matmul(self.scale_tril, eps.unsqueeze(-1)).squeeze(-1)

    def _log_diag(self) -> torch.Tensor:
        if not self.full:
            return torch.log(self.scale)
        return torch.log(torch.diagonal(self.scale_tril, dim1=-2, dim2=-1))

    def sample_and_kl(self, eps: torch.Tensor):
        """``(sample(eps), kl_normal())`` in one pass; the diagonal case is a single fused
        autograd node (``samsvae.models.fused_autograd.diag_gaussian_sample_kl``)."""
        if self.full:
            return self.sample(eps), self.kl_normal()
        return diag_gaussian_sample_kl(self.loc, self.scale, eps)

    def log_prob_of_sample(self, eps: torch.Tensor) -> torch.Tensor:
        """log q(z) of the sample ``z = sample(eps)`` (uses eps, no triangular solve)."""
        return (-0.5 * eps * eps - HALF_LOG_2PI).sum(-1) - self._log_diag().sum(-1)

    def kl_normal(self, prior_loc=0.0) -> torch.Tensor:
        """KL(q || N(prior_loc, I)), summed over the latent dimension."""
        d = self.loc - prior_loc
        if not self.full:
            return kl_normal(self.loc, self.scale, prior_loc).sum(-1)
        trace = (self.scale_tril * self.scale_tril).sum((-2, -1))
        return 0.5 * (trace + (d * d).sum(-1) - d.shape[-1]) - self._log_diag().sum(-1)


# Poisson rates up to this are summed exactly over k = 0..POISSON_TERMS (tail < 1e-12); larger
# ones use the second-order expansion of log2(1 + c x) around the rate (error ~1e-3 log2 units)
POISSON_EXACT_MAX = 40.0
POISSON_TERMS = 96
LN2 = math.log(2.0)


def nb_poisson_rate(mu: torch.Tensor, log_theta: torch.Tensor) -> torch.Tensor:
    """The Gamma half of x ~ NB(mean mu, inverse dispersion theta) = Poisson(mu * g), g ~
    Gamma(theta, 1) / theta: the drawn Poisson rates (mu's shape; log_theta (G,)), from the
    global RNG."""
    theta = log_theta.exp().to(mu.dtype)
    return mu * (torch._standard_gamma(theta.expand_as(mu)) / theta)


def expected_log2_normalized(mu: torch.Tensor, log_theta: torch.Tensor,
                             scale: torch.Tensor) -> torch.Tensor:
    """E[log2(1 + scale * x)] for x ~ NB(mean mu, inverse dispersion theta), the Poisson part
    of the NB (Gamma-Poisson) mixture integrated exactly.

    NB(mu, theta) is Poisson(mu * g) with g ~ Gamma(theta, 1) / theta. g is drawn (one per
    entry, from the global RNG, like a sampled count), and the expectation over the Poisson
    count given its rate is summed over the pmf instead of drawn: the Monte Carlo mean over
    cells then carries no Poisson noise (the largest part of a simulated cell's noise at
    ~100 UMIs), and conditions drawn from the same random stream share g, so differences
    between them (treatment effects) are nearly free of sampling noise.

    Args:
        mu: (..., G) NB means (counts); log_theta: (G,); scale: broadcastable to mu, the
            normalisation factor (1e4 / library).
    Returns:
        (..., G) in log2 units.
    """
    lam = nb_poisson_rate(mu, log_theta)
    exact = lam <= POISSON_EXACT_MAX
    rate = torch.where(exact, lam, torch.zeros_like(lam))
    # fewer terms when every rate is small; reading the largest rate is a host sync, so on an
    # accelerator the sum always runs its POISSON_TERMS (the bound for rates up to the maximum)
    if rate.device.type != "cpu":
        top = POISSON_EXACT_MAX
    else:
        top = float(rate.max()) if rate.numel() else 0.0
    terms = min(POISSON_TERMS, int(math.ceil(top + 10.0 * math.sqrt(top) + 10.0)))
    pmf = torch.exp(-rate)
    total = torch.zeros_like(rate)
    for k in range(1, terms + 1):
        pmf = pmf * rate / k
        total = total + pmf * torch.log2(1.0 + scale * k)
    c = 1.0 + scale * lam
    expansion = torch.log2(c) - 0.5 * lam * scale * scale / (c * c * LN2)
    return torch.where(exact, total, expansion)
