"""Baselines that need no model: predicted average treatment effects from training cells alone.

Every baseline predicts, for a perturbation label, its ATE in the package's normalisation
(``log2(1 + 1e4 x / library)``, label mean minus control mean, per gene; see
:mod:`samsvae.infer.ate`), using only the TRAINING cells:

* ``control``: no change (a row of zeros).
* ``train_mean``: the label's own mean shift over its training cells vs the training control
  cells. Undefined (NaN row) for a label no training cell carries.
* ``additive``: the sum of its parts' training shifts, each part's single-perturbation
  ``train_mean`` (a part repeated, ``"A+A"``, counts twice); for a single it equals
  ``train_mean``. Undefined for a label with a part never seen alone in training.
* ``linear``: ridge regression, over the training labels, of each label's mean shift on its
  dosage row (perturbation indicator features; the number of times each part occurs) with an
  unpenalised intercept (the shift common to all perturbed labels), each label weighted by its
  training cells (the cells' least squares: a label of 2 cells does not pull as hard as one of
  1,000): ``shift(label) ~ b + sum_t d_t w_t``. A combination is predicted from the learned per-part
  coefficients ``w_t``, which also learn from training combinations (a part seen only in
  doubles still gets one). The penalty ``lam = alpha * mean diag(X'X)`` (X the centred
  features) takes the ``alpha`` of ``LINEAR_ALPHAS`` with the smallest leave-one-label-out
  squared error over the training labels (closed form ``r_i / (1 - H_ii)``; ties go to the
  smallest alpha, i.e. the least shrinkage). Undefined for a label with a part no training
  cell carries (its coefficient would be the penalty's zero, not an estimate).

The training control cells are the control cells among the training indices, or all control
cells of the screen when the training split holds none (as in :func:`~samsvae.infer.data_ate`).
An undefined prediction is a NaN row with a reason (``BaselineATE.reasons``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..data.loader import check_indices
from .ate import _group_means, condition_dosage, control_rows, data_ate

BASELINES = ("control", "train_mean", "additive", "linear")
LINEAR_ALPHAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


@dataclass
class BaselineATE:
    """Baseline predictions for a list of labels.

    labels: (n,) the labels predicted. ate: ``{name: (n, G) float64}`` (NaN rows where
    undefined). reasons: ``{name: [None or why the row is undefined, per label]}``.
    n_cells_train: (n,) training cells carrying each label. linear_alpha: the ridge ``alpha``
    chosen (None when the linear baseline was not asked for or had no training label).
    """
    labels: List[str]
    ate: Dict[str, np.ndarray]
    reasons: Dict[str, List[Optional[str]]]
    n_cells_train: np.ndarray
    linear_alpha: Optional[float] = None
    notes: Dict[str, str] = field(default_factory=dict)


def perturbed_shift(screen, train_indices) -> np.ndarray:
    """(G,) mean normalised expression of all perturbed training cells minus that of the
    training control cells: the systematic perturbed-vs-control difference that Systema
    (Vinas Torne et al., Nat. Biotechnol. 2025) removes from both sides of a correlation."""
    rows = check_indices(screen, train_indices)
    ctrl = control_rows(screen, rows)
    pert = rows[~np.asarray(screen.is_control, dtype=bool)[rows]]
    if pert.size == 0:
        return np.zeros(screen.n_genes)
    group = np.concatenate([np.zeros(pert.size, np.int64), np.ones(ctrl.size, np.int64)])
    means = _group_means(screen, np.concatenate([pert, ctrl]), group, 2)
    return means[0] - means[1]


def _parts(screen, labels: Sequence[str]) -> np.ndarray:
    """(n, T) float64 dense: how many times each perturbation occurs in each label."""
    dosage, _ = condition_dosage(screen, labels)
    return np.asarray(dosage.todense(), dtype=np.float64)


def ridge_fit(x: np.ndarray, y: np.ndarray, alphas: Sequence[float] = LINEAR_ALPHAS,
              weights: Optional[np.ndarray] = None):
    """Ridge with unpenalised intercept, penalty chosen by leave-one-out.

    Args:
        x: (n, T) features; y: (n, G) targets.
        weights: (n,) non-negative row weights (e.g. each label's training cells, so that the
            fit is the cells' least squares and a 1-cell label does not count as much as a
            1,000-cell one); None: all 1. Scaled to mean 1.
    Returns:
        ``(weight (T, G), intercept (G,), alpha, loo_mse {alpha: value})``; the penalty is
        ``alpha * mean diag(Xc'W Xc)`` with Xc the (weighted-)centred features; the
        leave-one-out error is weighted like the fit.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = x.shape[0]
    wt = np.ones(n) if weights is None else np.asarray(weights, np.float64).reshape(-1)
    if wt.shape != (n,) or np.any(wt < 0) or not wt.sum() > 0:
        raise ValueError(f"weights must be {n} non-negative numbers, not all 0")
    wt = wt / wt.mean()
    xm, ym = wt @ x / wt.sum(), wt @ y / wt.sum()
    xc, yc = x - xm, y - ym
    gram = xc.T @ (wt[:, None] * xc)
    scale = float(np.mean(np.diag(gram))) if gram.size else 0.0
    scale = scale if scale > 0 else 1.0
    best, loo = None, {}
    for alpha in alphas:
        inv = np.linalg.inv(gram + alpha * scale * np.eye(gram.shape[0]))
        w = inv @ xc.T @ (wt[:, None] * yc)
        # the centring is a leverage of w_i / sum(w) on top of the ridge hat matrix
        h = wt * (np.einsum("ij,jk,ik->i", xc, inv, xc) + 1.0 / wt.sum())
        resid = yc - xc @ w
        denom = np.maximum(1.0 - h, 1e-9)
        err = (float(np.sum(wt[:, None] * (resid / denom[:, None]) ** 2) / (wt.sum() * y.shape[1]))
               if n > 1 else float("nan"))
        loo[float(alpha)] = err
        if best is None or (np.isfinite(err) and err < best[0] - 1e-12 * max(abs(best[0]), 1)):
            best = (err if np.isfinite(err) else np.inf, float(alpha), w)
    _, alpha, w = best
    return w, ym - xm @ w, alpha, loo


def baseline_ate(screen, train_indices, labels: Sequence[str], *,
                 baselines: Sequence[str] = BASELINES) -> BaselineATE:
    """Predicted ATE of ``labels`` by each baseline of ``baselines`` (see the module doc).

    Args:
        screen: ``samsvae.data.ScreenData``.
        train_indices: rows (or a bool mask) of the training cells: the only cells used.
        labels: perturbation labels (the screen's spelling, or compositions of its
            perturbations, ``"A+B"``).
        baselines: names among :data:`BASELINES`.

    Returns:
        :class:`BaselineATE` (each ``ate[name]`` is (n_labels, G) float64, log2 units).
    """
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; choose among {list(BASELINES)}")
    labels = [str(l) for l in labels]
    rows = check_indices(screen, train_indices)
    _, canonical = condition_dosage(screen, labels) if labels else (None, [])
    n, g = len(labels), screen.n_genes
    labels_all = np.asarray(screen.labels).astype(str)
    train_labels, train_shift = data_ate(screen, rows)
    train_pos = {lab: i for i, lab in enumerate(train_labels)}
    counts = dict(zip(*np.unique(labels_all[rows], return_counts=True)))
    n_train = np.array([int(counts.get(c, 0)) for c in canonical], dtype=np.int64)
    perts = [str(p) for p in screen.perturbations]
    parts = _parts(screen, labels) if n else np.zeros((0, len(perts)))
    out = BaselineATE(labels=labels, ate={}, reasons={}, n_cells_train=n_train)

    def row_of(label):
        i = train_pos.get(label)
        return None if i is None else train_shift[i]

    for name in baselines:
        ate = np.full((n, g), np.nan)
        why: List[Optional[str]] = [None] * n
        if name == "control":
            ate[:] = 0.0
        elif name == "train_mean":
            for i, c in enumerate(canonical):
                r = row_of(c)
                if r is None:
                    why[i] = f"no training cell carries {c}"
                else:
                    ate[i] = r
        elif name == "additive":
            for i in range(n):
                missing = [perts[t] for t in np.flatnonzero(parts[i]) if row_of(perts[t]) is None]
                if missing:
                    why[i] = f"never seen alone in training: {', '.join(missing)}"
                    continue
                ate[i] = sum(parts[i, t] * row_of(perts[t]) for t in np.flatnonzero(parts[i]))
        elif name == "linear":
            if train_labels:
                x = _parts(screen, train_labels)
                w, b, alpha, _ = ridge_fit(x, train_shift, weights=[
                    counts.get(lab, 0) for lab in train_labels])
                out.linear_alpha = alpha
                seen = x.sum(axis=0) > 0
                for i in range(n):
                    missing = [perts[t] for t in np.flatnonzero(parts[i]) if not seen[t]]
                    if missing:
                        why[i] = f"no training cell carries {', '.join(missing)}"
                    else:
                        ate[i] = b + parts[i] @ w
            else:
                why = ["no perturbed training cell"] * n
        out.ate[name] = ate
        out.reasons[name] = why
    return out


def baseline_anndata(screen, train_indices, labels: Sequence[str], name: str):
    """The ``name`` baseline's predicted ATE as an AnnData shaped like the model's
    (``SAMSVAE.average_treatment_effects``): obs = labels, var = genes, X = predicted ATE
    (float32, log2 units; NaN rows where undefined), ``obs["n_cells_train"]``,
    ``obs["undefined_because"]`` ("" where defined), ``uns["samsvae_baseline"]``."""
    import anndata
    import pandas as pd
    res = baseline_ate(screen, train_indices, labels, baselines=(name,))
    obs = pd.DataFrame({"n_cells_train": res.n_cells_train,
                        "undefined_because": [r or "" for r in res.reasons[name]]},
                       index=pd.Index(res.labels, dtype=str))
    var = pd.DataFrame(index=pd.Index(np.asarray(screen.gene_names).astype(str), dtype=str))
    out = anndata.AnnData(X=res.ate[name].astype(np.float32), obs=obs, var=var)
    out.uns["samsvae_baseline"] = {"name": name, "linear_alpha": res.linear_alpha}
    return out
