"""Average treatment effects (ATE) per perturbation label, from data and from a model.

Normalisation ("perturbseq"): ``y = log2(1 + 1e4 * x / library)`` per gene, ``library`` the
cell's total count over the modelled genes. The ATE of label t is the mean of y over cells with
label t minus the mean over control cells:

* data side (:func:`data_ate`): cells of the evaluated indices; the control mean uses the
  control cells among the evaluated indices when there are any, otherwise all control cells
  of the screen (e.g. a held-out split made of perturbed cells only);
* model side (:func:`model_ate`): posterior-predictive cells simulated under the label's dosage
  row and under an empty row (control), the same local/global draws for both, sequenced as
  deeply as the screen's control cells (their library sizes) and normalised as the data are.
  The depth matters: at ~100-1,000 UMIs per cell, log2(1 + 1e4 x / library) of the measured
  cells is dominated by whether a gene was detected at all, a regime a prediction at a fixed
  library of 1e4 does not see (on norman2019's held-out doubles, ATE-Pearson 0.36 at 1e4 against
  0.51 at the control cells' depths, same model).

:func:`ate_pearson` compares the two per label, over all genes and over the label's top-k genes
by absolute data ATE.
"""
from __future__ import annotations

import warnings
from typing import List, Optional, Sequence, Tuple

import numpy as np
import scipy.sparse as sp
import torch

from ..data import CONTROL_CANDIDATES
from ..data.loader import check_indices
from ..data.options import opt
from ..models.base import NORMALIZED_LIBRARY
from .spread import gather_in_order, my_items

# control cells whose library sizes the simulated cells take in turn (a seeded subsample)
_LIBRARY_CELLS = 4096
_ROWS_PER_CHUNK = 8192
# labels per predict call: (labels + 1) x genes values per simulated cell, at most this many
_MODEL_ATE_VALUES = 2 ** 19


