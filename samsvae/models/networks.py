"""The neural pieces shared by the models: the Gaussian cell encoder and the decoder body.

Both are written so the expensive parts run on sparse inputs and once per cell:

* the encoder's first layer is :func:`samsvae.ops.log1p_standardize_linear`: on the ``cpp``
  backend sparse batches never form the (B, G) standardised features (the cost is that of the
  non-zeros; denser batches use one dense product, which is faster there); extra inputs (a
  CSR dosage, a per-particle latent) enter as additional terms of the same pre-activation, so
  the gene part is computed once per cell even when the extra input has a particle dimension;
* the decoder stops at its hidden layer: the last Linear is applied by the model inside the
  fused NB likelihood (``NBLikelihood.forward_linear``) so the (particles, cells, genes) logits
  are never stored during training.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .distributions import GaussianPosterior

STD_FLOOR = 1e-6      # genes whose training log1p std is below this are not rescaled
SCALE_FLOOR = 1e-4    # minimum standard deviation of the Gaussian guides
LEAKY_SLOPE = 0.01


def _uniform_(t: torch.Tensor, fan_in: int) -> torch.Tensor:
    bound = 1.0 / math.sqrt(max(1, fan_in))
    with torch.no_grad():
        return t.uniform_(-bound, bound)


def sparse_rows_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight`` for x (rows, K) CSR or dense and weight (K, N): (rows, N)."""
    if x.layout == torch.sparse_csr:
        if x.values().dtype != weight.dtype:
            x = torch.sparse_csr_tensor(x.crow_indices(), x.col_indices(),
                                        x.values().to(weight.dtype), size=x.shape,
                                        check_invariants=False)
        return torch.sparse.mm(x, weight)
    return x.to(weight.dtype) @ weight


class GaussianEncoder(nn.Module):
    """Amortised Gaussian guide ``q(z | x [, dosage] [, conditioning])`` with one hidden layer.

    pre = W_x standardise(log1p x) + b [+ W_d^T dosage] [+ W_c conditioning]    (n_hidden,)
    loc = W_loc LeakyReLU(pre) + b_loc;  scale = softplus(W_s LeakyReLU(pre) + b_s) + 1e-4

    With ``covariance="full"`` the encoder also outputs the L(L-1)/2 strictly-lower entries of
    a Cholesky factor (diagonal as above), so q is a full-covariance Gaussian.

    Args:
        n_genes: G. n_hidden: width H of the hidden layer. n_latent: L.
        gene_log1p_mean, gene_log1p_std: (G,) training-split mean / std of ``log1p(x)``
            (buffers; None -> 0 / 1, i.e. no standardisation). A std below 1e-6 (a gene that is
            all-zero in training) is replaced by 1, so such genes never produce inf/NaN.
        n_dosage: T > 0 adds a CSR dosage input (the CVAE encoder).
        n_conditioning: width of an extra dense input with optional particle dimension
            (the correlated z_basal guide reads the perturbation latent z_p). Its weight W_c
            starts at zero: the guide starts as if it did not read it.
        covariance: ``"diagonal"`` or ``"full"``.
        n_batches: > 0 appends the one-hot of a batch covariate to the first layer's input
            (scvi-tools style): ``pre += W_b[batch]``, a (n_batches, H) weight whose row of the
            cell's batch is added (the product with the one-hot, without forming it).
    """

    def __init__(self, n_genes: int, n_hidden: int, n_latent: int, *, gene_log1p_mean=None,
                 gene_log1p_std=None, n_dosage: int = 0, n_conditioning: int = 0,
                 covariance: str = "diagonal", n_batches: int = 0):
        super().__init__()
        if covariance not in ("diagonal", "full"):
            raise ValueError(f"covariance must be 'diagonal' or 'full', got {covariance!r}")
        self.covariance = covariance
        self.n_genes, self.n_hidden, self.n_latent = n_genes, n_hidden, n_latent
        self.register_buffer("gene_log1p_mean", torch.zeros(n_genes))
        self.register_buffer("gene_log1p_std", torch.ones(n_genes))
        self.set_gene_stats(gene_log1p_mean, gene_log1p_std)
        fan_in = n_genes + n_dosage + n_conditioning + n_batches
        self.n_batches = int(n_batches)
        self.batch_weight = (nn.Parameter(_uniform_(torch.empty(n_batches, n_hidden), fan_in))
                             if n_batches else None)
        self.gene_weight = nn.Parameter(_uniform_(torch.empty(n_hidden, n_genes), fan_in))
        self.bias = nn.Parameter(_uniform_(torch.empty(n_hidden), fan_in))
        self.dosage_weight = (nn.Parameter(_uniform_(torch.empty(n_dosage, n_hidden), fan_in))
                              if n_dosage else None)
        self.conditioning = (nn.Linear(n_conditioning, n_hidden, bias=False)
                             if n_conditioning else None)
        if self.conditioning is not None:
            # Start ignoring the conditioning input, so training starts from the unconditioned
            # guide: a random W_c feeds every cell's sampled z_p into its basal posterior from
            # step 0, and the encoder then cancels the weak perturbations' effects before
            # their embeddings have learnt them (samsvae.models.sams._basal_guide).
            nn.init.zeros_(self.conditioning.weight)
        n_offdiag = n_latent * (n_latent - 1) // 2 if covariance == "full" else 0
        self.out = nn.Linear(n_hidden, 2 * n_latent + n_offdiag)
        if n_offdiag:
            self.register_buffer("_tril_index", torch.tril_indices(n_latent, n_latent, -1),
                                 persistent=False)
            with torch.no_grad():  # start near a diagonal covariance
                self.out.weight[2 * n_latent:].mul_(0.1)
                self.out.bias[2 * n_latent:].zero_()

    def set_gene_stats(self, mean, std) -> None:
        """Set the (G,) log1p mean / std buffers (None leaves the current value)."""
        for name, value in (("gene_log1p_mean", mean), ("gene_log1p_std", std)):
            if value is None:
                continue
            t = torch.as_tensor(value, dtype=torch.float32).reshape(-1)
            if t.numel() != self.n_genes:
                raise ValueError(f"{name} must have one value per gene ({self.n_genes}), "
                                 f"got {t.numel()}")
            if not torch.isfinite(t).all():
                raise ValueError(f"{name} holds non-finite values; compute it on the raw "
                                 "training counts (samsvae.data.gene_log1p_stats)")
            getattr(self, name).copy_(t)

    def gene_part(self, counts: torch.Tensor,
                  batch_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, G) CSR or dense counts -> (B, H) pre-activation from the genes (+ bias), plus
        the batch covariate's term when the encoder has one (``batch_index`` (B,) int64)."""
        dtype = self.gene_weight.dtype
        std = self.gene_log1p_std
        std = torch.where(std > STD_FLOOR, std, torch.ones_like(std)).to(dtype)
        pre = ops.log1p_standardize_linear(counts, self.gene_weight, self.bias,
                                           self.gene_log1p_mean.to(dtype), 1.0 / std)
        return add_batch_part(pre, self.batch_weight, batch_index)

    def dosage_part(self, dosage: torch.Tensor) -> torch.Tensor:
        """(B, T) CSR dosage -> (B, H)."""
        return sparse_rows_matmul(dosage, self.dosage_weight)

    def conditioning_part(self, cond: torch.Tensor) -> torch.Tensor:
        """(..., B, n_conditioning) -> (..., B, H)."""
        return self.conditioning(cond)

    def posterior(self, pre: torch.Tensor) -> GaussianPosterior:
        """Pre-activation (..., H) -> the Gaussian guide (diagonal or full covariance)."""
        out = self.out(F.leaky_relu(pre, LEAKY_SLOPE))
        L = self.n_latent
        loc = out[..., :L]
        diag = F.softplus(out[..., L:2 * L]) + SCALE_FLOOR
        if self.covariance == "diagonal":
            return GaussianPosterior(loc, scale=diag)
        rows, cols = self._tril_index
        tril = torch.diag_embed(diag) + _scatter_offdiag(out[..., 2 * L:], rows, cols, L)
        return GaussianPosterior(loc, scale_tril=tril)


