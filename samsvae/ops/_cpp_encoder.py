"""The ``cpp`` backend of :func:`samsvae.ops.log1p_standardize` (``csrc/encoder``)."""
from __future__ import annotations

import torch

from . import backends
from ._cpp import ext_available, why_unavailable
from ._cpp_nb import _COMPUTE_DTYPES as _DTYPES
from .log1p_standardize import log1p_standardize_reference


@torch.library.register_fake("samsvae::log1p_standardize_csr")
def _fake(crow, col, values, mean, inv_std):
    return mean.new_empty((crow.shape[0] - 1, mean.shape[0]))


def log1p_standardize_cpp(counts, mean, inv_std):
    """CSR counts on the CPU in float32/float64 through the C++ op; anything else (dense
    counts, other dtypes, torch.compile tracing) through the reference."""
    if (counts.layout != torch.sparse_csr or mean.dtype not in _DTYPES
            or torch.compiler.is_compiling()):
        return log1p_standardize_reference(counts, mean, inv_std)
    dtype = mean.dtype
    return torch.ops.samsvae.log1p_standardize_csr(
        counts.crow_indices().to(torch.int64).contiguous(),
        counts.col_indices().to(torch.int64).contiguous(),
        counts.values().detach().to(dtype).contiguous(), mean.contiguous(),
        inv_std.to(dtype).contiguous())


backends.register("log1p_standardize", "cpp", log1p_standardize_cpp, devices=("cpu",),
                  available=ext_available, why_unavailable=why_unavailable)
