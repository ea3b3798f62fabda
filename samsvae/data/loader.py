"""Minibatches of sparse rows: :class:`Batch` and :class:`MinibatchLoader`.

A batch is built by slicing the rows of the CSR count and dosage matrices (in memory with
scipy fancy indexing, backed through :meth:`BackedCSR.rows`) and wrapping the CSR arrays as
``torch.sparse_csr`` tensors; the whole matrix is never densified, and a batch never is either.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import scipy.sparse as sp
import torch

# torch prints this once per process on the first CSR tensor; batches are always CSR here.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state",
                        category=UserWarning)


def csr_to_torch(matrix: sp.csr_matrix, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A scipy CSR matrix as a ``torch.sparse_csr`` tensor with int64 indices.

    The values are shared with ``matrix`` when they already have ``dtype``; int32 index arrays
    are widened to int64 (what the ops expect). Columns are sorted within each row (torch's
    CSR invariant, which the sparse kernels rely on) when the matrix does not have them so.
    """
    if not matrix.has_sorted_indices:
        matrix = matrix.sorted_indices()
    np_dtype = torch.empty((), dtype=dtype).numpy().dtype
    crow = torch.from_numpy(np.ascontiguousarray(matrix.indptr, dtype=np.int64))
    col = torch.from_numpy(np.ascontiguousarray(matrix.indices, dtype=np.int64))
    values = torch.from_numpy(np.ascontiguousarray(matrix.data, dtype=np_dtype))
    return torch.sparse_csr_tensor(crow, col, values, size=matrix.shape, dtype=dtype,
                                   check_invariants=False)


@dataclass
class Batch:
    """One minibatch of B cells.

    counts:  (B, G) torch.sparse_csr float32 raw counts.
    dosage:  (B, T) torch.sparse_csr float32 perturbation dosages (empty row = control).
    library: (B,) float32 library sizes (total UMIs of each cell).
    index:   (B,) int64 rows of the ScreenData.
    perturbations: (U,) int64 sorted ids of the perturbations present in the batch (the dosage
             columns), computed on the host when the batch is built, or None: models then
             find them with ``torch.unique``, which synchronises a GPU with the host.
    host_dosage: the dosage as a CPU tensor (kept on the host by :meth:`to`), for per-batch
             bookkeeping that is done on the host (SVAE+'s labels), or None.
    batch_index: (B,) int64 batch covariate of each cell (its column in the one-hot over
             ``ScreenData.batch_categories``: the one-hot in index form, as the dosage is a
             CSR), or None when the screen has no batch key.
    """
    counts: torch.Tensor
    dosage: torch.Tensor
    library: torch.Tensor
    index: torch.Tensor
    perturbations: Optional[torch.Tensor] = None
    host_dosage: Optional[torch.Tensor] = None
    batch_index: Optional[torch.Tensor] = None

    def to(self, device, non_blocking: bool = False) -> "Batch":
        """The batch on ``device``. To a GPU the host tensors are pinned first and copied with
        ``non_blocking=True``: a copy from pageable memory would wait for the device."""
        device = torch.device(device)
        to_gpu = device.type == "cuda" and self.index.device.type == "cpu"

        def move(t):
            if t is None:
                return None
            if to_gpu:
                return _pinned(t).to(device, non_blocking=True)
            return t.to(device, non_blocking=non_blocking)

        host = self.host_dosage
        if host is None and self.dosage.device.type == "cpu":
            host = self.dosage
        return Batch(move(self.counts), move(self.dosage), move(self.library), move(self.index),
                     move(self.perturbations), host, move(self.batch_index))

    def __len__(self) -> int:
        return int(self.index.shape[0])


def _pinned(t: torch.Tensor) -> torch.Tensor:
    """``t`` in page-locked memory (CSR tensors part by part), for asynchronous copies."""
    if t.layout == torch.sparse_csr:
        return torch.sparse_csr_tensor(t.crow_indices().pin_memory(),
                                       t.col_indices().pin_memory(), t.values().pin_memory(),
                                       size=t.shape, check_invariants=False)
    return t.pin_memory()


