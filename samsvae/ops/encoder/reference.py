"""The ``reference`` tier of the encoder-input ops (pure PyTorch: the spec), the count check
and the CSR-to-dense scatter every tier may fall back on.
"""
from __future__ import annotations

import torch

import torch.nn.functional as F

from ..csr import csr_rows


def csr_to_dense(x: torch.Tensor) -> torch.Tensor:
    """A (rows, cols) ``torch.sparse_csr`` tensor as a dense one (no autograd; duplicate
    entries add up).

    One scatter of the values at ``row * cols + col``; torch's ``to_dense`` on CSR goes through
    COO conversion and several passes over the non-zeros (~8x slower for a 512 x 8000 batch).
    """
    rows, cols = x.shape
    flat = csr_rows(x) * cols + x.col_indices()
    out = torch.zeros(rows * cols, dtype=x.values().dtype, device=x.values().device)
    out.index_put_((flat,), x.values().detach(), accumulate=True)
    return out.view(rows, cols)


_COUNTS_MESSAGE = ("counts must be finite and non-negative (raw UMI counts are expected, not "
                   "log-normalised values)")


def check_counts(values: torch.Tensor) -> None:
    """Raise ValueError when stored counts are negative or not finite.

    The test runs where the values live without reading them back: ``torch._assert_async``
    checks on the CPU at once and on a GPU raises a device-side assertion with the same message
    when the check runs, instead of synchronising the stream on every batch."""
    if not values.numel():
        return
    ok = (torch.isfinite(values) & (values >= 0)).all()
    try:
        torch._assert_async(ok, _COUNTS_MESSAGE)
    except RuntimeError:
        bad = int((~(torch.isfinite(values) & (values >= 0))).sum())
        raise ValueError(f"counts must be finite and non-negative; found {bad} invalid entries "
                         "(raw UMI counts are expected, not log-normalised values)") from None


def log1p_standardize_reference(counts, mean, inv_std):
    """Pure-PyTorch :func:`samsvae.ops.log1p_standardize` (the spec): (B, G) dense features in
    ``mean``'s dtype."""
    check_counts(counts.values() if counts.layout == torch.sparse_csr else counts)
    dtype = mean.dtype
    if counts.layout == torch.sparse_csr:
        values = torch.log1p(counts.values().detach().to(dtype))
        features = csr_to_dense(torch.sparse_csr_tensor(
            counts.crow_indices(), counts.col_indices(), values, size=counts.shape,
            check_invariants=False))
    else:
        features = torch.log1p(counts.detach().to(dtype))
    return (features - mean) * inv_std


def log1p_standardize_linear_reference(counts, weight, bias, mean, inv_std):
    """Pure-PyTorch :func:`samsvae.ops.log1p_standardize_linear` (the spec): the dense
    standardised features, then one ``F.linear``; (B, H)."""
    return F.linear(log1p_standardize_reference(counts, mean, inv_std), weight, bias)
