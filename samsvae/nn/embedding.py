"""Sparse masked perturbation embeddings as a module (the SAMS-VAE perturbation guide).

:class:`MaskedPerturbationEmbedding` holds, per perturbation t and latent dimension, the guide
parameters of the embedding ``q(e_t) = N(loc_t, exp(log_scale_t)^2)`` and of the mask
``q(m_t) = Bernoulli(sigmoid(mask_logits_t))``; its forward samples both for the perturbations
present in a minibatch only and composes each cell's perturbation latent
``z_p[k, i] = sum_t d_it * e_kt * m_kt`` through :func:`samsvae.ops.masked_embedding_sum`::

    emb = MaskedPerturbationEmbedding(n_perturbations=1000, n_latent=100)
    sample = emb(batch.dosage, particles=5)       # dosage: (cells, T) torch.sparse_csr
    z = z_basal + sample.z_p                      # (5, cells, 100)

``masked=False`` gives masks fixed to one (CPA-VAE), ``stochastic=False`` point embeddings.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .. import ops
from ..ops import EmbeddingSample


class MaskedPerturbationEmbedding(nn.Module):
    """Guide over perturbation embeddings and masks, sampled for the batch's perturbations.

    Args:
        n_perturbations: T, number of perturbations (columns of the dosage matrix).
        n_latent: L, latent dimensions.
        masked: learn Bernoulli mask logits (SAMS-VAE); False fixes masks to one.
        stochastic: learn a per-entry scale; False uses point embeddings ``e_t = loc_t``.
        temperature: Gumbel-sigmoid relaxation temperature of the mask samples.
        init_loc_std: standard deviation of the random initial ``loc``.
        init_scale: initial embedding standard deviation (``log_scale = log(init_scale)``).
        init_mask_prob: initial ``q(m = 1)`` of every mask entry.

    Parameters: ``loc`` (T, L); ``log_scale`` (T, L) when stochastic; ``mask_logits`` (T, L)
    when masked.
    """

    def __init__(self, n_perturbations: int, n_latent: int, *, masked: bool = True,
                 stochastic: bool = True, temperature: float = 1.0, init_loc_std: float = 0.1,
                 init_scale: float = 0.1, init_mask_prob: float = 0.5):
        super().__init__()
        for name, v in (("n_perturbations", n_perturbations), ("n_latent", n_latent)):
            if int(v) != v or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if not 0.0 < init_mask_prob < 1.0:
            raise ValueError(f"init_mask_prob must be in (0, 1), got {init_mask_prob!r}")
        if not init_scale > 0:
            raise ValueError(f"init_scale must be > 0, got {init_scale!r}")
        self.n_perturbations, self.n_latent = int(n_perturbations), int(n_latent)
        self.temperature = float(temperature)
        shape = (self.n_perturbations, self.n_latent)
        self.loc = nn.Parameter(torch.randn(shape) * init_loc_std)
        self.log_scale = (nn.Parameter(torch.full(shape, math.log(init_scale)))
                          if stochastic else None)
        self.mask_logits = (nn.Parameter(torch.full(shape, math.log(init_mask_prob)
                                                     - math.log1p(-init_mask_prob)))
                            if masked else None)

    @property
    def masked(self) -> bool:
        return self.mask_logits is not None

    def forward(self, dosage: torch.Tensor, particles: int = 1, *,
                temperature: Optional[float] = None,
                generator: Optional[torch.Generator] = None,
                backend: str = "auto") -> EmbeddingSample:
        """Sample embeddings/masks of the perturbations in ``dosage`` and compose them per cell.

        Args:
            dosage: ``(cells, T)`` ``torch.sparse_csr`` dosage of the batch.
            particles: number of samples P.
            temperature: overrides the module's relaxation temperature.
            generator: optional ``torch.Generator`` for the noise.
            backend: as :func:`samsvae.ops.masked_embedding_sum` (chosen per call).

        Returns:
            :class:`samsvae.ops.EmbeddingSample`: ``z_p`` (P, cells, L), ``index`` (U,),
            ``embedding`` (P, U, L), ``mask`` (P, U, L) or None.
        """
        if dosage.dim() != 2 or dosage.shape[1] != self.n_perturbations:
            raise ValueError(f"dosage must be (cells, {self.n_perturbations}) for this "
                             f"MaskedPerturbationEmbedding(n_perturbations={self.n_perturbations})"
                             f"; got {tuple(dosage.shape)}")
        return ops.masked_embedding_sum(
            dosage, self.loc, self.log_scale, self.mask_logits, particles=particles,
            temperature=self.temperature if temperature is None else float(temperature),
            generator=generator, backend=backend)

    def mask_probs(self) -> Optional[torch.Tensor]:
        """(T, L) guide probabilities ``q(m = 1)`` (detached), or None when unmasked."""
        return None if self.mask_logits is None else torch.sigmoid(self.mask_logits.detach())

    def extra_repr(self) -> str:
        return (f"n_perturbations={self.n_perturbations}, n_latent={self.n_latent}, "
                f"masked={self.masked}, stochastic={self.log_scale is not None}, "
                f"temperature={self.temperature}")
