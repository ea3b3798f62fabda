"""The ``triton`` tier of :func:`samsvae.ops.log1p_standardize` (CSR counts on the GPU) and of
:func:`samsvae.ops.log1p_standardize_linear`; imported on the first call (it imports triton).

The dense output starts as the template ``-mean * inv_std`` in every row (a broadcast copy);
one program per block of stored entries then adds ``log1p(x) * inv_std[col]`` at
``(row, col)`` with an atomic add (duplicate entries add up, as in the reference). ``log1p``
is computed as ``log(u) * x / (u - 1)`` with ``u = 1 + x`` (exact to a few ulp for small x with
``tl.log`` only: ``libdevice`` functions do not run under the CPU interpreter).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..csr import csr_rows
from .reference import check_counts, log1p_standardize_reference

BLOCK = 1024


@triton.jit
def _add_log1p_entries(out_ptr, rows_ptr, cols_ptr, vals_ptr, inv_ptr, nnz, G,
                       BLOCK: tl.constexpr):
    k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = k < nnz
    r = tl.load(rows_ptr + k, mask=m, other=0)
    c = tl.load(cols_ptr + k, mask=m, other=0)
    x = tl.load(vals_ptr + k, mask=m, other=0.0)
    inv = tl.load(inv_ptr + c, mask=m, other=0.0)
    u = 1.0 + x
    d = u - 1.0
    # d == 0: x below half an ulp of 1, where log1p(x) = x to working precision
    l1p = tl.where(d == 0.0, x, tl.log(u) * (x / tl.where(d == 0.0, 1.0, d)))
    tl.atomic_add(out_ptr + r * G + c, l1p * inv, mask=m)


def log1p_standardize_triton(counts, mean, inv_std, *, block: int = BLOCK):
    """(B, G) CSR counts -> dense (B, G) standardised log1p features (mean's dtype); dense
    counts and ``torch.compile`` tracing go to the reference."""
    if counts.layout != torch.sparse_csr or torch.compiler.is_compiling():
        return log1p_standardize_reference(counts, mean, inv_std)
    check_counts(counts.values())
    dtype = mean.dtype
    B, G = counts.shape
    inv = inv_std.to(dtype).contiguous()
    out = (-(mean * inv)).expand(B, G).contiguous()
    rows = csr_rows(counts)
    cols = counts.col_indices().contiguous()
    vals = counts.values().detach().to(dtype).contiguous()
    nnz = vals.numel()
    if nnz:
        _add_log1p_entries[(triton.cdiv(nnz, block),)](out, rows, cols, vals, inv, nnz, G,
                                                      BLOCK=block)
    return out


def log1p_standardize_linear_triton(counts, weight, bias, mean, inv_std):
    """The Triton features and one cuBLAS product: on a GPU the dense product is the fast
    path, so there is no sparse product kernel here."""
    with torch.no_grad():
        features = log1p_standardize_triton(counts, mean.to(weight.dtype),
                                            inv_std.to(weight.dtype))
    return torch.nn.functional.linear(features, weight, bias)