def add_batch_part(pre: torch.Tensor, weight: Optional[torch.Tensor],
                   batch_index: Optional[torch.Tensor]) -> torch.Tensor:
    """``pre`` (..., B, H) plus ``one_hot(batch_index) @ weight`` (rows of the (n_batches, H)
    weight); ``pre`` unchanged for a network without a batch input."""
    if weight is None:
        return pre
    if batch_index is None:
        raise ValueError(f"this model is conditioned on a batch covariate ({weight.shape[0]} "
                         "batches) but the cells come without one: load the data with the "
                         "run's batch key (batch_key=...) so that batches carry batch_index")
    return pre + weight.index_select(0, batch_index.to(weight.device).reshape(-1))


def _scatter_offdiag(values: torch.Tensor, rows, cols, n: int) -> torch.Tensor:
    """(..., n(n-1)/2) strictly-lower entries -> (..., n, n) matrix (zeros elsewhere)."""
    flat = values.new_zeros(values.shape[:-1] + (n * n,))
    flat = flat.index_copy(-1, rows * n + cols, values)
    return flat.view(values.shape[:-1] + (n, n))


class DecoderBody(nn.Module):
    """``hidden = LeakyReLU(W_z z + b [+ W_d^T dosage] [+ W_b^T one_hot(batch)])``: the
    decoder up to its last layer.

    The last layer (``out``: H -> G logits) is applied by the model, fused with the likelihood.
    ``n_batches`` > 0 appends the batch one-hot to the first layer's input (scvi-tools style).
    """

    def __init__(self, n_latent: int, n_hidden: int, n_genes: int, *, n_dosage: int = 0,
                 n_batches: int = 0):
        super().__init__()
        self.input = nn.Linear(n_latent, n_hidden)
        self.n_batches = int(n_batches)
        self.batch_weight = (nn.Parameter(_uniform_(torch.empty(n_batches, n_hidden),
                                                    n_latent + n_batches))
                             if n_batches else None)
        self.dosage_weight = (nn.Parameter(_uniform_(torch.empty(n_dosage, n_hidden),
                                                     n_latent + 1)) if n_dosage else None)
        self.out = nn.Linear(n_hidden, n_genes)

    def hidden(self, z: torch.Tensor, dosage_part: Optional[torch.Tensor] = None,
               batch_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """z (..., B, L) [+ dosage_part (B, H)] [+ batch term of batch_index (B,)] ->
        (..., B, H)."""
        pre = self.input(z)
        if dosage_part is not None:
            pre = pre + dosage_part
        pre = add_batch_part(pre, self.batch_weight, batch_index)
        return F.leaky_relu(pre, LEAKY_SLOPE)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., G) unnormalised log expression proportions."""
        return self.out(hidden)
