"""The data statistics of an out-of-core run, from ONE streaming pass over the count matrix.

Training from a backed .h5ad needs, before the first step: the library size of every cell (to
drop empty cells and for the likelihood), a check that the counts are raw integers, the
per-gene mean/std of ``log1p(counts)`` over the TRAINING cells (the encoder's input
standardisation) and N_t, the training cells carrying each perturbation. The last comes from
the labels (in memory). The others come from one sequential pass over ``X`` in row blocks,
which needs the training cells before the pass, and those depend on which cells are empty.
The pass therefore starts from the cells with at least one stored entry (``indptr`` alone);
a cell whose stored entries are all zero is only found by the pass, and then (rare) the split
is redone and the gene statistics get a second pass.

Under data parallelism each rank scans a contiguous block of rows and the partial results are
gathered (``comm``), so the pass takes 1 / world_size of the time.

The result is cached in ``RUN_DIR/data_stats.npz`` keyed by the file (path, size,
modification time) and the matrix; a resumed run (or ``samsvae evaluate``) reuses it without
touching the counts, unless the file changed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Protocol

import h5py
import numpy as np

from .backed import BackedCSR, open_csr_group
from .perturbations import perturbation_cell_counts
from .validate import check_count_values

CACHE_FORMAT = "samsvae-data-stats-v1"
CACHE_NAME = "data_stats.npz"
SCAN_CHUNK_ENTRIES = 1 << 23  # stored values per block of the pass (~64 MB of data + indices)
MIN_STD = 1e-6  # same rule as samsvae.data.gene_log1p_stats


class Comm(Protocol):
    """What the pass needs from a process group (see ``samsvae.train.distributed.TorchComm``)."""
    rank: int
    world_size: int

    def all_gather_object(self, obj) -> list: ...


@dataclass
class DataStats:
    """Statistics of a screen's counts (shapes: n_obs rows of the file, G genes, T perturbations).

    library:             (n_obs,) float64 total counts of every row of the file (UMIs).
    gene_log1p_mean:     (G,) float64 mean of log1p(counts) over the training cells.
    gene_log1p_std:      (G,) float64 its standard deviation (values below 1e-6 replaced by 1).
    perturbation_counts: (T,) int64 training cells with each perturbation.
    n_train:             number of training cells.
    train_digest:        hash of the training cells' file rows (cache validity).
    fingerprint:         the file identity the numbers belong to (see :func:`file_fingerprint`).
    seconds:             time the pass took (0 when read from the cache).
    bytes_read:          bytes of the count matrix read by the pass (all ranks).
    from_cache:          True when loaded from ``data_stats.npz``.
    """
    library: np.ndarray
    gene_log1p_mean: np.ndarray
    gene_log1p_std: np.ndarray
    perturbation_counts: np.ndarray
    n_train: int
    train_digest: str
    fingerprint: dict
    seconds: float = 0.0
    bytes_read: int = 0
    from_cache: bool = False


# --------------------------------------------------------------------------------------------
# the pass

def _row_blocks(indptr: np.ndarray, start: int, stop: int, chunk_entries: int):
    """Consecutive ``(lo, hi)`` row ranges of [start, stop) holding about ``chunk_entries``."""
    row = start
    while row < stop:
        end = int(np.searchsorted(indptr, indptr[row] + chunk_entries, side="right")) - 1
        end = min(max(end, row + 1), stop)
        yield row, end
        row = end


def scan_counts(path, key: str = "X", train_rows: Optional[np.ndarray] = None, *,
                row_range: Optional[tuple] = None, chunk_entries: int = SCAN_CHUNK_ENTRIES,
                source: str = "adata.X", fix: str = "") -> dict:
    """One sequential pass over rows ``row_range`` (default all) of the on-disk CSR ``key``.

    Args:
        path: the .h5ad file; key: ``"X"`` or ``"layers/<name>"``.
        train_rows: (n_obs,) bool, rows whose log1p counts enter the gene statistics
            (None: no gene statistics).
        row_range: ``(start, stop)`` file rows to scan.

    Returns a partial result to merge with :func:`merge_scans`: ``{"start", "stop", "library"
    (stop - start,) float64, "n", "mean" (G,), "m2" (G,), "bytes"}`` where ``mean``/``m2`` are
    the count, mean and sum of squared deviations of log1p(counts) over the training rows
    scanned (zeros included). Raises ValueError naming the problem when a value is not a
    finite non-negative integer.
    """
    reader = BackedCSR(path, key, max_gap=0)
    try:
        n_rows, n_genes = reader.source_shape
        start, stop = (0, n_rows) if row_range is None else (int(row_range[0]), int(row_range[1]))
        library = np.zeros(stop - start, dtype=np.float64)
        n, mean, m2 = 0, np.zeros(n_genes), np.zeros(n_genes)
        for lo, hi in _row_blocks(reader._indptr, start, stop, chunk_entries):
            block = reader.read_rows(np.arange(lo, hi))
            data = block.data
            check_count_values(data, source=source, fix=fix)
            lengths = np.diff(block.indptr)
            csum = np.zeros(data.size + 1, dtype=np.float64)
            np.cumsum(data, dtype=np.float64, out=csum[1:])
            library[lo - start:hi - start] = csum[block.indptr[1:]] - csum[block.indptr[:-1]]
            if train_rows is None:
                continue
            keep = train_rows[lo:hi]
            nb = int(keep.sum())
            if nb == 0:
                continue
            entry_keep = np.repeat(keep, lengths)
            cols = block.indices[entry_keep]
            vals = np.log1p(data[entry_keep].astype(np.float64))
            s = np.bincount(cols, weights=vals, minlength=n_genes)
            mean_b = s / nb
            dev = vals - mean_b[cols]
            nz = np.bincount(cols, minlength=n_genes)
            m2_b = (np.bincount(cols, weights=dev * dev, minlength=n_genes)
                    + (nb - nz) * mean_b * mean_b)
            n, mean, m2 = _chan(n, mean, m2, nb, mean_b, m2_b)
        return {"start": start, "stop": stop, "library": library, "n": n, "mean": mean,
                "m2": m2, "bytes": reader.bytes_read}
    finally:
        reader.close()


def _chan(n, mean, m2, nb, mean_b, m2_b):
    """Merge two (count, mean, sum of squared deviations) summaries (Chan et al.)."""
    if nb == 0:
        return n, mean, m2
    if n == 0:
        return nb, mean_b, m2_b
    total = n + nb
    delta = mean_b - mean
    return total, mean + delta * (nb / total), m2 + m2_b + delta * delta * (n * nb / total)


def merge_scans(parts: list, n_rows: int) -> tuple:
    """Combine :func:`scan_counts` partials covering [0, n_rows): ``(library, n, mean, std)``."""
    library = np.zeros(n_rows, dtype=np.float64)
    covered = np.zeros(n_rows, dtype=bool)
    n, mean, m2 = 0, None, None
    for part in sorted(parts, key=lambda p: p["start"]):
        library[part["start"]:part["stop"]] = part["library"]
        covered[part["start"]:part["stop"]] = True
        if mean is None:
            n, mean, m2 = part["n"], part["mean"], part["m2"]
        else:
            n, mean, m2 = _chan(n, mean, m2, part["n"], part["mean"], part["m2"])
    if not covered.all():
        raise RuntimeError("the partial scans do not cover every row (internal error)")
    std = np.sqrt(np.maximum(m2 / max(n, 1), 0.0))
    std[std < MIN_STD] = 1.0
    return library, n, mean, std


def distributed_scan(path, key, train_rows, n_rows: int, comm: Optional[Comm] = None,
                     **kwargs) -> tuple:
    """:func:`scan_counts` of all rows, split in contiguous blocks over the ranks of ``comm``.

    Returns ``(library (n_rows,), n_train, mean (G,), std (G,), bytes read)`` on every rank.
    An error on any rank (e.g. non-integer counts) is raised on every rank.
    """
    rank, world = (0, 1) if comm is None else (comm.rank, comm.world_size)
    lo, hi = rank * n_rows // world, (rank + 1) * n_rows // world
    try:
        part = scan_counts(path, key, train_rows, row_range=(lo, hi), **kwargs)
    except Exception as exc:  # every rank must reach the gather, then all raise
        if comm is None:
            raise
        part = {"error": f"{type(exc).__name__}: {exc}", "exc": exc}
    parts = [part] if comm is None else comm.all_gather_object(
        {k: v for k, v in part.items() if k != "exc"})
    failed = [p["error"] for p in parts if "error" in p]
    if failed:
        if "exc" in part:
            raise part["exc"]
        raise ValueError(f"another rank failed while scanning {path}: {failed[0]}")
    library, n, mean, std = merge_scans(parts, n_rows)
    return library, n, mean, std, int(sum(p["bytes"] for p in parts))


# --------------------------------------------------------------------------------------------
# cache

def file_fingerprint(path, key: str) -> dict:
    """Identity of the counts a cache belongs to: absolute path, size, mtime (ns), matrix."""
    st = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": int(st.st_size),
            "mtime_ns": int(st.st_mtime_ns), "key": key}


def train_digest(rows: np.ndarray) -> str:
    """Short hash of sorted file rows (which cells the gene statistics were taken over)."""
    return hashlib.sha1(np.sort(np.asarray(rows, dtype=np.int64)).tobytes()).hexdigest()[:16]


def write_cache(path, stats: DataStats) -> Path:
    """Write ``stats`` to ``path`` (npz) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, format=np.array(CACHE_FORMAT), library=stats.library,
                     gene_log1p_mean=stats.gene_log1p_mean, gene_log1p_std=stats.gene_log1p_std,
                     perturbation_counts=stats.perturbation_counts,
                     n_train=np.array(stats.n_train), train_digest=np.array(stats.train_digest),
                     fingerprint=np.array(json.dumps(stats.fingerprint)))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_cache(path, fingerprint: dict) -> Optional[DataStats]:
    """The cached statistics at ``path`` if they belong to ``fingerprint``, else None."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["format"]) != CACHE_FORMAT:
                return None
            saved = json.loads(str(z["fingerprint"]))
            if saved != fingerprint:
                return None
            return DataStats(library=z["library"], gene_log1p_mean=z["gene_log1p_mean"],
                             gene_log1p_std=z["gene_log1p_std"],
                             perturbation_counts=z["perturbation_counts"],
                             n_train=int(z["n_train"]), train_digest=str(z["train_digest"]),
                             fingerprint=saved, from_cache=True)
    except (OSError, KeyError, ValueError) as exc:
        warnings.warn(f"ignoring unreadable statistics cache {path} ({exc}); recomputing",
                      stacklevel=2)
        return None


def cached_library(cache_path, data_path, key: str = "X") -> Optional[np.ndarray]:
    """(n_obs,) library sizes from a run's cache when it belongs to ``data_path``, else None."""
    if cache_path is None or not Path(data_path).is_file():
        return None
    stats = read_cache(cache_path, file_fingerprint(data_path, key))
    return None if stats is None else stats.library


