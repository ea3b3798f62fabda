"""Index helpers for ``torch.sparse_csr`` batches shared by the ops and their tiers."""
from __future__ import annotations

import torch


def csr_rows(csr: torch.Tensor) -> torch.Tensor:
    """(nnz,) int64 row of each stored entry of a (rows, cols) CSR tensor."""
    crow = csr.crow_indices()
    # output_size from the shape of the column indices: no device-to-host copy of nnz
    return torch.repeat_interleave(torch.arange(crow.numel() - 1, device=crow.device),
                                   crow.diff(), output_size=csr.col_indices().numel())


def kernel_parts(csr: torch.Tensor, dtype: torch.dtype) -> tuple:
    """``(crow, col, values)`` as the C++ kernels take them: int64, int64, ``dtype``;
    contiguous and detached (never a view of ``csr``)."""
    # values() is a view of the sparse tensor; detach() drops that link (no copy), which
    # torch.compile cannot trace through
    return (csr.crow_indices().to(torch.int64).contiguous(),
            csr.col_indices().to(torch.int64).contiguous(),
            csr.values().detach().to(dtype).contiguous())
