"""An scRNA encoder's first layer on raw counts: standardised log1p features, then a Linear.

    log1p_standardize_linear(counts, weight, bias, mean, inv_std)
        = log1p_standardize(counts, mean, inv_std) @ weight.T + bias                  (B, H)

``counts`` (B, G) CSR or dense raw counts; ``weight`` (H, G); ``bias`` (H,) or None;
``mean`` / ``inv_std`` (G,) statistics of log1p counts over the training cells. Gradients
reach ``weight`` and ``bias``; the counts are data and ``mean`` / ``inv_std`` constants
(buffers): no gradient reaches them on any backend.

Backends:

* ``reference``: the dense standardised features (:func:`log1p_standardize`, reference) and one
  ``F.linear`` (the spec);
* ``cpp``: CSR batches at most ``SPARSE_BELOW`` non-zero go through the C++ sparse kernel
  (``samsvae::log1p_standardize_linear_csr``), which never forms the (B, G) features:
  ``weight @ standardise(x) = sum over stored entries of log1p(x) inv_std weight[:, g]`` plus
  ``-(weight @ (mean * inv_std))``, one tiled multiply-add of H values per stored entry in both
  directions. Denser batches (where one dense product is faster), dense counts, other dtypes
  and ``torch.compile`` tracing use the C++ features and a dense product;
* ``triton``: the Triton features and cuBLAS (on a GPU the dense product is the fast path).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import backends
from .log1p_standardize import log1p_standardize


def log1p_standardize_linear_reference(counts, weight, bias, mean, inv_std):
    """Pure-PyTorch implementation (the spec)."""
    return F.linear(log1p_standardize(counts, mean, inv_std, backend="reference"), weight, bias)


def log1p_standardize_linear(counts, weight, bias, mean, inv_std, *,
                             backend: str = "auto") -> torch.Tensor:
    """See the module docstring. ``backend``: ``"auto"`` | ``"reference"`` | ``"cpp"`` |
    ``"triton"``."""
    if counts.dim() != 2 or weight.dim() != 2 or weight.shape[1] != counts.shape[1]:
        raise ValueError(f"counts must be (cells, genes) and weight (hidden, genes); got "
                         f"{tuple(counts.shape)} and {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be (hidden,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
    if mean.shape != (counts.shape[1],) or inv_std.shape != mean.shape:
        raise ValueError(f"mean / inv_std must be (genes,) = ({counts.shape[1]},); got "
                         f"{tuple(mean.shape)}, {tuple(inv_std.shape)}")
    _, fn = backends.resolve("log1p_standardize_linear", backend, counts.device)
    return fn(counts, weight, bias, mean.detach(), inv_std.detach())


backends.register("log1p_standardize_linear", "reference", log1p_standardize_linear_reference)
