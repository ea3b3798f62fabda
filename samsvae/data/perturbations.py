"""Perturbation labels -> a sparse cells x perturbations dosage matrix and a vocabulary.

Labels name the perturbations of a cell joined by a separator (``"KLF1+MAP2K6"``); the control
label (``"control"``, ``"ctrl"``, ...) marks unperturbed cells and is ignored inside
combinations, so GEARS' ``"KLF1+ctrl"`` is the single ``KLF1`` and ``"ctrl+ctrl"`` a control.
A component repeated in a label counts as dosage 2. Alternatively the dosage matrix is given
directly (``obsm``), with real-valued dosages.

The vocabulary is the sorted list of perturbation names; dosage columns follow it, and the
canonical label of a cell joins its perturbations in vocabulary order (control cells get the
control label).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .options import opt
from .validate import check_dosage_values

CONTROL_CANDIDATES = ("control", "ctrl", "non-targeting", "NT")


@dataclass
class PerturbationDesign:
    """Parsed perturbations of n cells.

    dosage:        (n, T) CSR float32; control cells have empty rows.
    perturbations: (T,) vocabulary, sorted; order of the dosage columns.
    labels:        (n,) canonical label of each cell.
    is_control:    (n,) bool, True for cells without any perturbation.
    control_label: the control label used.
    """
    dosage: sp.csr_matrix
    perturbations: list
    labels: np.ndarray
    is_control: np.ndarray
    control_label: Optional[str]


# Labels that name no perturbation but a failed assignment (no guide called, several guides, a
# missing value written as text). Matched case-insensitively on the stripped label.
NONCELL_LABELS = ("unassigned", "multiplet", "multiplets", "doublet", "NA", "N/A", "nan",
                  "None", "null", "")


def noncell_labels(values, *, keep=(), control_label: Optional[str] = None) -> dict:
    """``{label: cells}`` of the labels in ``values`` (n,) that look like non-cells
    (:data:`NONCELL_LABELS`), except those in ``keep`` and the control label."""
    names, counts = np.unique(np.asarray(values, dtype=object).astype(str), return_counts=True)
    lowered = {x.lower() for x in NONCELL_LABELS}
    keep = set(keep) | ({control_label} if control_label is not None else set())
    return {str(n): int(c) for n, c in zip(names, counts)
            if n.strip().lower() in lowered and n not in keep}


def refuse_noncell_labels(found: dict, key: str) -> None:
    """Raise the error that names the non-cell labels ``found`` and the options to drop or keep
    them."""
    if not found:
        return
    shown = ", ".join(f"{lab!r} ({n} cells)" for lab, n in found.items())
    labels = list(found)
    raise ValueError(
        f"obs[{key!r}] holds label(s) that look like cells without a perturbation call "
        f"(no guide, several guides, or a missing value): {shown}. They would be modelled as a "
        f"perturbation. Drop those cells with {opt('drop_labels', labels)}, or, if a label is a "
        f"real perturbation, keep it with {opt('keep_labels', labels)}.")


def read_label_column(obs: pd.DataFrame, key: str) -> pd.Series:
    """``obs[key]`` as strings; raises on a missing column or NaN labels."""
    if key not in obs.columns:
        cols = ", ".join(map(repr, obs.columns)) or "(none)"
        raise ValueError(f"obs has no perturbation column {key!r}; available obs columns: {cols}. "
                         f"Name the column of labels with {opt('perturbation_key', placeholder='column')}.")
    col = obs[key]
    missing = col.isna().to_numpy()
    if missing.any():
        raise ValueError(
            f"obs[{key!r}] has {int(missing.sum())} missing (NaN) labels, e.g. cell "
            f"{obs.index[np.flatnonzero(missing)[0]]!r}. Give every cell a label: the control label "
            "for unperturbed cells, or a placeholder such as 'unassigned' dropped with "
            f"{opt('drop_labels', ['unassigned'])}.")
    return col.astype(str)


def _split_label(label: str, separator: str) -> list:
    parts = [p.strip() for p in label.split(separator)]
    if any(p == "" for p in parts):
        raise ValueError(f"perturbation label {label!r} has an empty component (separator "
                         f"{separator!r}). Fix the label, or drop those cells with "
                         f"{opt('drop_labels', [label])}.")
    return parts


def detect_control_label(components: set) -> str:
    """The one control label among :data:`CONTROL_CANDIDATES` present in ``components``."""
    found = [c for c in CONTROL_CANDIDATES if c in components]
    if len(found) == 1:
        return found[0]
    if not found:
        raise ValueError(
            f"no control label found: none of {list(CONTROL_CANDIDATES)} occurs in the labels. "
            f"Name it with {opt('control_label', placeholder='label')} (the label of unperturbed "
            "cells).")
    raise ValueError(f"ambiguous control label: {found} all occur in the labels. Choose one with "
                     f"{opt('control_label', placeholder='label')}, and relabel or drop "
                     f"({opt('drop_labels', placeholder='labels')}) the other cells.")


def parse_labels(labels: Sequence[str], *, separator: str = "+",
                 control_label: Optional[str] = None) -> PerturbationDesign:
    """Parse per-cell labels (n,) into a :class:`PerturbationDesign`.

    control_label None detects one of :data:`CONTROL_CANDIDATES`; an explicit label must occur
    in the labels.
    """
    if not separator:
        raise ValueError("separator must be a non-empty string, e.g. '+'")
    codes, uniques = pd.factorize(pd.Series(labels, dtype=object), sort=False)
    if (codes < 0).any():
        raise ValueError("labels contain missing (NaN) values; give every cell a label")
    split = [_split_label(str(u), separator) for u in uniques]
    components = set().union(*split) if split else set()
    if control_label is None:
        control_label = detect_control_label(components)
    elif control_label not in components:
        common = pd.Series(codes).value_counts().index[:10]
        raise ValueError(
            f"control label {control_label!r} does not occur in the labels (most common labels: "
            f"{[str(uniques[c]) for c in common]}). Pass the label used for unperturbed cells "
            f"({opt('control_label', placeholder='label')}).")

    per_label = [Counter(p for p in parts if p != control_label) for parts in split]
    vocab = sorted(set().union(*per_label)) if per_label else []
    col_of = {name: j for j, name in enumerate(vocab)}

    # Dosage entries of each unique label, then gathered per cell through the factorised codes.
    label_cols, label_vals, label_len, canonical = [], [], [], []
    for counts in per_label:
        items = sorted((col_of[name], float(k)) for name, k in counts.items())
        label_cols.extend(c for c, _ in items)
        label_vals.extend(v for _, v in items)
        label_len.append(len(items))
        if items:
            canonical.append(separator.join(
                separator.join([vocab[c]] * int(v)) for c, v in items))
        else:
            canonical.append(control_label)
    label_len = np.asarray(label_len, dtype=np.int64)
    label_ptr = np.r_[0, np.cumsum(label_len)]
    label_cols = np.asarray(label_cols, dtype=np.int32)
    label_vals = np.asarray(label_vals, dtype=np.float32)

    row_len = label_len[codes]
    indptr = np.r_[0, np.cumsum(row_len)].astype(np.int64)
    nnz = int(indptr[-1])
    take = np.repeat(label_ptr[codes] - indptr[:-1], row_len) + np.arange(nnz, dtype=np.int64)
    dosage = sp.csr_matrix((label_vals[take], label_cols[take], indptr),
                           shape=(codes.size, len(vocab)))
    canonical = np.asarray(canonical, dtype=object)
    return PerturbationDesign(
        dosage=dosage, perturbations=vocab, labels=canonical[codes].astype(str),
        is_control=row_len == 0, control_label=control_label)


def design_from_dosage(matrix, names: Optional[Sequence[str]] = None, *, separator: str = "+",
                       control_label: Optional[str] = None, source: str = "dosage") -> PerturbationDesign:
    """A :class:`PerturbationDesign` from a precomputed (n, T) dosage matrix.

    matrix: scipy sparse, numpy array or DataFrame (its columns name the perturbations).
    names:  (T,) perturbation names; default the DataFrame's columns, else ``P0..P{T-1}``.
    Columns are reordered to the sorted names; explicit zeros are dropped. Empty rows are
    controls, labelled ``control_label`` (default ``"control"``).
    """
    if isinstance(matrix, pd.DataFrame):
        if names is None:
            names = [str(c) for c in matrix.columns]
        all_sparse = matrix.shape[1] > 0 and all(isinstance(t, pd.SparseDtype) for t in matrix.dtypes)
        matrix = matrix.sparse.to_coo() if all_sparse else matrix.to_numpy()
    mat = sp.csr_matrix(matrix if sp.issparse(matrix) else np.asarray(matrix)).astype(np.float32)
    check_dosage_values(mat.data, source=source)
    n_pert = mat.shape[1]
    if names is None:
        names = [f"P{j}" for j in range(n_pert)]
    names = [str(n) for n in np.asarray(names).ravel()]
    if len(names) != n_pert:
        raise ValueError(f"{source} has {n_pert} columns but {len(names)} perturbation names were "
                         "given; they must match one to one")
    dup = [n for n, k in Counter(names).items() if k > 1]
    if dup:
        raise ValueError(f"perturbation names must be unique; repeated: {dup[:5]}")
    order = np.argsort(np.asarray(names, dtype=object), kind="stable")
    vocab = [names[j] for j in order]
    mat = mat[:, order].tocsr()
    mat.eliminate_zeros()
    mat.sum_duplicates()
    mat.sort_indices()
    control_label = "control" if control_label is None else control_label
    row_len = np.diff(mat.indptr)
    cache: dict = {}
    labels = np.empty(mat.shape[0], dtype=object)
    for i in range(mat.shape[0]):
        cols = mat.indices[mat.indptr[i]:mat.indptr[i + 1]]
        key = cols.tobytes()
        lab = cache.get(key)
        if lab is None:
            lab = separator.join(vocab[c] for c in cols) if cols.size else control_label
            cache[key] = lab
        labels[i] = lab
    return PerturbationDesign(dosage=mat, perturbations=vocab, labels=labels.astype(str),
                              is_control=row_len == 0, control_label=control_label)


def perturbation_cell_counts(dosage: sp.csr_matrix, indices: Optional[np.ndarray] = None) -> np.ndarray:
    """(T,) int64: number of cells among rows ``indices`` (default all) with a non-zero dosage of
    each perturbation."""
    rows = dosage if indices is None else dosage[np.asarray(indices, dtype=np.int64)]
    rows = rows.tocsr()
    nonzero = rows.indices[rows.data != 0]
    return np.bincount(nonzero, minlength=rows.shape[1]).astype(np.int64)


def additive_gram(dosage: sp.csr_matrix, indices) -> sp.csc_matrix:
    """((T + 1), (T + 1)) sparse X^T X of the additive design X = [1, dosage] over the cells
    ``indices``: the left side of the normal equations of :func:`additive_shifts`."""
    d = sp.csr_matrix(dosage)[np.asarray(indices, dtype=np.int64)]
    design = sp.hstack([sp.csr_matrix(np.ones((d.shape[0], 1))), d]).tocsc()
    return (design.T @ design).tocsc()


def additive_shifts(gram: sp.spmatrix, xty: np.ndarray, *, ridge: float = 1e-6) -> np.ndarray:
    """Each perturbation's additive shift of a per-cell quantity, from the normal equations of
    ``y_i = c + sum_t dosage_it delta_t``: ``gram`` = X^T X (:func:`additive_gram`) and
    ``xty`` = X^T y, ((T + 1),) or ((T + 1), k) (row 0 the sum of y, row 1 + t the
    dosage-weighted sum over the cells carrying t). Summed over cells, both can be added up
    across processes before solving. ``ridge`` is added to the diagonal; perturbations no cell
    carries get 0.

    Returns:
        (T,) or (T, k) float64 delta (the intercept c dropped).
    """
    from scipy.sparse.linalg import spsolve
    gram = sp.csc_matrix(gram, dtype=np.float64)
    rhs = np.asarray(xty, dtype=np.float64)
    coef = spsolve(gram + ridge * sp.identity(gram.shape[0], format="csc"), rhs)
    coef = np.asarray(coef, dtype=np.float64).reshape(rhs.shape)
    shifts = coef[1:].copy()
    shifts[np.asarray(gram.diagonal())[1:] == 0] = 0.0
    return shifts


def log_depth_shifts(dosage: sp.csr_matrix, library: np.ndarray, indices) -> np.ndarray:
    """(T,) each perturbation's additive shift of log library size (sequencing depth) over
    control cells, fitted on the cells ``indices`` by least squares of
    ``log library_i = c + sum_t dosage_it delta_t`` (:func:`additive_shifts`; 0 for
    perturbations no cell of ``indices`` carries).

    A perturbation that changes a cell's total RNA changes its depth, and with it the measured
    normalised expression log2(1 + 1e4 x / library) of every gene; predictions of measured
    cells use this to sequence simulated cells of a condition as deeply as its cells are
    expected to be (additively in log depth for combinations)."""
    rows = np.asarray(indices, dtype=np.int64)
    d = sp.csr_matrix(dosage)[rows]
    if d.shape[0] == 0 or d.nnz == 0:
        return np.zeros(d.shape[1])
    y = np.log(np.maximum(np.asarray(library, dtype=np.float64)[rows], 1.0))
    xty = np.concatenate([[y.sum()], d.T @ y])
    return additive_shifts(additive_gram(dosage, rows), xty)
