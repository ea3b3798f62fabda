"""The ``reference`` tier of :func:`samsvae.ops.nb_log_prob` (pure PyTorch: the spec) and the
input checks every tier relies on.

    nb_log_prob(counts, logits, log_library, log_theta)[..., i]
        = sum_g log NB(x_ig | mu_ig = exp(log_library_i) * softmax(logits_i)_g,
                              theta_g = exp(log_theta_g))

with NB parameterised by mean ``mu`` and inverse dispersion ``theta`` (variance mu + mu^2/theta).

The reference is written in the form the fast kernels use, because it is also the numerically
stable one (``s = log1p(mu/theta) = softplus(log mu - log theta)``)::

    log NB(x) = D(x, theta) - lgamma(x + 1) + x * (log mu - s) - theta * s
    D(x, theta) = lgamma(x + theta) - lgamma(theta) - x * log(theta)   (D(0, theta) = 0)

For x = 0 only ``-theta * s`` survives, so lgamma is needed on non-zero counts alone. In float64
``D`` is evaluated directly with lgamma (the judge); in lower precision, for theta >= 10 it uses
Stirling's series in log1p form, which avoids the ~1 nat per element that float32
``lgamma(x + theta) - lgamma(theta)`` loses at theta = 1e6.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..csr import csr_rows

_STIRLING_MIN_THETA = 10.0


def _stirling_correction(z: torch.Tensor) -> torch.Tensor:
    """lgamma(z) - [(z - 1/2) log z - z + log(2 pi)/2] for z >= 10 (error < 1e-11)."""
    r = 1.0 / z
    r2 = r * r
    return r * (1.0 / 12.0 - r2 * (1.0 / 360.0 - r2 * (1.0 / 1260.0)))


def lgamma_ratio(x: torch.Tensor, theta: torch.Tensor, log_theta: torch.Tensor) -> torch.Tensor:
    """D(x, theta) = lgamma(x + theta) - lgamma(theta) - x log(theta), elementwise.

    Exactly 0 at x = 0. Stable in float32 for theta in [1e-4, 1e6]; direct in float64.
    """
    direct = torch.lgamma(x + theta) - torch.lgamma(theta) - x * log_theta
    if x.dtype == torch.float64:
        return direct
    big = theta >= _STIRLING_MIN_THETA
    th = torch.where(big, theta, torch.full_like(theta, _STIRLING_MIN_THETA))
    # (th + x - 1/2) log1p(u) - x with u = x / th, written th * g(u) - log1p(u) / 2 where
    # g(u) = (1 + u) log1p(u) - u ~ u^2 / 2: the direct form's two O(u) terms cancel in value
    # AND in the gradient wrt theta (float32 lost 1e-3 relative at theta = 1e6); g's series
    # keeps every term O(u^2), so autograd's theta-gradient is accurate too
    u = x / th
    stirling = (th * _one_plus_u_log1p_minus_u(u) - 0.5 * torch.log1p(u)
                + _stirling_correction(th + x) - _stirling_correction(th))
    return torch.where(big, stirling, direct)


_G_SERIES_MAX_U = 0.1  # below: 10 series terms, error < u^12 / 132 (< 1e-7 relative to u^2/2)


def _one_plus_u_log1p_minus_u(u: torch.Tensor) -> torch.Tensor:
    """g(u) = (1 + u) log1p(u) - u for u >= 0, accurate to a few ulps in float32:
    the series sum_{k>=2} (-1)^k u^k / (k (k - 1)) below 0.1, the direct form above (where the
    cancellation costs at most ~20 ulps)."""
    small = u < _G_SERIES_MAX_U
    us = torch.where(small, u, torch.zeros_like(u))
    series = us * us * _g_horner(us)
    ud = torch.where(small, torch.ones_like(u), u)
    direct = (1.0 + ud) * torch.log1p(ud) - ud
    return torch.where(small, series, direct)


def _v_minus_log1p_v(v: torch.Tensor) -> torch.Tensor:
    """v - log1p(v) for v >= 0, accurate in float32: sum_{k>=2} (-1)^k v^k / k below 0.1."""
    small = v < _G_SERIES_MAX_U
    vs = torch.where(small, v, torch.zeros_like(v))
    acc = torch.zeros_like(vs)
    for k in range(11, 1, -1):
        acc = acc * vs + ((-1.0) ** k) / k
    vd = torch.where(small, torch.ones_like(v), v)
    return torch.where(small, vs * vs * acc, vd - torch.log1p(vd))


def _g_horner(u: torch.Tensor) -> torch.Tensor:
    """sum_{k=2}^{11} (-1)^k u^(k-2) / (k (k - 1)) by Horner's rule."""
    acc = torch.zeros_like(u)
    for k in range(11, 1, -1):
        acc = acc * u + ((-1.0) ** k) / (k * (k - 1))
    return acc


