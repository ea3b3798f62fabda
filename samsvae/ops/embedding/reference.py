"""The ``reference`` tier of :func:`samsvae.ops.masked_embedding_sum` (pure PyTorch: the spec)
and the pieces every tier shares (batch perturbation ids, noise, the returned tuple).

Sparse masked embedding composition with sampling of only the perturbations in a batch.

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

from ..csr import csr_rows

# uniform noise is clamped to [UNIFORM_EPS, 1 - UNIFORM_EPS] so its logit stays finite
UNIFORM_EPS = 1e-6


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


def batch_perturbations(dosage: torch.Tensor, index: Optional[torch.Tensor] = None):
    """Return ``(index, local_col, rows, values)`` of a CSR dosage batch.

    index: (U,) sorted unique perturbation ids; local_col: (nnz,) position of each entry's column
    in ``index``; rows: (nnz,) row of each entry; values: (nnz,) dosages.

    ``index`` may be given when it is known (``samsvae.data.Batch.perturbations``, computed on
    the host when the batch is built): the ids are then only looked up (``searchsorted``), with
    no ``torch.unique``, whose data-dependent output size costs a device-to-host
    synchronisation on a GPU. It must hold every column id of ``dosage``, sorted.
    """
    if dosage.layout != torch.sparse_csr:
        raise ValueError(f"dosage must be a torch.sparse_csr tensor (cells x perturbations), "
                         f"got layout {dosage.layout}")
    if index is None:
        index, local_col = torch.unique(dosage.col_indices(), sorted=True, return_inverse=True)
    else:
        index = index.to(device=dosage.col_indices().device, dtype=torch.int64)
        local_col = torch.searchsorted(index, dosage.col_indices().to(torch.int64))
    return index, local_col, csr_rows(dosage), dosage.values()


def draw_noise(particles: int, n: int, latent: int, *, dtype, device, generator=None,
               masked: bool = True):
    """Standard normal ``eps`` and uniform ``u`` (clamped away from 0 and 1), each (P, n, L)."""
    eps = torch.randn(particles, n, latent, dtype=dtype, device=device, generator=generator)
    u = None
    if masked:
        u = torch.rand(particles, n, latent, dtype=dtype, device=device, generator=generator)
        u = u.clamp(UNIFORM_EPS, 1.0 - UNIFORM_EPS)
    return eps, u


def relaxed_bernoulli_st(logits: torch.Tensor, u: torch.Tensor, temperature: float) -> torch.Tensor:
    """Straight-through Gumbel-sigmoid sample: hard {0,1} forward, relaxed gradient backward."""
    logistic = torch.log(u) - torch.log1p(-u)
    soft = torch.sigmoid((logits + logistic) / temperature)
    hard = (soft > 0.5).to(soft.dtype)
    return hard + (soft - soft.detach())


def perturbation_sum_reference(dosage: torch.Tensor, index: torch.Tensor,
                               values: torch.Tensor) -> torch.Tensor:
    """z[k, i] = sum_{t} d_it * values[k, pos(t)]  for a CSR dosage batch (the spec of
    :func:`samsvae.ops.perturbation_sum`).

    dosage: (cells, T) CSR; index: (U,) sorted ids of the columns ``values`` holds;
    values: (P, U, L). Returns (P, cells, L). Rows without perturbations give zeros.
    """
    _, local_col, rows, val = batch_perturbations(dosage, index)
    contrib = values[:, local_col, :] * val.to(values.dtype)[None, :, None]
    out = values.new_zeros(values.shape[0], dosage.shape[0], values.shape[-1])
    return out.index_add(1, rows, contrib)


def masked_embedding_sum_reference(dosage, emb_loc, emb_log_scale, mask_logits, *, particles,
                                   temperature=1.0, generator=None, noise=None, index=None):
    """Pure-PyTorch :func:`samsvae.ops.masked_embedding_sum` (the spec); ``noise`` optionally
    gives the ``(eps, u)`` of :func:`draw_noise` instead of drawing them; ``index`` the batch's
    sorted perturbation ids when known (see :func:`batch_perturbations`)."""
    index, local_col, rows, val = batch_perturbations(dosage, index)
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