# --------------------------------------------------------------------------------------------
# screen + split + statistics

def _row_nnz(path: str, key: str) -> np.ndarray:
    with h5py.File(path, "r") as f:
        indptr = open_csr_group(f, key, path)["indptr"][:].astype(np.int64, copy=False)
    return np.diff(indptr)


def _train_rows_mask(screen, split: np.ndarray, n_obs: int) -> tuple:
    train_idx = np.flatnonzero(np.asarray(split).astype(str) == "train").astype(np.int64)
    rows = np.asarray(screen.cell_index, dtype=np.int64)[train_idx]
    mask = np.zeros(n_obs, dtype=bool)
    mask[rows] = True
    return train_idx, rows, mask


def load_backed_screen(path, split_fn: Callable, *, cache_path=None, comm: Optional[Comm] = None,
                       log: Optional[Callable[[str], None]] = None, **load_options) -> tuple:
    """Open a backed screen, split it and compute its statistics in one pass over the counts.

    Args:
        path: the .h5ad file (CSR counts in ``X`` or ``layers[layer]``).
        split_fn: ``split_fn(screen) -> (n_cells,) str`` train/val/test of the screen's cells
            (e.g. ``make_split``, or reading a resumed run's ``split.csv``).
        cache_path: ``RUN_DIR/data_stats.npz`` to reuse/write (None: no cache). Only rank 0
            writes it.
        comm: process group under data parallelism (the pass is shared between ranks).
        log: receives one line about the pass (or the cache hit).
        **load_options: :func:`samsvae.data.load_screen` keyword arguments (layer,
            perturbation_key, control_label, drop_labels, ...); ``backed`` is implied.

    Returns:
        ``(screen, split, stats)``: the backed :class:`ScreenData` (library filled in), its
        split, and :class:`DataStats` (gene statistics over the training cells).
    """
    from .screen import load_screen

    path = os.fspath(path)
    load_options = {k: v for k, v in load_options.items() if k != "backed"}
    layer = load_options.get("layer")
    key = f"layers/{layer}" if layer else "X"
    source = f"adata.layers[{layer!r}]" if layer else "adata.X"
    fingerprint = file_fingerprint(path, key)
    say = log or (lambda line: None)
    rank = 0 if comm is None else comm.rank

    cached = read_cache(cache_path, fingerprint) if cache_path is not None else None
    if comm is not None and not all(comm.all_gather_object(cached is not None)):
        cached = None  # e.g. a node that does not see the run directory: all ranks scan
    if cached is not None:
        screen = load_screen(path, backed=True, library=cached.library, **load_options)
        split = np.asarray(split_fn(screen)).astype(str)
        train_idx, rows, _ = _train_rows_mask(screen, split, cached.library.size)
        if train_digest(rows) == cached.train_digest:
            say(f"data statistics: reused {cache_path}")
            counts = perturbation_cell_counts(screen.dosage, train_idx)
            return screen, split, dataclasses.replace(cached, perturbation_counts=counts)
        say(f"data statistics: {cache_path} was computed for other training cells; recomputing")

    t0 = time.perf_counter()
    nnz = _row_nnz(path, key)
    n_obs = nnz.size
    # Cells with no stored entry are empty for sure; the pass confirms the others.
    provisional = (nnz > 0).astype(np.float64)
    screen = load_screen(path, backed=True, library=provisional, **load_options)
    split = np.asarray(split_fn(screen)).astype(str)
    train_idx, rows, mask = _train_rows_mask(screen, split, n_obs)
    fix = ("Pass raw counts: put them in X or name their layer with layer='counts'.")
    library, n_train, mean, std, nbytes = distributed_scan(path, key, mask, n_obs, comm,
                                                           source=source, fix=fix)
    kept = np.asarray(screen.cell_index, dtype=np.int64)
    if np.any(library[kept] == 0):
        # rows whose stored entries are all zeros: drop them as load_screen would, redo the
        # split, and take the gene statistics over the new training cells (a second pass)
        screen = load_screen(path, backed=True, library=library, **load_options)
        split = np.asarray(split_fn(screen)).astype(str)
        train_idx, rows, mask = _train_rows_mask(screen, split, n_obs)
        _, n_train, mean, std, more = distributed_scan(path, key, mask, n_obs, comm,
                                                       source=source, fix=fix)
        nbytes += more
    else:
        screen = dataclasses.replace(screen, library=library[kept])
    seconds = time.perf_counter() - t0
    stats = DataStats(library=library, gene_log1p_mean=mean, gene_log1p_std=std,
                      perturbation_counts=perturbation_cell_counts(screen.dosage, train_idx),
                      n_train=int(n_train), train_digest=train_digest(rows),
                      fingerprint=fingerprint, seconds=seconds, bytes_read=nbytes)
    world = 1 if comm is None else comm.world_size
    say(f"data statistics: one pass over {n_obs:,} cells ({nbytes / 2**30:.2f} GiB read by "
        f"{world} process{'es' if world > 1 else ''}) in {seconds:.1f} s "
        f"({nbytes / 2**20 / max(seconds, 1e-9):,.0f} MiB/s)")
    if cache_path is not None and rank == 0:
        write_cache(cache_path, stats)
    return screen, split, stats