def nb_log_prob_reference(counts, logits, log_library, log_theta, logit_bias=None):
    """Pure-PyTorch NB log-likelihood (the spec); shapes and units as
    :func:`samsvae.ops.nb_log_prob`. Differentiable to any order."""
    if logit_bias is not None:
        logits = logits + logit_bias.to(logits.dtype)
    dtype = logits.dtype
    log_theta = log_theta.to(dtype)
    theta = log_theta.exp()
    log_mu = log_library.to(dtype).unsqueeze(-1) + torch.log_softmax(logits, dim=-1)
    s = F.softplus(log_mu - log_theta)                        # log1p(mu / theta)
    zero_part = -(theta * s).sum(-1)                          # the x = 0 term of every gene
    if dtype != torch.float64:
        # the same value as -mu + theta (v - log1p(v)), v = mu / theta, whose theta-gradient
        # has no O(v) terms to cancel (float32 -theta * s loses 1e-3 of it at theta = 1e6)
        # (where v < 1; above, the direct form has no such cancellation and stays exact)
        mu = log_mu.exp()
        v = mu / theta
        near = v < 1.0
        zero_el = torch.where(near, theta * _v_minus_log1p_v(torch.where(near, v, 0.0)) - mu,
                              -(theta * s))
        zero_part = zero_el.sum(-1)
    if counts.layout == torch.sparse_csr:
        rows, col, x = csr_rows(counts), counts.col_indices(), counts.values().to(dtype)
        lt, th = log_theta[col], theta[col]
        term = (lgamma_ratio(x, th, lt) - torch.lgamma(x + 1.0)
                + x * (log_mu[..., rows, col] - s[..., rows, col]))
        nz_part = torch.zeros_like(zero_part).index_add(-1, rows, term)
    else:
        x = counts.to(dtype)
        term = (lgamma_ratio(x, theta, log_theta) - torch.lgamma(x + 1.0) + x * (log_mu - s))
        nz_part = term.sum(-1)
    return zero_part + nz_part


def check_nb_inputs(counts, logits, log_library, log_theta, logit_bias=None) -> None:
    """Raise ValueError / TypeError naming the argument whose shape, dtype or layout is wrong."""
    if counts.dim() != 2:
        raise ValueError(f"counts must be (cells, genes), got shape {tuple(counts.shape)}")
    cells, genes = counts.shape
    if logits.dim() not in (2, 3) or tuple(logits.shape[-2:]) != (cells, genes):
        raise ValueError(f"logits must be (cells, genes) or (particles, cells, genes) with "
                         f"cells={cells}, genes={genes}; got {tuple(logits.shape)}")
    if tuple(log_library.shape) != (cells,):
        raise ValueError(f"log_library must be ({cells},), got {tuple(log_library.shape)}")
    if tuple(log_theta.shape) != (genes,):
        raise ValueError(f"log_theta must be ({genes},), got {tuple(log_theta.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if logit_bias is not None and tuple(logit_bias.shape) != (genes,):
        raise ValueError(f"logit_bias must be ({genes},) (one bias per gene, added to every "
                         f"logits row), got {tuple(logit_bias.shape)}")
    if counts.layout not in (torch.strided, torch.sparse_csr):
        raise ValueError(f"counts must be dense or torch.sparse_csr, got layout {counts.layout}")
