"""Sparse masked embedding composition with sampling of only the perturbations in a batch.

For a minibatch with CSR dosage ``d`` (cells x T) the perturbation latent of particle k is

    z_p[k, i] = sum_{t in perts(i)} d_it * (e_kt * m_kt),
    e_kt = loc_t + exp(log_scale_t) * eps_kt                 eps ~ N(0, 1)
    m_kt = hard_kt + soft_kt - stop_grad(soft_kt)            (straight-through)
    soft_kt = sigmoid((mask_logit_t + logistic_noise_kt) / temperature),  hard = 1[soft > 1/2]

Only the U perturbations present in the batch (``index``, sorted unique column ids of the
dosage) are sampled: tensors are (particles, U, latent), never (particles, T, latent), and the
dense cells x T dosage matrix is never built.

All backends draw their noise identically (``torch.randn`` / ``torch.rand`` on the given
generator, shapes (P, U, L)) so that backends agree exactly for the same generator state.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import backends

_UNIFORM_EPS = 1e-6


class EmbeddingSample(NamedTuple):
    """What :func:`masked_embedding_sum` returns.

    z_p:       (particles, cells, latent)  perturbation latent of each cell.
    index:     (U,) long                   perturbation ids present in the batch, sorted.
    embedding: (particles, U, latent)      sampled e for those perturbations.
    mask:      (particles, U, latent)      hard {0,1} mask values carrying the straight-through
                                           gradient to the mask logits; None when unmasked.
    """
    z_p: torch.Tensor
    index: torch.Tensor
    embedding: torch.Tensor
    mask: Optional[torch.Tensor]


def batch_perturbations(dosage: torch.Tensor):
    """Return ``(index, local_col, rows, values)`` of a CSR dosage batch.

    index: (U,) sorted unique perturbation ids; local_col: (nnz,) position of each entry's column
    in ``index``; rows: (nnz,) row of each entry; values: (nnz,) dosages.
    """
    if dosage.layout != torch.sparse_csr:
        raise ValueError(f"dosage must be a torch.sparse_csr tensor (cells x perturbations), "
                         f"got layout {dosage.layout}")
    crow, col, val = dosage.crow_indices(), dosage.col_indices(), dosage.values()
    index, local_col = torch.unique(col, sorted=True, return_inverse=True)
    rows = torch.repeat_interleave(torch.arange(crow.numel() - 1, device=crow.device),
                                   crow[1:] - crow[:-1])
    return index, local_col, rows, val


def draw_noise(particles: int, n: int, latent: int, *, dtype, device, generator=None,
               masked: bool = True):
    """Standard normal ``eps`` and uniform ``u`` (clamped away from 0 and 1), each (P, n, L)."""
    eps = torch.randn(particles, n, latent, dtype=dtype, device=device, generator=generator)
    u = None
    if masked:
        u = torch.rand(particles, n, latent, dtype=dtype, device=device, generator=generator)
        u = u.clamp(_UNIFORM_EPS, 1.0 - _UNIFORM_EPS)
    return eps, u


def relaxed_bernoulli_st(logits: torch.Tensor, u: torch.Tensor, temperature: float) -> torch.Tensor:
    """Straight-through Gumbel-sigmoid sample: hard {0,1} forward, relaxed gradient backward."""
    logistic = torch.log(u) - torch.log1p(-u)
    soft = torch.sigmoid((logits + logistic) / temperature)
    hard = (soft > 0.5).to(soft.dtype)
    return hard + (soft - soft.detach())


def perturbation_sum(dosage: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """z[k, i] = sum_{t} d_it * values[k, pos(t)]  for a CSR dosage batch.

    dosage: (cells, T) CSR; index: (U,) sorted ids of the columns ``values`` holds;
    values: (P, U, L). Returns (P, cells, L). Rows without perturbations give zeros.
    """
    _, _, rows, val = batch_perturbations(dosage)
    local_col = torch.searchsorted(index, dosage.col_indices())
    contrib = values[:, local_col, :] * val.to(values.dtype)[None, :, None]
    out = values.new_zeros(values.shape[0], dosage.shape[0], values.shape[-1])
    return out.index_add(1, rows, contrib)


def masked_embedding_sum_reference(dosage, emb_loc, emb_log_scale, mask_logits, *, particles,
                                   temperature=1.0, generator=None, noise=None):
    index, local_col, rows, val = batch_perturbations(dosage)
    dtype, device = emb_loc.dtype, emb_loc.device
    latent = emb_loc.shape[-1]
    if noise is None:
        noise = draw_noise(particles, index.numel(), latent, dtype=dtype, device=device,
                           generator=generator, masked=mask_logits is not None)
    eps, u = noise
    loc = emb_loc[index]
    if emb_log_scale is None:
        emb = loc.unsqueeze(0).expand(particles, -1, -1)
    else:
        emb = loc + emb_log_scale[index].exp() * eps
    mask = None
    values = emb
    if mask_logits is not None:
        mask = relaxed_bernoulli_st(mask_logits[index], u, temperature)
        values = emb * mask
    contrib = values[:, local_col, :] * val.to(dtype)[None, :, None]
    z_p = values.new_zeros(particles, dosage.shape[0], latent).index_add(1, rows, contrib)
    return EmbeddingSample(z_p, index, emb, mask)


def masked_embedding_sum(dosage, emb_loc, emb_log_scale, mask_logits, *, particles,
                         temperature=1.0, generator=None, backend="auto"):
    """Sample embeddings and masks for the batch's perturbations and compose them per cell.

    Args:
        dosage: ``(cells, T)`` ``torch.sparse_csr`` dosage matrix of the batch (real values ok).
        emb_loc: ``(T, latent)`` guide mean of the perturbation embeddings.
        emb_log_scale: ``(T, latent)`` guide log standard deviation, or None for a point value.
        mask_logits: ``(T, latent)`` guide logits of the Bernoulli masks, or None for masks
            fixed to one (CPA-VAE).
        particles: number of samples P.
        temperature: Gumbel-sigmoid relaxation temperature.
        generator: optional ``torch.Generator`` for the noise.

    Returns:
        :class:`EmbeddingSample` ``(z_p (P, cells, L), index (U,), embedding (P, U, L),
        mask (P, U, L) or None)``. Gradients flow to ``emb_loc``, ``emb_log_scale`` and
        ``mask_logits`` through every output.
    """
    if emb_loc.dim() != 2:
        raise ValueError(f"emb_loc must be (perturbations, latent), got {tuple(emb_loc.shape)}")
    if dosage.dim() != 2 or dosage.shape[1] != emb_loc.shape[0]:
        raise ValueError(f"dosage must be (cells, {emb_loc.shape[0]}) to match emb_loc, "
                         f"got {tuple(dosage.shape)}")
    for name, t in (("emb_log_scale", emb_log_scale), ("mask_logits", mask_logits)):
        if t is not None and t.shape != emb_loc.shape:
            raise ValueError(f"{name} must have the shape of emb_loc {tuple(emb_loc.shape)}, "
                             f"got {tuple(t.shape)}")
    if particles < 1:
        raise ValueError(f"particles must be >= 1, got {particles}")
    _, fn = backends.resolve("masked_embedding_sum", backend, emb_loc.device)
    return fn(dosage, emb_loc, emb_log_scale, mask_logits, particles=particles,
              temperature=temperature, generator=generator)


backends.register("masked_embedding_sum", "reference", masked_embedding_sum_reference)