def batch_perturbation_ids(dosage: sp.csr_matrix) -> torch.Tensor:
    """(U,) int64 sorted ids of the dosage columns present in a batch (host side)."""
    return torch.from_numpy(np.unique(dosage.indices).astype(np.int64))


def batch_codes(screen, rows: np.ndarray) -> Optional[torch.Tensor]:
    """(B,) int64 batch covariate of ``rows`` (None when the screen has no batch key)."""
    codes = getattr(screen, "batch_codes", None)
    return None if codes is None else torch.from_numpy(np.asarray(codes[rows], dtype=np.int64))


def make_batch(screen, rows: np.ndarray) -> Batch:
    """The :class:`Batch` of rows ``rows`` (int64, any order) of ``screen``."""
    rows = np.asarray(rows, dtype=np.int64)
    dosage = screen.dosage[rows]
    return Batch(
        counts=csr_to_torch(screen.rows(rows)),
        dosage=csr_to_torch(dosage),
        library=torch.from_numpy(screen.library[rows].astype(np.float32)),
        index=torch.from_numpy(rows.copy()),
        perturbations=batch_perturbation_ids(dosage),
        batch_index=batch_codes(screen, rows),
    )


def check_indices(screen, indices) -> np.ndarray:
    """Validate row numbers (or a boolean mask) of ``screen``; returns them as int64 (n,)."""
    idx = np.asarray(indices)
    if idx.dtype == np.bool_:
        if idx.shape != (screen.n_cells,):
            raise ValueError(f"a boolean mask of indices needs shape ({screen.n_cells},), "
                             f"got {idx.shape}")
        idx = np.flatnonzero(idx)
    if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
        raise ValueError("indices must be a 1-D array of integer row numbers (or a bool mask)")
    idx = idx.astype(np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= screen.n_cells):
        raise IndexError(f"indices must lie in [0, {screen.n_cells}) (rows of the ScreenData)")
    return idx


def set_loader_options(loader, screen, indices, batch_size, *, shuffle, seed, drop_last,
                       device) -> None:
    """The checked options every loader of screen rows holds (``screen``, ``indices`` (n,)
    int64, ``batch_size``, ``shuffle``, ``seed``, ``drop_last``, ``device``, ``epoch`` 0)."""
    idx = check_indices(screen, indices)
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    loader.screen = screen
    loader.indices = idx
    loader.batch_size = int(batch_size)
    loader.shuffle = bool(shuffle)
    loader.seed = int(seed)
    loader.drop_last = bool(drop_last)
    loader.device = torch.device(device)
    loader.epoch = 0


class MinibatchLoader:
    """Iterate over rows ``indices`` of a ScreenData in batches of ``batch_size``.

    indices: (n,) int row numbers, or an (n_cells,) bool mask.
    shuffle: permute the rows each epoch with a generator seeded by ``(seed, epoch)``; set the
             epoch with :meth:`set_epoch` (the same epoch gives the same order, as
             ``torch.utils.data.DistributedSampler``). ``shuffle=False`` keeps ``indices``' order.
    drop_last: skip a final batch smaller than ``batch_size``.
    device:  where the yielded batches live.
    """

    def __init__(self, screen, indices, batch_size: int = 512, *, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False, device="cpu"):
        set_loader_options(self, screen, indices, batch_size, shuffle=shuffle, seed=seed,
                           drop_last=drop_last, device=device)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose shuffle order the next iteration uses."""
        self.epoch = int(epoch)

    def epoch_order(self) -> np.ndarray:
        """(n,) int64: the rows in the order this epoch visits them."""
        if not self.shuffle:
            return self.indices
        rng = np.random.default_rng([self.seed, self.epoch])
        return self.indices[rng.permutation(self.indices.size)]

    def __len__(self) -> int:
        n = self.indices.size
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        order = self.epoch_order()
        for b in range(len(self)):
            batch = make_batch(self.screen, order[b * self.batch_size:(b + 1) * self.batch_size])
            yield batch if self.device.type == "cpu" else batch.to(self.device)