def _group_means(screen, rows: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    """(n_groups, G) mean of log2(1 + 1e4 x / library) over ``rows`` grouped by ``group``."""
    sums = np.zeros((n_groups, screen.n_genes), dtype=np.float64)
    sizes = np.bincount(group, minlength=n_groups).astype(np.float64)
    for start in range(0, rows.size, _ROWS_PER_CHUNK):
        r = rows[start:start + _ROWS_PER_CHUNK]
        g = group[start:start + _ROWS_PER_CHUNK]
        x = sp.csr_matrix(screen.rows(r), dtype=np.float64)
        lib = np.maximum(np.asarray(screen.library, dtype=np.float64)[r], 1.0)
        x = sp.diags(NORMALIZED_LIBRARY / lib) @ x
        x.data = np.log2(1.0 + x.data)
        onehot = sp.csr_matrix((np.ones(r.size), (g, np.arange(r.size))),
                               shape=(n_groups, r.size))
        sums += np.asarray((onehot @ x).todense())
    return sums / np.maximum(sizes, 1.0)[:, None]


def data_ate(screen, indices) -> Tuple[List[str], np.ndarray]:
    """Empirical ATE of every perturbation label with cells among ``indices``.

    Args:
        screen: ``samsvae.data.ScreenData``.
        indices: (n,) row numbers (or an (n_cells,) bool mask) of the evaluated cells.

    Returns:
        ``(labels, ate)``: the non-control labels present (sorted), and (n_labels, G) float64
        mean normalised expression of their cells minus that of the control cells (those in
        ``indices`` if any, else all control cells of the screen).
    """
    rows = check_indices(screen, indices)
    labels_all = np.asarray(screen.labels).astype(str)
    is_control = np.asarray(screen.is_control, dtype=bool)
    pert_rows = rows[~is_control[rows]]
    labels = sorted(set(labels_all[pert_rows].tolist()))
    ctrl_rows = control_rows(screen, rows)
    if not labels:
        return [], np.zeros((0, screen.n_genes))
    pos = {lab: i for i, lab in enumerate(labels)}
    group = np.concatenate([np.array([pos[l] for l in labels_all[pert_rows]], dtype=np.int64),
                            np.full(ctrl_rows.size, len(labels), dtype=np.int64)])
    means = _group_means(screen, np.concatenate([pert_rows, ctrl_rows]), group, len(labels) + 1)
    return labels, means[:-1] - means[-1]


def condition_dosage(screen, labels: Sequence[str]) -> Tuple[sp.csr_matrix, List[str]]:
    """(n_labels, T) dosage rows of condition labels, and their canonical spellings.

    A label joins perturbations of the screen with its separator (``"A"``, ``"A+B"``; a part
    repeated counts as dosage 2); control labels (the screen's, or any of
    ``samsvae.data.CONTROL_CANDIDATES``, or an empty part) add nothing, so ``"A+ctrl"`` is
    ``"A"`` and ``"control"`` an empty row. The canonical label joins the parts in vocabulary
    order (the control label for an empty row). An unknown part raises a ValueError listing
    the vocabulary.
    """
    perturbations = [str(p) for p in screen.perturbations]
    vocab = {p: i for i, p in enumerate(perturbations)}
    sep = getattr(screen, "separator", "+") or "+"
    control = screen.control_label or "control"
    controls = set(CONTROL_CANDIDATES) | {control, ""}
    rows, cols, vals, canonical = [], [], [], []
    for r, label in enumerate(labels):
        counts: dict = {}
        for part in (s.strip() for s in str(label).split(sep)):
            if part in controls:
                continue
            if part not in vocab:
                shown = ", ".join(perturbations[:8])
                raise ValueError(
                    f"unknown perturbation {part!r} in {label!r}: the model knows "
                    f"{len(vocab)} perturbations ({shown}{', ...' if len(vocab) > 8 else ''}); "
                    f"see model.perturbations for the full list. Compose seen ones with "
                    f"{sep!r}, e.g. {sep.join(perturbations[:2])!r}")
            counts[vocab[part]] = counts.get(vocab[part], 0) + 1
        for c in sorted(counts):
            rows.append(r)
            cols.append(c)
            vals.append(float(counts[c]))
        canonical.append(sep.join(perturbations[c] for c in sorted(counts)
                                  for _ in range(counts[c])) or control)
    dosage = sp.csr_matrix((np.asarray(vals, np.float32), (rows, cols)),
                           shape=(len(labels), len(vocab)), dtype=np.float32)
    return dosage, canonical


def control_rows(screen, rows: np.ndarray) -> np.ndarray:
    """The control cells among ``rows``, or all control cells of the screen when ``rows`` has
    none (e.g. a held-out split made of perturbed cells only)."""
    is_control = np.asarray(screen.is_control, dtype=bool)
    ctrl = rows[is_control[rows]]
    if ctrl.size == 0:
        ctrl = np.flatnonzero(is_control)
    if ctrl.size == 0:
        raise ValueError("the screen has no control cells, so treatment effects are undefined; "
                         f"name the label of unperturbed cells with {opt('control_label')}")
    return ctrl


def label_dosage(screen, labels: Sequence[str]) -> sp.csr_matrix:
    """(n_labels, T) dosage rows of labels: the row of a cell carrying the label (its measured
    dosage), or, for a label no cell carries, the row :func:`condition_dosage` composes from
    its parts."""
    labels_all = np.asarray(screen.labels).astype(str)
    uniq, first = np.unique(labels_all, return_index=True)
    first_row = dict(zip(uniq.tolist(), first.tolist()))
    out = []
    for lab in labels:
        if lab in first_row:
            out.append(sp.csr_matrix(screen.dosage[first_row[lab]], dtype=np.float32))
        else:
            out.append(condition_dosage(screen, [lab])[0])
    if not out:
        return sp.csr_matrix((0, screen.n_perturbations), dtype=np.float32)
    return sp.vstack(out).tocsr().astype(np.float32)


def ate_label_groups(screen, labels: Sequence[str]):
    """The label groups of :func:`model_ate`: ``(dosage, starts, group)`` with ``dosage`` the
    (n_labels, T) label dosage, ``starts`` the first label of each group and ``group`` the
    group size. Group ``gi`` is evaluated by :func:`group_ate` (its seed depends on ``gi``
    alone, so any process can evaluate any group)."""
    dosage = label_dosage(screen, labels)
    group = max(1, _MODEL_ATE_VALUES // screen.n_genes - 1)
    return dosage, list(range(0, len(labels), group)), group


def control_library(screen, seed: int = 0, batch: Optional[int] = None) -> np.ndarray:
    """Library sizes of (a seeded subsample of at most 4,096) control cells of ``screen``: the
    depth at which :func:`model_ate` simulates cells. Falls back to all cells without
    controls. ``batch``: only the cells of that batch (``screen.batch_codes``)."""
    lib = np.asarray(screen.library, dtype=np.float64)
    is_control = np.asarray(screen.is_control, dtype=bool)
    if batch is not None:
        in_batch = np.asarray(screen.batch_codes) == int(batch)
        lib, is_control = lib[in_batch], is_control[in_batch]
    pool = lib[is_control] if is_control.any() else lib
    pool = pool[pool > 0]
    if pool.size == 0:
        return np.array([NORMALIZED_LIBRARY])
    rng = np.random.default_rng(seed)
    return rng.permutation(pool)[:_LIBRARY_CELLS]


def group_ate(model, dosage, start: int, group: int, gi: int, *, n_samples: int,
              seed: int, library=NORMALIZED_LIBRARY, effects: str = "mean",
              batch: Optional[int] = None) -> np.ndarray:
    """(rows in the group, G) model ATE of labels ``start .. start + group`` of ``dosage``:
    predicted normalised expression under each label minus under control (one control row
    appended to the group, sharing its random draws); ``library`` as
    ``PerturbationModel.predict_normalized_expression``; ``batch``: the batch covariate of the
    simulated cells (models trained with a batch key)."""
    empty = sp.csr_matrix((1, dosage.shape[1]), dtype=np.float32)
    rows = sp.vstack([dosage[start:start + group], empty]).tocsr()
    gen = torch.Generator(device=next(model.parameters()).device)
    gen.manual_seed(int(seed) * 1_000_003 + gi)
    scale = (model.library_scale(rows) if hasattr(model, "library_scale") and
             not np.isscalar(library) else None)
    kw = {} if batch is None else {"batch": int(batch)}
    pred = model.predict_normalized_expression(rows, n_samples=n_samples, library=library,
                                               library_scale=scale, effects=effects,
                                               generator=gen, **kw)
    pred = pred.detach().to("cpu", torch.float64).numpy()
    return pred[:-1] - pred[-1]


def untrained_parts(model, screen, dosage) -> List[str]:
    """Perturbations used by the (n, T) ``dosage`` rows that no training cell carried (the
    model's ``perturbation_counts`` N_t are 0): their embeddings and masks are still the
    initial ones, so predictions involving them are not learned from data. [] when the model
    does not know its training counts."""
    counts = getattr(model, "perturbation_counts", None)
    known = getattr(model, "perturbation_counts_set", None)
    if counts is None or (known is not None and not bool(known)):
        return []
    counts = counts.detach().cpu().numpy()
    used = np.flatnonzero(np.asarray(abs(sp.csr_matrix(dosage)).sum(axis=0)).ravel() > 0)
    if counts.shape[0] != dosage.shape[1]:
        return []
    names = [str(p) for p in screen.perturbations]
    return [names[t] for t in used if counts[t] <= 0]


def warn_untrained_parts(model, screen, dosage, labels: Sequence[str]) -> List[str]:
    """Warn (one line) naming the labels whose parts no training cell carried; returns them."""
    unseen = set(untrained_parts(model, screen, dosage))
    if not unseen:
        return []
    sep = getattr(screen, "separator", "+") or "+"
    hit = [str(l) for l in labels if unseen & {p.strip() for p in str(l).split(sep)}]
    warnings.warn(
        f"no training cell carried {', '.join(sorted(unseen))}: the predictions for "
        f"{', '.join(hit[:10])}{' ...' if len(hit) > 10 else ''} use parameters that never "
        "saw data (the initial values, not an estimate)", UserWarning, stacklevel=3)
    return hit


def model_ate(model, screen, labels: Sequence[str], *, n_samples: int = 2500,
              seed: int = 0, comm=None, library="control",
              effects: str = "mean") -> np.ndarray:
    """Model ATE of each label: predicted normalised expression under the label minus under
    control, from ``n_samples`` simulated cells.

    ``library``: ``"control"`` (default) simulates each cell at the library size of a control
    cell of ``screen`` (:func:`control_library`), the depth of the measured cells the data ATE
    comes from, scaled for each label by the depth its perturbations give their cells
    (``model.library_scale``, learnt from the training cells); a number: every cell at that
    size, unscaled; an array: those sizes, scaled. ``effects``: ``"mean"`` (default) or
    ``"sample"``, as ``predict_normalized_expression``.

    Vectorised over labels: labels are processed in groups (each group with its own control
    row, sharing the group's random draws) so that one group's simulated cells fit in memory.
    Each group's seed depends on ``seed`` and its position only, so with a process group
    ``comm`` the groups are dealt to the ranks and every rank gets the single-process result.

    Returns:
        (n_labels, G) float64.
    """
    labels = list(labels)
    if not labels:
        return np.zeros((0, screen.n_genes))
    dosage, starts, group = ate_label_groups(screen, labels)
    if comm is None or comm.is_main:
        warn_untrained_parts(model, screen, dosage, labels)
    if isinstance(library, str):
        if library != "control":
            raise ValueError(f"library must be 'control', a number or an array, got {library!r}")
        library = control_library(screen, seed)
    local = {gi: group_ate(model, dosage, starts[gi], group, gi, n_samples=n_samples, seed=seed,
                           library=library, effects=effects)
             for gi in my_items(len(starts), comm)}
    return np.concatenate(gather_in_order(comm, local, len(starts)), axis=0)


def pearson(a, b) -> float:
    """Pearson correlation of two vectors over the entries finite in both (NaN when fewer than
    two remain or either side is constant)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 2:
        return float("nan")
    a, b = a[ok] - a[ok].mean(), b[ok] - b[ok].mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float("nan")


def ate_pearson(model_ate, data_ate, *, top_k: int = 20) -> dict:
    """Pearson correlation between model and data ATE, per label.

    Args:
        model_ate, data_ate: (n_labels, G) arrays, rows for the same labels.
        top_k: also correlate over each label's ``top_k`` genes by |data ATE|.

    Returns:
        ``{"ate_pearson": mean over labels (all genes), "ate_pearson_top{k}": mean over labels
        (top-k genes), "ate_pearson_per_label": [...], "ate_pearson_top{k}_per_label": [...]}``.
        A label whose ATE is constant over the genes compared has correlation NaN and is left
        out of the means (NaN when no label is left).
    """
    m, d = np.asarray(model_ate, dtype=np.float64), np.asarray(data_ate, dtype=np.float64)
    if m.shape != d.shape or m.ndim != 2:
        raise ValueError(f"model_ate and data_ate must be (n_labels, genes) of the same shape, "
                         f"got {m.shape} and {d.shape}")
    if top_k < 2:
        raise ValueError(f"top_k must be >= 2 for a correlation, got {top_k}")
    k = min(top_k, m.shape[1])
    full = [pearson(m[i], d[i]) for i in range(m.shape[0])]
    top = []
    for i in range(m.shape[0]):
        sel = np.argsort(-np.abs(d[i]), kind="stable")[:k]
        top.append(pearson(m[i, sel], d[i, sel]))

    def _mean(v):
        v = np.asarray(v, dtype=np.float64)
        return float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")

    name = f"ate_pearson_top{top_k}"
    return {"ate_pearson": _mean(full), name: _mean(top), "ate_pearson_per_label": full,
            f"{name}_per_label": top}
