"""Row access to a CSR matrix stored in an .h5ad (HDF5) file, without loading it.

An h5ad CSR matrix is a group with datasets ``data`` (nnz,), ``indices`` (nnz,) and ``indptr``
(n_rows + 1,) and the attributes ``encoding-type = "csr_matrix"`` and ``shape``. Row ``r``'s
entries are ``data[indptr[r]:indptr[r + 1]]``. :class:`BackedCSR` keeps ``indptr`` in memory
(8 bytes per row) and reads the entries of requested rows: rows are taken in ascending order,
runs of adjacent rows become ranges of the ``data``/``indices`` datasets, the ranges are read
by a :mod:`.h5ranges` reader (straight from the file when the datasets are uncompressed, else
one HDF5 read per dataset), and the result is assembled into a scipy CSR matrix.

:meth:`BackedCSR.read_rows` (sorted rows -> CSR, the I/O step) is separate from
:meth:`BackedCSR.rows` (any order -> CSR) so that a prefetching reader can schedule the I/O.
"""
from __future__ import annotations

import os
from typing import Iterator, Optional

import h5py
import numpy as np
import scipy.sparse as sp

from .h5ranges import FileRanges, range_reader

DEFAULT_MAX_GAP = 0  # stored entries: a gap up to this is read rather than skipped


def open_csr_group(f: h5py.File, key: str, path: str) -> h5py.Group:
    """Return the CSR group ``key`` of an open h5ad file, or raise a ValueError saying why not."""
    if key not in f:
        raise ValueError(f"{path} has no {key!r} matrix")
    node = f[key]
    if isinstance(node, h5py.Dataset):
        raise ValueError(
            f"{path}:{key} is stored dense; backed reading needs a CSR matrix. Load the file in "
            "memory (backed=False) or rewrite it sparse: adata.X = scipy.sparse.csr_matrix(adata.X); "
            "adata.write_h5ad(path).")
    enc = node.attrs.get("encoding-type", node.attrs.get("h5sparse_format", ""))
    if isinstance(enc, bytes):
        enc = enc.decode()
    if enc not in ("csr_matrix", "csr"):
        raise ValueError(
            f"{path}:{key} is encoded as {enc!r}; backed reading needs 'csr_matrix' (cells in rows). "
            "Convert it in memory with adata.X = adata.X.tocsr() and write the file again.")
    return node


