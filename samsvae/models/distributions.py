"""Elementwise log densities and KL terms used by the models (nats, no reduction)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

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
