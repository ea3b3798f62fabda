"""Negative binomial likelihood head with a learned per-gene inverse dispersion."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops


class NBLikelihood(nn.Module):
    """NB observation model ``x_ig ~ NB(mean = l_i softmax(logits_i)_g, theta_g)``.

    Holds ``log_theta`` (genes,), the log inverse dispersion, and computes per-row
    log-likelihoods through :func:`samsvae.ops.nb_log_prob` (fused kernels where available).

    Args:
        n_genes: number of genes G.
        backend: ``"auto"`` | ``"reference"`` | ``"cpp"`` | ``"triton"``.
        init_log_theta: initial value of ``log_theta``.
    """

    def __init__(self, n_genes: int, *, backend: str = "auto", init_log_theta: float = 0.0):
        super().__init__()
        self.n_genes = n_genes
        self.backend = backend
        self.log_theta = nn.Parameter(torch.full((n_genes,), float(init_log_theta)))

    def forward(self, counts: torch.Tensor, logits: torch.Tensor, log_library: torch.Tensor) -> torch.Tensor:
        """counts (cells, G) dense/CSR; logits (cells, G) or (P, cells, G); log_library (cells,).
        Returns ``logits.shape[:-1]`` log-likelihoods (nats, summed over genes)."""
        return ops.nb_log_prob(counts, logits, log_library, self.log_theta, backend=self.backend)

    def forward_linear(self, counts, hidden, weight, bias, log_library):
        """Fused last decoder layer + NB: ``logits = hidden @ weight.T + bias`` is never stored.

        hidden (cells, H) or (P, cells, H); weight (G, H); bias (G,) or None."""
        return ops.nb_log_prob_linear(counts, hidden, weight, bias, log_library, self.log_theta,
                                      backend=self.backend)

    def extra_repr(self) -> str:
        return f"n_genes={self.n_genes}, backend={self.backend!r}"
