"""Elementwise terms of the SAMS-VAE objective fused into single autograd nodes.

``global_log_ratio``: the global log-ratio of a particle (one node instead of ~25);
``diag_gaussian_sample_kl``: a reparameterised sample of a diagonal Gaussian guide and its KL
to N(0, I) (one node instead of ~12).

Global log-ratio.

For each particle p, perturbation u of the batch and latent dimension l, with the guide's
embedding sample e ~ N(loc, exp(log_scale)^2), its mask sample m in {0, 1} drawn with logits a,
the prior N(0, s^2) on e and Bernoulli(alpha) on m::

    ratio[p, u] = sum_l  log N(e | 0, s^2) - log N(e | loc, exp(log_scale)^2)
                       + log Bern(m | alpha) - log Bern(m | sigmoid(a))

(nats). Written out, with z = (e - loc) exp(-log_scale):

    log N(e | 0, s^2) - log N(e | loc, sd^2) = -e^2 / (2 s^2) + z^2 / 2 + log_scale - log s
    log Bern(m | alpha) - log Bern(m | sigmoid(a)) = m log(alpha / (1 - alpha)) + log(1 - alpha)
                                                     + softplus(a) - m a

and the gradients in closed form::

    d/de = -e / s^2 + z exp(-log_scale)    d/dloc = -z exp(-log_scale)    d/dlog_scale = 1 - z^2
    d/dm = log(alpha / (1 - alpha)) - a    d/da = sigmoid(a) - m

The autograd graph of the elementwise expression holds ~25 nodes over (P, U, L) tensors, each a
full pass over memory in forward and backward; this is a handful of passes. Inputs broadcast
(loc, log_scale, a may be (U, L) or (P, U, L)); their gradients are reduced back to their
shapes. Same value and gradients as the expression (tested in float64).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def _reduce_to(grad: torch.Tensor, shape) -> torch.Tensor:
    """Sum a broadcast gradient back to ``shape`` (leading dimensions only)."""
    while grad.dim() > len(shape):
        grad = grad.sum(0)
    return grad


class _GlobalLogRatio(torch.autograd.Function):
    @staticmethod
    def forward(ctx, emb, loc, log_scale, mask, mask_logits, prior_scale, prior_prob):
        inv_sd = torch.exp(-log_scale)
        z = (emb - loc) * inv_sd
        inv_var_p = 1.0 / (prior_scale * prior_scale)
        # per element: -e^2 / (2 s^2) + z^2 / 2 + log_scale; the constant -L log s after the sum
        elem = torch.addcmul(log_scale + 0.5 * z * z, emb, emb, value=-0.5 * inv_var_p)
        ratio = elem.sum(-1) - emb.shape[-1] * math.log(prior_scale)
        has_mask = mask is not None
        if has_mask:
            prior_logit = math.log(prior_prob) - math.log1p(-prior_prob)
            # m (logit(alpha) - a) + softplus(a), plus L log(1 - alpha) after the sum
            mterm = mask * (prior_logit - mask_logits) + F.softplus(mask_logits)
            ratio = ratio + mterm.sum(-1) + mask.shape[-1] * math.log1p(-prior_prob)
            ctx.prior_logit = prior_logit
            ctx.save_for_backward(emb, z, inv_sd, mask, mask_logits)
        else:
            ctx.save_for_backward(emb, z, inv_sd)
        ctx.has_mask = has_mask
        ctx.inv_var_p = inv_var_p
        ctx.shapes = (loc.shape, log_scale.shape,
                      mask_logits.shape if mask_logits is not None else None)
        return ratio

    @staticmethod
    def backward(ctx, grad_ratio):
        g = grad_ratio.unsqueeze(-1)
        if ctx.has_mask:
            emb, z, inv_sd, mask, mask_logits = ctx.saved_tensors
        else:
            emb, z, inv_sd = ctx.saved_tensors
        loc_shape, ls_shape, a_shape = ctx.shapes
        z_inv = z * inv_sd
        d_emb = d_loc = d_ls = d_mask = d_a = None
        if ctx.needs_input_grad[0]:
            d_emb = g * (z_inv - ctx.inv_var_p * emb)
        if ctx.needs_input_grad[1]:
            d_loc = _reduce_to(-g * z_inv, loc_shape)
        if ctx.needs_input_grad[2]:
            d_ls = _reduce_to(g * (1.0 - z * z), ls_shape)
        if ctx.has_mask:
            if ctx.needs_input_grad[3]:
                d_mask = g * (ctx.prior_logit - mask_logits)
            if ctx.needs_input_grad[4]:
                d_a = _reduce_to(g * (torch.sigmoid(mask_logits) - mask), a_shape)
        return d_emb, d_loc, d_ls, d_mask, d_a, None, None


def global_log_ratio(emb: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor,
                     mask: Optional[torch.Tensor], mask_logits: Optional[torch.Tensor],
                     prior_scale: float, prior_prob: float) -> torch.Tensor:
    """(P, U) ``log p(e) + log p(m) - log q(e | .) - log q(m)`` summed over latent (nats).

    emb, mask: (P, U, L) samples (mask None for unmasked models, then mask_logits is ignored);
    loc, log_scale: (U, L) or (P, U, L) guide parameters of e; mask_logits: (U, L) or (P, U, L)
    guide logits of m; prior_scale: s of N(0, s^2); prior_prob: alpha of Bernoulli(alpha).
    """
    if mask is None:
        mask_logits = None
    return _GlobalLogRatio.apply(emb, loc, log_scale, mask, mask_logits, float(prior_scale),
                                 float(prior_prob))


class _DiagGaussianSampleKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, loc, scale, eps):
        z = torch.addcmul(loc, scale, eps)
        kl = (0.5 * torch.addcmul(scale * scale, loc, loc) - 0.5 - torch.log(scale)).sum(-1)
        ctx.save_for_backward(loc, scale, eps)
        return z, kl

    @staticmethod
    def backward(ctx, grad_z, grad_kl):
        loc, scale, eps = ctx.saved_tensors
        d_loc = d_scale = None
        g = grad_kl.unsqueeze(-1) if grad_kl is not None else None
        if ctx.needs_input_grad[0]:
            d_loc = _reduce_to(grad_z, loc.shape) if grad_z is not None else torch.zeros_like(loc)
            if g is not None:
                d_loc = d_loc + g * loc
        if ctx.needs_input_grad[1]:
            d_scale = (_reduce_to(grad_z * eps, scale.shape) if grad_z is not None
                       else torch.zeros_like(scale))
            if g is not None:
                d_scale = d_scale + g * (scale - 1.0 / scale)
        return d_loc, d_scale, None


def diag_gaussian_sample_kl(loc: torch.Tensor, scale: torch.Tensor, eps: torch.Tensor):
    """``(loc + scale * eps, KL(N(loc, scale^2) || N(0, I)))`` with closed-form gradients.

    loc, scale: (..., L) guide mean and standard deviation (scale > 0); eps: standard normal
    noise broadcasting against them, e.g. (P, B, L) for (B, L) parameters. Returns z of the
    broadcast shape and the KL summed over L, of the parameters' shape without L (nats):
    ``0.5 (scale^2 + loc^2 - 1) - log(scale)``; gradients: dz/dloc = 1, dz/dscale = eps,
    dKL/dloc = loc, dKL/dscale = scale - 1/scale.
    """
    return _DiagGaussianSampleKL.apply(loc, scale, eps)
