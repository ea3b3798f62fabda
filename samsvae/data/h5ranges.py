"""Reading many element ranges of a 1-D HDF5 dataset (the entries of many CSR rows) quickly.

A minibatch of 512 scattered rows is 512 ranges of ``X/data`` and of ``X/indices``. Two readers:

* :class:`FileRanges`, for uncompressed datasets (contiguous or chunked): the byte offset of
  every chunk is looked up once, and each range is read straight from the file with
  ``os.preadv`` into the output buffer (no HDF5 call per batch, GIL released during the reads).
  About 1-3 ms per dataset for 512 rows of an 8,000-gene matrix in the page cache.
* :class:`HDF5Ranges`, for anything else (compressed chunks, external storage, no ``preadv``):
  one HDF5 read of the union of the ranges as a hyperslab selection. Several times slower per
  range, but always correct.

:func:`range_reader` picks one. Both return the concatenation of ``ds[lo[k]:hi[k]]`` over k
for sorted, disjoint ranges.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

import h5py
import numpy as np


class HDF5Ranges:
    """Ranges read through HDF5 with one hyperslab-union selection per call."""

    def __init__(self, group: h5py.Group, name: str):
        self.ds = _open_uncached(group, name)
        self.dtype = self.ds.dtype

    def read(self, lo: np.ndarray, hi: np.ndarray, total: int) -> np.ndarray:
        buf = np.empty(total, dtype=self.dtype)
        keep = hi > lo
        lo, hi = lo[keep].tolist(), hi[keep].tolist()
        if not lo:
            return buf
        space = self.ds.id.get_space()
        space.select_hyperslab((lo[0],), (hi[0] - lo[0],), op=h5py.h5s.SELECT_SET)
        for a, b in zip(lo[1:], hi[1:]):
            space.select_hyperslab((a,), (b - a,), op=h5py.h5s.SELECT_OR)
        self.ds.id.read(h5py.h5s.create_simple((total,)), space, buf)
        return buf

    def close(self) -> None:
        pass


def _open_uncached(group: h5py.Group, name: str) -> h5py.Dataset:
    """``group[name]``, with the chunk cache off when it is uncompressed.

    Through the cache HDF5 copies every touched chunk whole; without it, it reads only the
    requested bytes of an uncompressed chunk. Compressed chunks must be decompressed whole, so
    they keep the cache. HDF5 shares one object per open dataset and fixes its access list when
    it is first opened: this must be the first handle to the dataset.
    """
    dapl = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
    dapl.set_chunk_cache(0, 0, 0.75)
    dsid = h5py.h5d.open(group.id, name.encode(), dapl)
    if dsid.get_create_plist().get_nfilters() == 0:
        return h5py.Dataset(dsid)
    dsid.close()
    return group[name]


class FileRanges:
    """Ranges of an uncompressed dataset read directly from the file's bytes.

    path:          the HDF5 file.
    dtype:         element dtype (little-endian, as stored).
    chunk:         elements per chunk, or None for contiguous storage.
    chunk_offsets: (n_chunks,) int64 file byte offset of chunk k (elements k*chunk ...), or
                   (1,) the offset of contiguous storage.
    """

    def __init__(self, path: str, dtype: np.dtype, chunk: Optional[int], chunk_offsets: np.ndarray):
        self.path = path
        self.dtype = np.dtype(dtype)
        self.chunk = chunk
        self.chunk_offsets = chunk_offsets
        self._fd: Optional[int] = None

    @classmethod
    def from_dataset(cls, path: str, ds: h5py.Dataset) -> Optional["FileRanges"]:
        """A reader for ``ds``, or None when its bytes cannot be addressed directly."""
        if not hasattr(os, "preadv") or ds.ndim != 1 or ds.file.driver != "sec2":
            return None
        dtype = ds.dtype
        if dtype.kind not in "iuf" or (dtype.byteorder == ">" or
                                       (dtype.byteorder == "=" and sys.byteorder != "little")):
            return None
        dcpl = ds.id.get_create_plist()
        if dcpl.get_nfilters() or dcpl.get_external_count():
            return None
        layout = dcpl.get_layout()
        if layout == h5py.h5d.CONTIGUOUS:
            offset = ds.id.get_offset()
            if offset is None:  # storage never allocated
                return None
            return cls(path, dtype, None, np.array([offset], dtype=np.int64))
        if layout != h5py.h5d.CHUNKED or not hasattr(ds.id, "chunk_iter"):
            return None
        chunk = int(ds.chunks[0])
        n_chunks = -(-ds.shape[0] // chunk)
        offsets = np.full(n_chunks, -1, dtype=np.int64)

        def visit(info):
            offsets[info.chunk_offset[0] // chunk] = info.byte_offset

        ds.id.chunk_iter(visit)
        if (offsets < 0).any():  # unallocated chunks (never written)
            return None
        return cls(path, dtype, chunk, offsets)

    def _byte_ranges(self, lo: np.ndarray, hi: np.ndarray):
        """File offsets and lengths (bytes) of the ranges, split at chunk boundaries."""
        item = self.dtype.itemsize
        if self.chunk is None:
            return self.chunk_offsets[0] + lo * item, (hi - lo) * item
        c0 = lo // self.chunk
        pieces = (hi - 1) // self.chunk - c0 + 1
        rng_of = np.repeat(np.arange(lo.size), pieces)
        k = np.arange(rng_of.size) - np.repeat(np.cumsum(pieces) - pieces, pieces)
        c = c0[rng_of] + k
        a = np.maximum(lo[rng_of], c * self.chunk)
        b = np.minimum(hi[rng_of], (c + 1) * self.chunk)
        return self.chunk_offsets[c] + (a - c * self.chunk) * item, (b - a) * item

    def read(self, lo: np.ndarray, hi: np.ndarray, total: int) -> np.ndarray:
        buf = np.empty(total, dtype=self.dtype)
        keep = hi > lo
        if not keep.any():
            return buf
        offsets, sizes = self._byte_ranges(lo[keep], hi[keep])
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        view = memoryview(buf.view(np.uint8))
        pos = 0
        for off, size in zip(offsets.tolist(), sizes.tolist()):
            got = os.preadv(self._fd, [view[pos:pos + size]], off)
            if got != size:
                raise OSError(f"short read from {self.path} at byte {off}: {got} of {size} "
                              "bytes (was the file changed while open?)")
            pos += size
        return buf

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


def range_reader(path: str, group: h5py.Group, name: str, *, direct: bool = True):
    """The fastest reader available for ``group[name]`` (see the module docstring)."""
    if direct:
        reader = FileRanges.from_dataset(path, group[name])
        if reader is not None:
            return reader
    return HDF5Ranges(group, name)
