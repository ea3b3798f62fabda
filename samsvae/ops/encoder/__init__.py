"""The encoder-input ops: an scRNA encoder's standardised log1p input and its first Linear.

    log1p_standardize(counts, mean, inv_std)[b, g] = (log1p(counts[b, g]) - mean[g]) * inv_std[g]

``counts`` (B, G) CSR or dense; ``mean``/``inv_std`` (G,) (statistics of log1p counts over the
training cells). Returns a dense (B, G) tensor of ``mean``'s dtype, without autograd (the
features are an input). Backends: ``reference`` (PyTorch: log1p of the stored values, one
scatter into a zero matrix, then standardisation), ``cpp`` (one pass per row: a template row
of ``-mean * inv_std`` plus the stored entries, log1p of small integer counts from a table) and
``triton`` (the template broadcast, then one atomic add per stored entry).

    log1p_standardize_linear(counts, weight, bias, mean, inv_std)
        = log1p_standardize(counts, mean, inv_std) @ weight.T + bias                  (B, H)

``counts`` (B, G) CSR or dense raw counts; ``weight`` (H, G); ``bias`` (H,) or None;
``mean`` / ``inv_std`` (G,) statistics of log1p counts over the training cells. Gradients
reach ``weight`` and ``bias``; the counts are data and ``mean`` / ``inv_std`` constants
(buffers): no gradient reaches them on any backend.

Backends of ``log1p_standardize_linear``:

* ``reference``: the dense standardised features (:func:`log1p_standardize`, reference) and one
  ``F.linear`` (the spec);
* ``cpp``: CSR batches at most ``SPARSE_BELOW`` non-zero go through the C++ sparse kernel
  (``samsvae::log1p_standardize_linear_csr``), which never forms the (B, G) features:
  ``weight @ standardise(x) = sum over stored entries of log1p(x) inv_std weight[:, g]`` plus
  ``-(weight @ (mean * inv_std))``, one tiled multiply-add of H values per stored entry in both
  directions. Denser batches (where one dense product is faster), dense counts, other dtypes
  and ``torch.compile`` tracing use the C++ features and a dense product;
* ``triton``: the Triton features and cuBLAS (on a GPU the dense product is the fast path).

Tiers live in :mod:`.reference`, :mod:`.cpp` (loaded when the C++ extension is built) and
:mod:`.triton` (imported on its first call).
"""
from __future__ import annotations

import torch

from .. import backends
from ..cpp_extension import ext_available
from ..triton_support import triton_cuda_available, why_triton_unavailable
from .reference import (check_counts, csr_to_dense, log1p_standardize_linear_reference,
                        log1p_standardize_reference)


def log1p_standardize(counts, mean, inv_std, *, backend: str = "auto") -> torch.Tensor:
    """(B, G) CSR or dense counts -> dense (B, G) ``(log1p(counts) - mean) * inv_std`` in
    ``mean``'s dtype, without autograd. ``backend``: ``"auto"`` | ``"reference"`` | ``"cpp"`` |
    ``"triton"``."""
    if counts.dim() != 2 or mean.shape != (counts.shape[1],) or inv_std.shape != mean.shape:
        raise ValueError(f"counts must be (cells, genes) and mean / inv_std (genes,); got "
                         f"{tuple(counts.shape)}, {tuple(mean.shape)}, {tuple(inv_std.shape)}")
    with torch.no_grad():
        _, fn = backends.resolve("log1p_standardize", backend, counts.device)
        return fn(counts, mean, inv_std)


def log1p_standardize_linear(counts, weight, bias, mean, inv_std, *,
                             backend: str = "auto") -> torch.Tensor:
    """(B, G) counts, weight (H, G), bias (H,) or None, mean / inv_std (G,) -> (B, H)
    ``log1p_standardize(counts, mean, inv_std) @ weight.T + bias``; gradients reach ``weight``
    and ``bias`` only. ``backend``: ``"auto"`` | ``"reference"`` | ``"cpp"`` | ``"triton"``."""
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


backends.register("log1p_standardize", "reference", log1p_standardize_reference)
backends.register("log1p_standardize_linear", "reference", log1p_standardize_linear_reference)
backends.load_tier(f"{__name__}.cpp", needs=ext_available)
for _op in ("log1p_standardize", "log1p_standardize_linear"):
    backends.register(_op, "triton", f"{__name__}.triton:{_op}_triton", devices=("cuda",),
                      available=triton_cuda_available, why_unavailable=why_triton_unavailable)

__all__ = ["log1p_standardize", "log1p_standardize_linear", "log1p_standardize_reference",
           "log1p_standardize_linear_reference", "check_counts", "csr_to_dense"]