class BackedCSR:
    """Read-only row access to an on-disk CSR matrix, optionally restricted to some rows.

    path:    the .h5ad file.
    key:     the CSR group, ``"X"`` or ``"layers/<name>"``.
    rows:    (n,) strictly increasing source row numbers this view exposes as rows 0..n-1
             (None: all rows).
    max_gap: neighbouring requested rows are read as one range when at most this many stored
             entries lie between them (default 0: only adjacent rows are merged).
    direct:  read uncompressed datasets straight from the file (``os.preadv`` at the chunks'
             byte offsets) rather than through HDF5; falls back to HDF5 when impossible.

    Rows come back as ``scipy.sparse.csr_matrix`` float32 (values cast from the stored dtype).
    The object can be pickled (the file is reopened lazily), e.g. into worker processes.
    """

    def __init__(self, path, key: str = "X", rows: Optional[np.ndarray] = None, *,
                 max_gap: int = DEFAULT_MAX_GAP, direct: bool = True):
        self.path = os.fspath(path)
        self.key = key
        self.max_gap = int(max_gap)
        self.direct = bool(direct)
        self._file: Optional[h5py.File] = None
        self._readers: Optional[tuple] = None
        group = self._group()
        shape = tuple(int(s) for s in group.attrs["shape"])
        self._indptr = group["indptr"][:].astype(np.int64, copy=False)
        self.source_shape = shape
        self.stored_dtype = group["data"].dtype
        if rows is not None:
            rows = np.asarray(rows, dtype=np.int64)
            if rows.ndim != 1 or (rows.size and (rows[0] < 0 or rows[-1] >= shape[0])):
                raise ValueError(f"rows must be 1-D source row numbers in [0, {shape[0]})")
            if rows.size > 1 and not np.all(np.diff(rows) > 0):
                raise ValueError("rows of a BackedCSR view must be strictly increasing")
        self._rows = rows
        self.bytes_read = 0  # bytes of data + indices read so far (for throughput reports)

    # -- file handle -------------------------------------------------------------------------
    def _group(self) -> h5py.Group:
        if self._file is None:
            self._file = h5py.File(self.path, "r")
        return open_csr_group(self._file, self.key, self.path)

    def _range_readers(self) -> tuple:
        """Readers of element ranges of ``data`` and ``indices`` (see :mod:`.h5ranges`)."""
        if self._readers is None:
            group = self._group()
            self._readers = tuple(range_reader(self.path, group, name, direct=self.direct)
                                  for name in ("data", "indices"))
        return self._readers

    @property
    def reader_kind(self) -> str:
        """``"file"`` (direct reads of an uncompressed file) or ``"hdf5"``."""
        return "file" if isinstance(self._range_readers()[0], FileRanges) else "hdf5"

    def close(self) -> None:
        for reader in self._readers or ():
            reader.close()
        self._readers = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_file"] = None
        state["_readers"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)

    # -- shape -------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple:
        n = self.source_shape[0] if self._rows is None else self._rows.size
        return (n, self.source_shape[1])

    @property
    def dtype(self):
        return np.dtype(np.float32)

    @property
    def nnz(self) -> int:
        if self._rows is None:
            return int(self._indptr[-1])
        return int((self._indptr[self._rows + 1] - self._indptr[self._rows]).sum())

    def source_rows(self, idx: np.ndarray) -> np.ndarray:
        """Rows of the file behind rows ``idx`` of this view."""
        idx = np.asarray(idx, dtype=np.int64)
        return idx if self._rows is None else self._rows[idx]

    def reopen(self, *, max_gap: Optional[int] = None) -> "BackedCSR":
        """An independent reader of the same view (own file handles, e.g. for a reader thread).

        ``max_gap`` replaces this view's value when given. No file access until the first read.
        """
        other = BackedCSR.__new__(BackedCSR)
        other.__setstate__(self.__getstate__())
        other.bytes_read = 0
        if max_gap is not None:
            other.max_gap = int(max_gap)
        return other

    def select(self, rows: np.ndarray) -> "BackedCSR":
        """A view on rows ``rows`` (strictly increasing) of this view."""
        return BackedCSR(self.path, self.key, self.source_rows(rows), max_gap=self.max_gap,
                         direct=self.direct)

    # -- reading -----------------------------------------------------------------------------
    def read_rows(self, sorted_idx: np.ndarray) -> sp.csr_matrix:
        """CSR (len(sorted_idx), n_genes) float32 of rows ``sorted_idx`` (non-decreasing).

        Rows within ``max_gap`` stored entries of each other form one range.
        """
        idx = np.asarray(sorted_idx, dtype=np.int64)
        n_cols = self.source_shape[1]
        if idx.size == 0:
            return sp.csr_matrix((0, n_cols), dtype=np.float32)
        if idx.ndim != 1 or idx[0] < 0 or idx[-1] >= self.shape[0]:
            raise IndexError(f"row indices must be 1-D in [0, {self.shape[0]})")
        if idx.size > 1 and np.any(np.diff(idx) < 0):
            raise ValueError("read_rows needs sorted row indices; use rows() for any order")
        src = self.source_rows(idx)
        starts = self._indptr[src]
        ends = self._indptr[src + 1]
        lengths = ends - starts
        # Runs: a new slice starts where the gap to the previous row's entries exceeds max_gap.
        new_run = np.empty(src.size, dtype=bool)
        new_run[0] = True
        new_run[1:] = (starts[1:] - ends[:-1]) > self.max_gap
        run_id = np.cumsum(new_run) - 1
        first = np.flatnonzero(new_run)
        last = np.r_[first[1:], src.size] - 1
        run_lo = starts[first]
        run_hi = ends[last]  # ends are non-decreasing because the rows are sorted
        run_len = run_hi - run_lo
        run_off = np.r_[0, np.cumsum(run_len)[:-1]]
        total_read = int(run_len.sum())

        data_reader, ind_reader = self._range_readers()
        data_buf = data_reader.read(run_lo, run_hi, total_read)
        ind_buf = ind_reader.read(run_lo, run_hi, total_read)
        self.bytes_read += total_read * (data_buf.itemsize + ind_buf.itemsize)

        indptr = np.zeros(idx.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        nnz = int(indptr[-1])
        if nnz == total_read and not np.any(src[1:] == src[:-1]):
            take = None  # no gap was read and no row repeats: the buffer is already in order
        else:
            pos = starts - run_lo[run_id] + run_off[run_id]
            take = np.repeat(pos - indptr[:-1], lengths) + np.arange(nnz, dtype=np.int64)
        data = data_buf if take is None else data_buf[take]
        indices = ind_buf if take is None else ind_buf[take]
        index_dtype = np.int32 if max(nnz, n_cols) < np.iinfo(np.int32).max else np.int64
        return sp.csr_matrix(
            (data.astype(np.float32, copy=False), indices.astype(index_dtype, copy=False),
             indptr.astype(index_dtype, copy=False)),
            shape=(idx.size, n_cols))

    def rows(self, idx: np.ndarray) -> sp.csr_matrix:
        """CSR (len(idx), n_genes) float32 of rows ``idx`` in the given order."""
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size > 1 and np.any(np.diff(idx) < 0):
            order = np.argsort(idx, kind="stable")
            block = self.read_rows(idx[order])
            inverse = np.empty_like(order)
            inverse[order] = np.arange(order.size)
            return block[inverse]
        return self.read_rows(idx)

    __getitem__ = rows

    def iter_chunks(self, chunk_rows: int = 8192) -> Iterator[tuple]:
        """Yield ``(start, csr)`` for consecutive blocks of ``chunk_rows`` rows of this view."""
        n = self.shape[0]
        for start in range(0, n, chunk_rows):
            yield start, self.read_rows(np.arange(start, min(start + chunk_rows, n)))

    def __repr__(self) -> str:
        return (f"BackedCSR({self.path!r}, key={self.key!r}, shape={self.shape}, "
                f"stored dtype={self.stored_dtype})")


def scan_rows(group: h5py.Group, chunk_entries: int = 1 << 24) -> Iterator[tuple]:
    """Stream a whole on-disk CSR matrix: yield ``(row_start, indptr_local, data)`` blocks.

    Blocks hold whole rows and about ``chunk_entries`` stored values each; ``indptr_local``
    (rows + 1,) indexes ``data`` of the block. Used for validation and library sizes.
    """
    indptr = group["indptr"][:].astype(np.int64, copy=False)
    data_ds = group["data"]
    n_rows = indptr.size - 1
    row = 0
    while row < n_rows:
        # last row whose end stays within the entry budget (at least one row)
        stop = int(np.searchsorted(indptr, indptr[row] + chunk_entries, side="right")) - 1
        stop = min(max(stop, row + 1), n_rows)
        lo, hi = int(indptr[row]), int(indptr[stop])
        yield row, indptr[row:stop + 1] - lo, (data_ds[lo:hi] if hi > lo else
                                               np.empty(0, dtype=data_ds.dtype))
        row = stop
