"""AnnData -> :class:`ScreenData`: validated CSR counts, CSR dosage, library sizes, vocabulary.

Counts are read from ``X`` or a named layer, in memory or backed (``read_h5ad(path,
backed="r")``: rows are then read from the file on demand through :class:`BackedCSR`).
Validation (finite, non-negative, integer) runs on the stored CSR values; dense input is checked
as given and converted to CSR. Cells carrying a label in ``drop_labels`` and cells with zero
counts are removed (the latter with a warning giving their number).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import anndata
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .backed import BackedCSR, open_csr_group, scan_rows
from .options import current_style, opt
from .perturbations import (PerturbationDesign, design_from_dosage, noncell_labels, parse_labels,
                            perturbation_cell_counts, read_label_column, refuse_noncell_labels)
from .sparse import uniform_index_dtype
from .validate import check_count_values

SIMULATION_UNS_KEY = "samsvae_simulation"
# a perturbation carried by fewer cells than this (in the whole data) gets a warning at load
MIN_PERTURBATION_CELLS = 10
STAT_CHUNK_ROWS = 4096


@dataclass
class ScreenData:
    """A perturbation screen ready for training (AnnData-free).

    counts:              (n_cells, n_genes) raw counts: scipy CSR float32 in memory, or a
                         :class:`BackedCSR` reading the file.
    dosage:              (n_cells, T) CSR float32; control cells have empty rows.
    library:             (n_cells,) float64 total counts per cell over the modelled genes (UMIs).
    perturbations:       (T,) vocabulary, sorted; order of the dosage columns (control excluded).
    perturbation_counts: (T,) int64 kept cells with a non-zero dosage of each perturbation.
    gene_names:          (n_genes,) str.
    cell_names:          (n_cells,) obs_names of the kept cells.
    cell_index:          (n_cells,) int64 row of each kept cell in the source AnnData.
    labels:              (n_cells,) canonical label (control label, or perturbations joined by
                         the separator in vocabulary order).
    is_control:          (n_cells,) bool.
    control_label:       the control label (None when unknown).
    obs:                 obs of the kept cells (split columns go here).
    ground_truth:        simulator truth (``uns["samsvae_simulation"]``) with ``masks``,
                         ``embeddings`` and ``perturbations`` reordered to this vocabulary;
                         None for real data.
    separator:           combination separator used in ``labels``.
    dropped:             ``{reason: cells}`` of the cells left out, e.g.
                         ``{"drop_labels: unassigned": 662, "zero counts": 3}``.
    batch_key:           obs column of the batch covariate (e.g. the cell line), or None.
    batch_categories:    (n_batches,) names of the batches (sorted, or the run's order), or None.
    batch_codes:         (n_cells,) int64 position of each cell's batch in ``batch_categories``
                         (the column of its one-hot), or None without a batch key.
    """
    counts: Union[sp.csr_matrix, BackedCSR]
    dosage: sp.csr_matrix
    library: np.ndarray
    perturbations: list
    perturbation_counts: np.ndarray
    gene_names: np.ndarray
    cell_names: np.ndarray
    cell_index: np.ndarray
    labels: np.ndarray
    is_control: np.ndarray
    control_label: Optional[str]
    obs: pd.DataFrame
    ground_truth: Optional[dict] = None
    separator: str = field(default="+")
    dropped: dict = field(default_factory=dict)
    batch_key: Optional[str] = None
    batch_categories: Optional[list] = None
    batch_codes: Optional[np.ndarray] = None

    @property
    def n_batches(self) -> int:
        """Number of batches of the covariate (0 without a batch key)."""
        return 0 if self.batch_categories is None else len(self.batch_categories)

    @property
    def n_cells(self) -> int:
        return int(self.counts.shape[0])

    @property
    def n_genes(self) -> int:
        return int(self.counts.shape[1])

    @property
    def n_perturbations(self) -> int:
        return int(self.dosage.shape[1])

    @property
    def is_backed(self) -> bool:
        return isinstance(self.counts, BackedCSR)

    def rows(self, idx: np.ndarray) -> sp.csr_matrix:
        """Counts of rows ``idx`` (any order, repeats allowed): CSR (len(idx), n_genes) float32."""
        idx = np.asarray(idx, dtype=np.int64)
        if isinstance(self.counts, BackedCSR):
            return self.counts.rows(idx)
        return self.counts[idx]

    def n_components(self) -> np.ndarray:
        """(n_cells,) int64 number of distinct perturbations of each cell (0 for controls)."""
        return np.diff(self.dosage.indptr).astype(np.int64)

    def __repr__(self) -> str:
        kind = "backed" if self.is_backed else "in memory"
        return (f"ScreenData({self.n_cells} cells x {self.n_genes} genes, "
                f"{self.n_perturbations} perturbations, {int(self.is_control.sum())} controls, "
                f"counts {kind})")


# --------------------------------------------------------------------------------------------
# counts

def _counts_fix(layer: Optional[str], layers: Sequence[str]) -> str:
    names = ", ".join(map(repr, layers)) or "none"
    where = f"layer {layer!r}" if layer else "X"
    return (f"Pass raw counts: put them in X or name their layer with {opt('layer', 'counts')} "
            f"(this read {where}; available layers: {names}).")


def _in_memory_counts(matrix, source: str, fix: str):
    """Validate an in-memory matrix; return (CSR with canonical format, library (n,) float64)."""
    if matrix is None:
        raise ValueError(f"{source} is empty (None); {fix}")
    if sp.issparse(matrix):
        csr = matrix.tocsr() if matrix.format != "csr" else matrix
        if not csr.has_canonical_format:
            csr = csr.copy()
            csr.sum_duplicates()
        check_count_values(csr.data, source=source, fix=fix)
    else:
        if hasattr(matrix, "to_memory"):
            matrix = matrix.to_memory()
        arr = np.asarray(matrix)
        if arr.ndim != 2:
            raise ValueError(f"{source} must be a 2-D cells x genes matrix, got shape {arr.shape}")
        check_count_values(arr.ravel(), source=source, fix=fix)
        csr = sp.csr_matrix(arr)
    csr = uniform_index_dtype(csr)  # before any row slicing (see uniform_index_dtype)
    library = np.asarray(csr.sum(axis=1, dtype=np.float64)).ravel()
    return csr, library


def _backed_counts(path: str, key: str, source: str, fix: str) -> np.ndarray:
    """Validate an on-disk CSR matrix by streaming it; return library (n,) float64."""
    with h5py.File(path, "r") as f:
        group = open_csr_group(f, key, path)
        n_rows = int(group.attrs["shape"][0])
        library = np.empty(n_rows, dtype=np.float64)
        for row, local_ptr, data in scan_rows(group):
            check_count_values(data, source=source, fix=fix)
            csum = np.zeros(data.size + 1, dtype=np.float64)
            np.cumsum(data, dtype=np.float64, out=csum[1:])
            library[row:row + local_ptr.size - 1] = csum[local_ptr[1:]] - csum[local_ptr[:-1]]
    return library


def library_sizes(counts, chunk_rows: int = STAT_CHUNK_ROWS) -> np.ndarray:
    """(n_cells,) float64 sum of counts per row of a CSR matrix or :class:`BackedCSR`."""
    if isinstance(counts, BackedCSR):
        out = np.empty(counts.shape[0], dtype=np.float64)
        for start, block in counts.iter_chunks(chunk_rows):
            out[start:start + block.shape[0]] = np.asarray(block.sum(axis=1, dtype=np.float64)).ravel()
        return out
    return np.asarray(counts.sum(axis=1, dtype=np.float64)).ravel()


# --------------------------------------------------------------------------------------------
# load_screen

def _open(adata_or_path, backed: bool):
    """(AnnData, whether we opened a backed file that must be closed after reading)."""
    if isinstance(adata_or_path, anndata.AnnData):
        return adata_or_path, False
    path = os.fspath(adata_or_path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    return anndata.read_h5ad(path, backed="r" if backed else None), bool(backed)


def _simulation_truth(uns, vocab: list) -> Optional[dict]:
    truth = uns.get(SIMULATION_UNS_KEY) if uns is not None else None
    if truth is None:
        return None
    truth = dict(truth)
    names = [str(n) for n in np.asarray(truth["perturbations"]).ravel()]
    pos = {n: i for i, n in enumerate(names)}
    missing = [n for n in vocab if n not in pos]
    if missing:
        raise ValueError(f"uns[{SIMULATION_UNS_KEY!r}] lacks ground truth for perturbations "
                         f"{missing[:5]}; the file's truth does not match its labels")
    order = np.asarray([pos[n] for n in vocab], dtype=np.int64)
    truth["masks"] = np.asarray(truth["masks"])[order]
    truth["embeddings"] = np.asarray(truth["embeddings"])[order]
    truth["perturbations"] = np.asarray(vocab, dtype=str)
    return truth


def check_not_empty(adata) -> None:
    """The one message for an AnnData without cells or genes (API and CLI alike)."""
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(f"the data is empty ({adata.n_obs} cells x {adata.n_vars} genes): "
                         "nothing to model; pass the screen with its cells and genes")


def load_screen(adata_or_path, *, layer: Optional[str] = None, perturbation_key: str = "perturbation",
                separator: str = "+", control_label: Optional[str] = None,
                drop_labels: Sequence[str] = (), dosage_key: Optional[str] = None,
                backed: bool = False, library: Optional[np.ndarray] = None,
                keep_labels: Sequence[str] = (), batch_key: Optional[str] = None,
                batch_categories: Optional[Sequence[str]] = None) -> ScreenData:
    """Read a perturbation screen from an AnnData (or an .h5ad path) into a :class:`ScreenData`.

    adata_or_path:    AnnData (in memory or backed) or path to an .h5ad file.
    layer:            counts layer; None reads ``X``. Counts must be raw integer UMIs.
    perturbation_key: obs column of labels (combinations joined by ``separator``).
    control_label:    label of unperturbed cells; None detects one of control/ctrl/
                      non-targeting/NT.
    drop_labels:      labels whose cells are removed (e.g. ``["unassigned"]``).
    keep_labels:      labels that look like non-cells (:data:`~samsvae.data.perturbations.
                      NONCELL_LABELS`: unassigned, multiplet, NA, nan, None, empty, ...) but
                      are real perturbations to model. Any other such label is refused: name
                      it in ``drop_labels`` or here.
    dosage_key:       read a precomputed (cells x perturbations) dosage matrix from
                      ``obsm[dosage_key]`` instead of labels (names from
                      ``uns[dosage_key + "_names"]`` or the DataFrame columns, else P0..).
    backed:           for a path: open it backed and read count rows from disk on demand.
    library:          (n_obs,) float64 total counts of EVERY row of the file/AnnData, known
                      already (e.g. cached by :mod:`samsvae.data.stream_stats`): skips the pass
                      over the counts that computes and validates them. Used with backed files.

    Cells with zero counts are dropped with a warning; ``dropped`` of the result counts the cells
    left out by reason. Perturbations carried by fewer than 10 cells are listed in a warning.
    Duplicated gene names, an empty AnnData and data without any perturbed cell are refused.
    In memory, ``counts`` shares memory with
    the AnnData when it is already float32 CSR and no cell is dropped.
    """
    adata, opened_backed = _open(adata_or_path, backed)
    try:
        screen = _load(adata, layer=layer, perturbation_key=perturbation_key,
                       separator=separator, control_label=control_label,
                       drop_labels=drop_labels, dosage_key=dosage_key, library=library,
                       keep_labels=keep_labels)
        if batch_key is not None:
            screen = with_batches(screen, batch_key, batch_categories)
        return screen
    finally:
        if opened_backed:  # rows are read through BackedCSR's own handle
            adata.file.close()


def _load(adata, *, layer, perturbation_key, separator, control_label, drop_labels,
          dosage_key, library=None, keep_labels=()) -> ScreenData:
    is_backed = bool(adata.isbacked)
    n_obs = adata.n_obs
    check_not_empty(adata)
    if not adata.var_names.is_unique:
        dup = pd.Index(adata.var_names)[pd.Index(adata.var_names).duplicated()].unique()
        raise ValueError(
            f"{len(dup)} gene name(s) occur more than once in var_names, e.g. "
            f"{[str(g) for g in dup[:5]]}; make them unique with adata.var_names_make_unique() "
            "(and save the file again) or drop the duplicated genes")
    if is_backed:  # backed layers are read from the file itself
        with h5py.File(adata.filename, "r") as f:
            layer_names = list(f["layers"].keys()) if "layers" in f else []
    else:
        layer_names = list(adata.layers.keys())
    fix = _counts_fix(layer, layer_names)
    if layer is not None and layer not in layer_names:
        to_x = "leave out --layer" if current_style() == "cli" else "pass layer=None"
        raise ValueError(f"layer {layer!r} not found; available layers: {layer_names or 'none'}. "
                         f"Name one of them with {opt('layer', placeholder='name')}, or "
                         f"{to_x} to read X.")
    source = f"adata.layers[{layer!r}]" if layer else "adata.X"

    # Labels first (cheap): errors about them should not wait for a pass over the counts.
    drop = np.zeros(n_obs, dtype=bool)
    labels_raw = None
    if dosage_key is None or drop_labels:
        if dosage_key is None or perturbation_key in adata.obs.columns:
            labels_raw = read_label_column(adata.obs, perturbation_key)
    if drop_labels:
        if isinstance(drop_labels, str):
            drop_labels = [drop_labels]
        if labels_raw is None:
            raise ValueError(f"{opt('drop_labels', None)} needs the label column "
                             f"obs[{perturbation_key!r}]")
        values = labels_raw.to_numpy()
        absent = [lab for lab in drop_labels if not np.any(values == lab)]
        if absent:
            warnings.warn(f"drop labels {absent} do not occur in obs[{perturbation_key!r}] "
                          f"({opt('drop_labels', absent)})", stacklevel=3)
        drop = np.isin(values, np.asarray(list(drop_labels), dtype=object))
    dropped = {}
    if drop.any():
        names, counts = np.unique(labels_raw.to_numpy()[drop].astype(str), return_counts=True)
        dropped.update({f"drop_labels: {n}": int(c) for n, c in zip(names, counts)})
    if labels_raw is not None and dosage_key is None:
        keep_labels = [keep_labels] if isinstance(keep_labels, str) else (keep_labels or ())
        refuse_noncell_labels(noncell_labels(labels_raw.to_numpy()[~drop], keep=keep_labels,
                                             control_label=control_label), perturbation_key)
    if dosage_key is not None and dosage_key not in adata.obsm:
        raise ValueError(f"obsm has no dosage matrix {dosage_key!r}; available obsm keys: "
                         f"{list(adata.obsm.keys()) or 'none'}")

    # Counts: validate and sum per cell.
    if library is not None:
        library = np.asarray(library, dtype=np.float64)
        if library.shape != (n_obs,):
            raise ValueError(f"library must hold one total per cell of the data ({n_obs},), got "
                             f"shape {library.shape}; recompute it (delete a stale cache file)")
    if is_backed:
        key = f"layers/{layer}" if layer else "X"
        library_all = (library if library is not None
                       else _backed_counts(adata.filename, key, source, fix))
        matrix = None
    else:
        matrix, library_all = _in_memory_counts(
            adata.layers[layer] if layer else adata.X, source, fix)

    empty = (library_all == 0) & ~drop
    if empty.any():
        dropped["zero counts"] = int(empty.sum())
        warnings.warn(f"dropping {int(empty.sum())} cells with zero counts in {source}", stacklevel=3)
    keep = np.flatnonzero(~drop & ~empty)
    if keep.size == 0:
        raise ValueError(f"no cells left after dropping {opt('drop_labels', None)} labels and "
                         f"zero-count cells (dropped: {dropped})")

    # Perturbations of the kept cells.
    if dosage_key is not None:
        names = adata.uns.get(f"{dosage_key}_names")
        obsm_val = adata.obsm[dosage_key]
        sub = obsm_val.iloc[keep] if isinstance(obsm_val, pd.DataFrame) else obsm_val[keep]
        design: PerturbationDesign = design_from_dosage(
            sub, names, separator=separator, control_label=control_label,
            source=f"obsm[{dosage_key!r}]")
    else:
        design = parse_labels(labels_raw.to_numpy()[keep], separator=separator,
                              control_label=control_label)

    if not design.perturbations:
        raise ValueError(
            f"no perturbed cells: all {keep.size} cells kept carry the control label "
            f"{design.control_label!r}, so there is no perturbation effect to learn. Check "
            f"{opt('perturbation_key', None)} (the column of labels) and "
            f"{opt('control_label', None)}")
    pert_counts = perturbation_cell_counts(design.dosage)
    few = sorted(((int(n), p) for p, n in zip(design.perturbations, pert_counts)
                  if n < MIN_PERTURBATION_CELLS))
    if few:
        shown = ", ".join(f"{p} ({n})" for n, p in few[:20]) + (" ..." if len(few) > 20 else "")
        warnings.warn(f"{len(few)} perturbation(s) carried by fewer than "
                      f"{MIN_PERTURBATION_CELLS} cells in the data: {shown}; their effects rest "
                      "on too few cells to be trusted", UserWarning, stacklevel=3)

    if is_backed:
        counts = BackedCSR(adata.filename, key, rows=keep if keep.size < n_obs else None)
    else:
        counts = matrix if keep.size == n_obs else matrix[keep]
        if counts.dtype != np.float32:
            counts = counts.astype(np.float32)
        if not counts.has_sorted_indices:
            counts = counts.copy() if counts is matrix else counts
            counts.sort_indices()
        counts = uniform_index_dtype(counts)
    return ScreenData(
        counts=counts,
        dosage=uniform_index_dtype(design.dosage),
        library=library_all[keep],
        perturbations=list(design.perturbations),
        perturbation_counts=pert_counts,
        gene_names=np.asarray(adata.var_names, dtype=str),
        cell_names=np.asarray(adata.obs_names, dtype=str)[keep],
        cell_index=keep.astype(np.int64),
        labels=design.labels,
        is_control=design.is_control,
        control_label=design.control_label,
        obs=adata.obs.iloc[keep].copy(),
        ground_truth=_simulation_truth(adata.uns, list(design.perturbations)),
        separator=separator,
        dropped=dropped,
    )


def with_batches(screen: ScreenData, batch_key: str,
                 categories: Optional[Sequence[str]] = None) -> ScreenData:
    """``screen`` with its batch covariate read from ``screen.obs[batch_key]``.

    ``categories``: the batch names of a trained run, in its order (a cell of a batch not
    among them is refused); None: the sorted names found. Cells without a batch (NaN, empty)
    are refused: drop them or fill the column."""
    import dataclasses
    obs = screen.obs
    if batch_key not in obs.columns:
        shown = ", ".join(map(repr, list(obs.columns)[:12])) or "none"
        raise ValueError(f"batch key {batch_key!r} is not a column of obs (columns: {shown}); "
                         f"name the column of batches with {opt('batch_key', placeholder='column')}")
    col = obs[batch_key]
    missing = col.isna().to_numpy() | (col.astype(str).str.strip() == "").to_numpy()
    if missing.any():
        raise ValueError(f"{int(missing.sum())} cell(s) have no value in obs[{batch_key!r}] "
                         f"({opt('batch_key', batch_key)}): every cell needs a batch; fill the "
                         "column or leave those cells out")
    names = col.astype(str).to_numpy()
    found = sorted(set(names.tolist()))
    if categories is None:
        categories = found
    categories = [str(c) for c in categories]
    pos = {c: i for i, c in enumerate(categories)}
    unknown = [c for c in found if c not in pos]
    if unknown:
        raise ValueError(f"obs[{batch_key!r}] holds batch(es) the model was not trained on: "
                         f"{', '.join(unknown[:10])}; the model knows {', '.join(categories)}")
    codes = np.array([pos[n] for n in names], dtype=np.int64)
    return dataclasses.replace(screen, batch_key=str(batch_key), batch_categories=categories,
                               batch_codes=codes)


# --------------------------------------------------------------------------------------------
# gene statistics

def gene_log1p_stats(screen: ScreenData, indices: np.ndarray, *, chunk_rows: int = STAT_CHUNK_ROWS,
                     min_std: float = 1e-6):
    """Per-gene mean and standard deviation of ``log1p(counts)`` over rows ``indices``.

    Streams over row chunks (never densifies). Returns ``(mean, std)``, each (n_genes,) float64;
    a std below ``min_std`` (a gene constant over these cells, e.g. all zero) is replaced by 1,
    so dividing by it never gives NaN or inf.
    """
    idx = np.sort(np.asarray(indices, dtype=np.int64))
    if idx.size == 0:
        raise ValueError("gene_log1p_stats needs at least one cell index")
    n_genes = screen.n_genes
    n, mean, m2 = 0, np.zeros(n_genes), np.zeros(n_genes)
    for start in range(0, idx.size, chunk_rows):
        block = screen.rows(idx[start:start + chunk_rows])
        nb = block.shape[0]
        vals = np.log1p(block.data.astype(np.float64))
        s = np.bincount(block.indices, weights=vals, minlength=n_genes)
        mean_b = s / nb
        # sum of squared deviations from the chunk mean, zeros included
        dev = vals - mean_b[block.indices]
        nz = np.bincount(block.indices, minlength=n_genes)
        m2_b = np.bincount(block.indices, weights=dev * dev, minlength=n_genes) \
            + (nb - nz) * mean_b * mean_b
        # Chan et al. pairwise merge of (n, mean, m2) with the chunk's
        delta = mean_b - mean
        total = n + nb
        mean = mean + delta * (nb / total)
        m2 = m2 + m2_b + delta * delta * (n * nb / total)
        n = total
    std = np.sqrt(np.maximum(m2 / n, 0.0))
    std[std < min_std] = 1.0
    return mean, std
