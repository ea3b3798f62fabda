"""The ``triton`` tier of :func:`samsvae.ops.log1p_standardize` (CSR counts on the GPU) and of
:func:`samsvae.ops.log1p_standardize_linear`; imported on the first call (it imports triton).

The dense output starts as the template ``-mean * inv_std`` in every row (a broadcast copy);
one program per block of stored entries then adds ``log1p(x) * inv_std[col]`` at
``(row, col)`` with a relaxed atomic add (duplicate entries add up, as in the reference).
Dense counts run one elementwise kernel. Both launch through ``torch.library.triton_op``, so
``torch.compile`` traces them instead of falling back to PyTorch. ``log1p``
is computed as ``log(u) * x / (u - 1)`` with ``u = 1 + x`` (exact to a few ulp for small x with
``tl.log`` only: ``libdevice`` functions do not run under the CPU interpreter).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..csr import csr_rows
from ..triton_support import triton_op, wrap_triton
from .reference import check_counts, log1p_standardize_reference

BLOCK = 1024


@triton.jit
def _add_log1p_entries(out_ptr, rows_ptr, cols_ptr, vals_ptr, inv_ptr, nnz, G,
                       BLOCK: tl.constexpr):
    # int64: one call may hold more than 2^31 stored entries
    k = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = k < nnz
    r = tl.load(rows_ptr + k, mask=m, other=0)
    c = tl.load(cols_ptr + k, mask=m, other=0)
    x = tl.load(vals_ptr + k, mask=m, other=0.0)
    inv = tl.load(inv_ptr + c, mask=m, other=0.0)
    u = 1.0 + x
    d = u - 1.0
    # d == 0: x below half an ulp of 1, where log1p(x) = x to working precision
    l1p = tl.where(d == 0.0, x, tl.log(u) * (x / tl.where(d == 0.0, 1.0, d)))
    # relaxed: only the sum matters, nothing is ordered against these additions
    tl.atomic_add(out_ptr + r.to(tl.int64) * G + c, l1p * inv, mask=m, sem="relaxed")


@triton.jit
def _dense_log1p(out_ptr, x_ptr, mean_ptr, inv_ptr, n, G, BLOCK: tl.constexpr):
    """out = (log1p(x) - mean[g]) * inv[g] over a dense (B, G) block of n elements."""
    k = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = k < n
    g = k % G
    x = tl.load(x_ptr + k, mask=m, other=0.0).to(tl.float32)
    u = 1.0 + x
    d = u - 1.0
    l1p = tl.where(d == 0.0, x, tl.log(u) * (x / tl.where(d == 0.0, 1.0, d)))
    mu = tl.load(mean_ptr + g, mask=m, other=0.0)
    inv = tl.load(inv_ptr + g, mask=m, other=0.0)
    tl.store(out_ptr + k, (l1p - mu) * inv, mask=m)


def _features_csr(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor,
                  mean: torch.Tensor, inv: torch.Tensor, n_rows: int,
                  block: int = BLOCK) -> torch.Tensor:
    G = mean.shape[0]
    out = (-(mean * inv)).expand(n_rows, G).contiguous()
    nnz = vals.numel()
    if nnz:
        wrap_triton(_add_log1p_entries)[(triton.cdiv(nnz, block),)](
            out, rows, cols, vals, inv, nnz, G, BLOCK=block)
    return out


def _features_dense(x: torch.Tensor, mean: torch.Tensor, inv: torch.Tensor,
                    block: int = BLOCK) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    n = x.numel()
    if n:
        wrap_triton(_dense_log1p)[(triton.cdiv(n, block),)](out, x, mean, inv, n, x.shape[1],
                                                           BLOCK=block)
    return out


if triton_op is not None:  # traceable by torch.compile (no graph break, no fallback)
    _features_csr_op = triton_op("samsvae::triton_log1p_standardize_csr",
                                 mutates_args=())(_features_csr)
    _features_dense_op = triton_op("samsvae::triton_log1p_standardize_dense",
                                   mutates_args=())(_features_dense)
else:  # pragma: no cover
    _features_csr_op, _features_dense_op = _features_csr, _features_dense


def log1p_standardize_triton(counts, mean, inv_std, *, block: int = BLOCK):
    """(B, G) CSR or dense counts -> dense (B, G) standardised log1p features (mean's dtype;
    float32 math, float64 statistics go to the reference)."""
    if mean.dtype != torch.float32:
        return log1p_standardize_reference(counts, mean, inv_std)
    B, G = counts.shape
    inv = inv_std.to(torch.float32).contiguous()
    mean = mean.contiguous()
    if counts.layout == torch.sparse_csr:
        vals = counts.values().detach()
        check_counts(vals)
        return _features_csr_op(csr_rows(counts), counts.col_indices().contiguous(),
                                vals.to(torch.float32).contiguous(), mean, inv, B, block)
    if counts.layout != torch.strided:
        raise ValueError(f"counts must be dense or torch.sparse_csr, got layout {counts.layout}")
    check_counts(counts)
    return _features_dense_op(counts.detach().to(torch.float32).contiguous(), mean, inv, block)


def log1p_standardize_linear_triton(counts, weight, bias, mean, inv_std):
    """The Triton features and one cuBLAS product: on a GPU the dense product is the fast
    path, so there is no sparse product kernel here."""
    with torch.no_grad():
        features = log1p_standardize_triton(counts, mean.to(weight.dtype),
                                            inv_std.to(weight.dtype))
    return torch.nn.functional.linear(features, weight, bias)
