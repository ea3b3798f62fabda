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
