"""Minibatches streamed from a count matrix on disk: chunked shuffling, a prefetch thread, shards.

:class:`StreamingLoader` is a drop-in for :class:`~samsvae.data.MinibatchLoader` (same
``set_epoch`` / ``len`` / iteration, same :class:`~samsvae.data.Batch`) whose reads suit a
backed .h5ad of any size:

* **Chunks.** The cells (sorted by file row) are cut into chunks of ``chunk_rows`` consecutive
  cells. Each epoch permutes the chunk order (seeded by ``(seed, epoch)``).
* **Buffer.** The permuted sequence is consumed ``buffer_chunks`` chunks at a time (a "fill");
  a fill is read in file order, each run of adjacent rows with one sequential read (with
  ``max_gap > 0``, runs closer than that many stored entries are merged into one read), and
  its cells are shuffled together (seeded by ``(seed, epoch, rank,
  fill)``). Batches are cut from the concatenation of the shuffled fills, so a batch that
  crosses a fill boundary takes the end of one fill and the start of the next.
  How random: a batch holds cells of at most ``2 * buffer_chunks`` chunks, i.e. of
  ``2 * buffer_chunks`` random regions of the file of ``chunk_rows`` cells each. If the file is
  sorted by perturbation (common for real screens), keep ``chunk_rows`` small relative to the
  cells per perturbation, or the batches will hold few perturbations; a randomly ordered file
  (or ``chunk_rows=1``) gives uniformly shuffled batches. In memory (not backed) the default
  ``chunk_rows`` is 1: a uniform permutation, as MinibatchLoader.
* **Prefetch.** A background thread reads fills and assembles batches into a queue of
  ``prefetch_batches`` while the caller computes; the direct reads of uncompressed files
  (``os.preadv``) and HDF5's reads release the GIL, so reading overlaps compute. Resident
  memory is at most about two fills plus the queue, whatever the number of cells:
  ``(2 * buffer_chunks * chunk_rows + prefetch_batches * batch_size) * bytes per cell``.
* **Shards.** With ``world_size > 1`` each epoch's permuted sequence is cut into
  ``world_size`` contiguous pieces whose sizes differ by at most one: rank ``r`` reads only
  piece ``r`` (disjoint, covering). ``batch_size`` is the GLOBAL batch: rank ``r`` takes
  ``batch_size // world_size`` cells per step (one more for the first ``batch_size %
  world_size`` ranks), and every rank yields the same number of batches per epoch,
  ``ceil(cells / batch_size)`` (``floor`` with ``drop_last``), none of them empty.

With ``shuffle=False`` nothing is permuted: the cells come in the order of ``indices`` (as
MinibatchLoader with ``shuffle=False``), still read fill by fill.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Iterator, Optional

import numpy as np
import scipy.sparse as sp
import torch

from .backed import BackedCSR
from .loader import (Batch, batch_codes, batch_perturbation_ids, csr_to_torch,
                     set_loader_options)

DEFAULT_CHUNK_ROWS = 1024      # backed: cells per contiguous read unit
DEFAULT_BUFFER_CHUNKS = 16     # chunks shuffled together
DEFAULT_PREFETCH_BATCHES = 8   # batches assembled ahead of the consumer
# Rows are read as runs of adjacent rows (one os.preadv each): reading through the gap between
# two runs and dropping it afterwards costs an extra copy of everything read, which on local
# disks and the page cache is slower than the extra calls. Raise it for high-latency storage.
DEFAULT_MAX_GAP = 0

_END = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc




def local_batch_size(batch_size: int, rank: int, world_size: int) -> int:
    """Cells rank ``rank`` contributes to a global batch of ``batch_size``."""
    return batch_size // world_size + (1 if rank < batch_size % world_size else 0)


def batch_sizes(n_local: int, n_batches: int, size: int, drop_last: bool) -> np.ndarray:
    """(n_batches,) sizes, all >= 1, of the batches of a piece of ``n_local`` cells.

    Batches of ``size`` cells and one smaller last batch (the remainder), as a single-process
    loader; when the piece cannot give ``n_batches`` such batches (it is one cell short of the
    other ranks', or the remainder would be empty), its cells are spread evenly instead.
    With ``drop_last`` the cells beyond ``n_batches * size`` are not used.
    """
    if n_batches == 0:
        return np.zeros(0, dtype=np.int64)
    used = min(n_local, n_batches * size) if drop_last else n_local
    if used < n_batches:
        raise ValueError(f"a shard of {n_local} cells cannot fill {n_batches} batches; use a "
                         "larger batch size, fewer processes, or more cells")
    sizes = np.full(n_batches, size, dtype=np.int64)
    sizes[-1] = used - (n_batches - 1) * size
    if sizes[-1] < 1:
        sizes = np.full(n_batches, used // n_batches, dtype=np.int64)
        sizes[:used % n_batches] += 1
    return sizes


class StreamingLoader:
    """Iterate over rows ``indices`` of a ScreenData in batches read chunk by chunk.

    Args:
        screen: a ScreenData, backed (``load_screen(..., backed=True)``) or in memory.
        indices: (n,) int row numbers of the screen (or an (n_cells,) bool mask).
        batch_size: cells per step over ALL ranks (the global batch).
        shuffle: chunked shuffling (module docstring); False keeps the order of ``indices``.
        seed: seeds the chunk order and the in-buffer shuffles (with the epoch).
        drop_last: leave out the final partial global batch.
        device: where the yielded batches live.
        chunk_rows: consecutive cells per chunk (default 1024 backed, 1 in memory).
        buffer_chunks: chunks per fill (shuffled together).
        prefetch_batches: batches assembled ahead by the background thread (0: no thread).
        max_gap: backed reads merge runs of rows closer than this many stored entries into one
            read (default 0: only adjacent rows; raise it for high-latency storage).
        rank, world_size: this process's shard (data parallelism).
        even_batches: every rank yields ``ceil(n / batch_size)`` batches (training, where the
            ranks step together). False: each rank batches its own piece (evaluation, where
            ranks may hold different numbers of cells, even none).

    Attributes:
        stats: ``{"read_s", "wait_s", "bytes_read", "batches"}`` of the last iteration: time the
            thread spent reading, time the consumer waited for a batch, bytes read from disk.
    """

    def __init__(self, screen, indices, batch_size: int = 512, *, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False, device="cpu",
                 chunk_rows: Optional[int] = None, buffer_chunks: int = DEFAULT_BUFFER_CHUNKS,
                 prefetch_batches: int = DEFAULT_PREFETCH_BATCHES, max_gap: int = DEFAULT_MAX_GAP,
                 rank: int = 0, world_size: int = 1, even_batches: bool = True):
        set_loader_options(self, screen, indices, batch_size, shuffle=shuffle, seed=seed,
                           drop_last=drop_last, device=device)
        idx = self.indices
        if int(world_size) < 1 or not 0 <= int(rank) < int(world_size):
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size "
                             f"{world_size}")
        if even_batches and int(batch_size) < int(world_size):
            raise ValueError(f"the global batch ({batch_size} cells) must hold at least one cell "
                             f"per process ({world_size}); raise --batch-size")
        backed = isinstance(screen.counts, BackedCSR)
        if chunk_rows is None:
            chunk_rows = DEFAULT_CHUNK_ROWS if backed else 1
        for name, v in (("chunk_rows", chunk_rows), ("buffer_chunks", buffer_chunks)):
            if int(v) < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if int(prefetch_batches) < 0 or int(max_gap) < 0:
            raise ValueError("prefetch_batches and max_gap must be >= 0")
        self.chunk_rows = int(chunk_rows)
        self.buffer_chunks = int(buffer_chunks)
        self.prefetch_batches = int(prefetch_batches)
        self.max_gap = int(max_gap)
        self.rank, self.world_size = int(rank), int(world_size)
        self.even_batches = bool(even_batches)
        self.backed = backed
        self.stats = {"read_s": 0.0, "wait_s": 0.0, "bytes_read": 0, "batches": 0}
        # the cells in file order: chunks are runs of neighbouring rows
        self._sorted = np.sort(idx) if self.shuffle else idx
        self._local = local_batch_size(self.batch_size, self.rank, self.world_size)
        n = idx.size
        if self.even_batches:
            self._n_batches = n // self.batch_size if self.drop_last else -(-n // self.batch_size)
            if n // self.world_size < self._n_batches:
                raise ValueError(f"{n} cells cannot give each of {self.world_size} processes "
                                 f"{self._n_batches} non-empty batches; use a larger batch size "
                                 "or fewer processes")
        else:
            lo, hi = self._piece_bounds()
            m = hi - lo
            self._n_batches = m // self._local if self.drop_last else -(-m // self._local)

    # -- the plan ----------------------------------------------------------------------------

    @property
    def n_cells(self) -> int:
        """Cells per epoch over all ranks."""
        return int(self.indices.size)

    @property
    def fill_rows(self) -> int:
        return self.chunk_rows * self.buffer_chunks

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order the next iteration uses."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return int(self._n_batches)

    def _piece_bounds(self) -> tuple:
        n = self.indices.size
        return self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size

    def epoch_order(self) -> np.ndarray:
        """(n_local,) int64 rows this rank visits this epoch, in order (before drop_last)."""
        seq = self._sorted
        if self.shuffle:
            n_chunks = -(-seq.size // self.chunk_rows)
            perm = np.random.default_rng([self.seed, self.epoch]).permutation(n_chunks)
            starts = perm * self.chunk_rows
            ends = np.minimum(starts + self.chunk_rows, seq.size)
            lengths = ends - starts
            pos = np.repeat(starts - np.r_[0, np.cumsum(lengths)[:-1]], lengths) \
                + np.arange(seq.size, dtype=np.int64)
            seq = seq[pos]
        lo, hi = self._piece_bounds()
        piece = seq[lo:hi]
        if self.shuffle:
            piece = piece.copy()
            F = self.fill_rows
            for f, start in enumerate(range(0, piece.size, F)):
                rng = np.random.default_rng([self.seed, self.epoch, self.rank, f])
                piece[start:start + F] = piece[start:start + F][rng.permutation(
                    min(F, piece.size - start))]
        return piece

    def batch_plan(self) -> tuple:
        """``(order, offsets)``: batch ``j`` holds rows ``order[offsets[j]:offsets[j + 1]]``."""
        order = self.epoch_order()
        sizes = batch_sizes(order.size, len(self), self._local, self.drop_last)
        return order, np.r_[0, np.cumsum(sizes)].astype(np.int64)

    # -- iteration ---------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(0)

    def iter_from(self, position: int) -> Iterator[Batch]:
        """The epoch's batches from batch ``position`` on, without reading the skipped ones
        (how a resumed run continues mid-epoch)."""
        order, offsets = self.batch_plan()
        position = int(position)
        if not 0 <= position <= len(self):
            raise ValueError(f"position {position} is outside the epoch's {len(self)} batches")
        self.stats = {"read_s": 0.0, "wait_s": 0.0, "bytes_read": 0, "batches": 0}
        produce = self._produce(order, offsets, position)
        if self.prefetch_batches == 0:
            return self._deliver(produce)
        return self._threaded(produce)

    def _deliver(self, produce) -> Iterator[Batch]:
        for batch in produce:
            self.stats["batches"] += 1
            yield batch if self.device.type == "cpu" else batch.to(self.device, non_blocking=True)

    def _threaded(self, produce) -> Iterator[Batch]:
        q: queue.Queue = queue.Queue(maxsize=self.prefetch_batches)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work():
            try:
                for batch in produce:
                    if not put(batch):
                        return
                put(_END)
            except BaseException as exc:  # handed to the consumer, raised there
                put(_Failure(exc))
            finally:
                produce.close()

        thread = threading.Thread(target=work, name="samsvae-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                t0 = time.perf_counter()
                item = q.get()
                self.stats["wait_s"] += time.perf_counter() - t0
                if item is _END:
                    return
                if isinstance(item, _Failure):
                    raise item.exc
                self.stats["batches"] += 1
                yield (item if self.device.type == "cpu"
                       else item.to(self.device, non_blocking=True))
        finally:
            stop.set()
            while thread.is_alive():
                try:  # unblock a producer waiting on a full queue
                    q.get_nowait()
                except queue.Empty:
                    pass
                thread.join(timeout=0.05)

    def _produce(self, order: np.ndarray, offsets: np.ndarray, position: int):
        """Generator of the batches ``position ..`` (runs in the prefetch thread)."""
        screen = self.screen
        reader = screen.counts.reopen(max_gap=self.max_gap) if self.backed else None
        F = self.fill_rows
        loaded: dict = {}  # fill -> (CSR of the fill's rows sorted by file row, inverse map)
        try:
            for j in range(position, len(offsets) - 1):
                a, b = int(offsets[j]), int(offsets[j + 1])
                rows = order[a:b]
                if reader is None:
                    counts = screen.rows(rows)
                else:
                    f0, f1 = a // F, (b - 1) // F
                    for f in list(loaded):
                        if f < f0:
                            del loaded[f]
                    pieces = []
                    for f in range(f0, f1 + 1):
                        if f not in loaded:
                            loaded[f] = self._read_fill(reader, order[f * F:(f + 1) * F])
                        block, where = loaded[f]
                        lo, hi = max(a, f * F) - f * F, min(b, (f + 1) * F) - f * F
                        pieces.append(block[where[lo:hi]])
                    counts = pieces[0] if len(pieces) == 1 else sp.vstack(pieces, format="csr")
                dosage = screen.dosage[rows]
                yield Batch(counts=csr_to_torch(counts),
                            dosage=csr_to_torch(dosage),
                            library=torch.from_numpy(screen.library[rows].astype(np.float32)),
                            index=torch.from_numpy(rows.copy()),
                            perturbations=batch_perturbation_ids(dosage),
                            batch_index=batch_codes(screen, rows))
        finally:
            if reader is not None:
                reader.close()

    def _read_fill(self, reader: BackedCSR, rows: np.ndarray) -> tuple:
        """CSR of ``rows`` in file order and, per position in ``rows``, its row in that CSR."""
        t0, before = time.perf_counter(), reader.bytes_read
        order = np.argsort(rows, kind="stable")
        block = reader.read_rows(rows[order])
        where = np.empty_like(order)
        where[order] = np.arange(order.size)
        self.stats["read_s"] += time.perf_counter() - t0
        self.stats["bytes_read"] += reader.bytes_read - before
        return block, where
