"""Negative binomial likelihood head with a learned per-gene inverse dispersion.

:class:`NBLikelihood` is the observation model of every samsvae model and a drop-in head for any
PyTorch VAE on count data (scVI-style decoders): give it the counts, the decoder's logits (or
its last hidden layer and Linear weights) and the log library sizes; it returns per-cell
log-likelihoods computed by the fused kernels of :mod:`samsvae.ops` (C++ on CPU, Triton on GPU,
pure PyTorch otherwise)::

    import torch
    from torch import nn
    from samsvae.nn import NBLikelihood

    n_genes, n_hidden = 2000, 128
    decoder = nn.Sequential(nn.Linear(10, n_hidden), nn.ReLU())
    to_logits = nn.Linear(n_hidden, n_genes)
    head = NBLikelihood(n_genes)

    counts = batch_counts                              # (cells, genes) dense or torch.sparse_csr
    log_library = torch.log(library_sizes)             # (cells,)
    z = encoder_sample                                 # (particles, cells, 10) or (cells, 10)
    hidden = decoder(z)
    log_px = head(counts, to_logits(hidden), log_library)          # (particles, cells) nats
    # same value without storing the (particles, cells, genes) logits:
    log_px = head.forward_linear(counts, hidden, to_logits.weight, to_logits.bias, log_library)
    loss = -(log_px - kl).mean()

The mean of gene g in cell i is ``library_i * softmax(logits_i)_g`` (the decoder predicts
expression proportions) and the variance ``mu + mu^2 / theta_g``. See
``examples/plain_vae_nb_head.py`` for a complete VAE trained with it.
"""
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
        init_log_theta: initial value of ``log_theta``.

    The kernel backend is chosen per call (``backend=`` of :meth:`forward`, or
    ``samsvae.ops.use_backend``), never stored in the module.
    """

    def __init__(self, n_genes: int, *, init_log_theta: float = 0.0):
        super().__init__()
        if int(n_genes) != n_genes or n_genes < 1:
            raise ValueError(f"n_genes must be a positive integer, got {n_genes!r}")
        self.n_genes = int(n_genes)
        self.log_theta = nn.Parameter(torch.full((self.n_genes,), float(init_log_theta)))

    def _check_genes(self, counts: torch.Tensor) -> None:
        if counts.dim() != 2 or counts.shape[1] != self.n_genes:
            raise ValueError(f"counts must be (cells, {self.n_genes}) for this NBLikelihood("
                             f"n_genes={self.n_genes}); got {tuple(counts.shape)}. Build the head "
                             "with the number of genes of the count matrix")

    def forward(self, counts: torch.Tensor, logits: torch.Tensor, log_library: torch.Tensor,
                logit_bias: torch.Tensor = None, *, backend: str = "auto") -> torch.Tensor:
        """counts (cells, G) dense/CSR; logits (cells, G) or (P, cells, G); log_library (cells,);
        logit_bias (G,) optional, added to every logits row (pass the decoder's last bias here
        and run that Linear without it: the C++ kernel fuses the addition and its gradient).
        ``backend``: as :func:`samsvae.ops.nb_log_prob`.
        Returns ``logits.shape[:-1]`` log-likelihoods (nats, summed over genes)."""
        self._check_genes(counts)
        return ops.nb_log_prob(counts, logits, log_library, self.log_theta.to(logits.dtype),
                               logit_bias=logit_bias, backend=backend)

    def forward_linear(self, counts, hidden, weight, bias, log_library, *,
                       recompute=True, backend: str = "auto"):
        """Fused last decoder layer + NB, ``logits = hidden @ weight.T + bias``.

        hidden (cells, H) or (P, cells, H); weight (G, H); bias (G,) or None. Returns
        ``hidden.shape[:-1]`` log-likelihoods (nats). ``recompute=True``: the logits are never
        stored (backward recomputes them chunk by chunk; for evaluation and large P).
        ``recompute=False``: one (P, cells, G) tensor is kept for backward (training; see
        :func:`samsvae.ops.nb_log_prob_linear`)."""
        self._check_genes(counts)
        return ops.nb_log_prob_linear(counts, hidden, weight, bias, log_library,
                                      self.log_theta.to(hidden.dtype), backend=backend,
                                      recompute=recompute)

    @property
    def theta(self) -> torch.Tensor:
        """(G,) inverse dispersion ``exp(log_theta)`` (detached)."""
        return self.log_theta.detach().exp()

    def extra_repr(self) -> str:
        return f"n_genes={self.n_genes}"
