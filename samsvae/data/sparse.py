"""Small helpers for scipy CSR matrices."""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

_INT32_MAX = np.iinfo(np.int32).max


def uniform_index_dtype(matrix: sp.csr_matrix) -> sp.csr_matrix:
    """``matrix`` with ``indices`` and ``indptr`` of one integer type (int32 when it fits).

    scipy's row fancy indexing is ~1000x slower on a matrix mixing int32 indices with an int64
    indptr (what anndata writes) because it upcasts the whole index array on every call. The
    result shares ``data`` with ``matrix``; ``matrix`` itself is not modified.
    """
    fits32 = matrix.nnz < _INT32_MAX and max(matrix.shape) < _INT32_MAX
    dtype = np.int32 if fits32 else np.int64
    if matrix.indices.dtype == dtype and matrix.indptr.dtype == dtype:
        return matrix
    out = sp.csr_matrix((matrix.data, matrix.indices.astype(dtype), matrix.indptr.astype(dtype)),
                        shape=matrix.shape, copy=False)
    out.has_sorted_indices = matrix.has_sorted_indices
    return out
