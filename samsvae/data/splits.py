"""Train / validation / test splits of a :class:`ScreenData`.

A split is an (n_cells,) array of the strings ``"train"``, ``"val"``, ``"test"``: each cell is
in exactly one part.

* ``"random"``: within each canonical label (control, each perturbation, each combination) the
  cells are shuffled with the seed and cut at the cumulative fractions, so every label keeps its
  share in every part and a label with a single cell goes to train.
* ``"ood_combinations"``: combinatorial generalisation. Candidates are the multi-perturbation
  labels whose every component also occurs as a single-perturbation label. A fraction
  ``ood_fraction`` of them (at least one) is held out: ALL their cells form the test set,
  together with a share ``control_test_fraction`` (0.3) of the control cells and nothing else.
  The remaining cells are split train/val (stratified as above, in the ratio of the first two
  fractions); stratification puts at least one cell of every single in train, so every
  component of a held-out combination is seen alone in training.

  Why the test split holds control cells of its own: a treatment effect is a difference from
  the control mean, and with ~100 control cells that mean carries noise shared by every label
  measured against it. Measured against the training controls, the held-out doubles' data ATE
  shares that noise with every baseline built from the training cells (additive, linear), which
  then looks better than it predicts: on norman2019 the additive baseline scores r = 0.83 with
  its singles and the doubles measured against the same 50 control cells, and 0.37 against
  the other 50 (means of 10 random halvings; ``benchmarks/control_reference.py``).
* any other string (or ``kind="column", column=name``): the obs column of that name holds the
  split (values train/val/test), validated.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pandas as pd

SPLIT_VALUES = ("train", "val", "test")


def _check_fractions(fractions: Sequence[float]) -> np.ndarray:
    f = np.asarray(fractions, dtype=np.float64)
    if f.shape != (3,) or np.any(f < 0) or not np.isclose(f.sum(), 1.0) or f[0] == 0:
        raise ValueError(f"fractions must be three non-negative numbers (train, val, test) "
                         f"summing to 1 with train > 0, got {tuple(fractions)}")
    return f


def _stratified(labels: np.ndarray, fractions: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Split cells label by label at the rounded cumulative fractions."""
    out = np.empty(labels.size, dtype="<U5")
    codes, _ = pd.factorize(pd.Series(labels, dtype=object), sort=True)
    order = np.argsort(codes, kind="stable")
    bounds = np.r_[0, np.cumsum(np.bincount(codes))]
    cum = np.cumsum(fractions)
    for g in range(bounds.size - 1):
        cells = order[bounds[g]:bounds[g + 1]]
        cells = cells[rng.permutation(cells.size)]
        cut = np.rint(cum * cells.size).astype(np.int64)
        cut[0] = max(cut[0], 1)  # at least one training cell per label
        cut = np.minimum(np.maximum.accumulate(cut), cells.size)
        out[cells[:cut[0]]] = "train"
        out[cells[cut[0]:cut[1]]] = "val"
        out[cells[cut[1]:]] = "test"
    return out


def ood_candidates(screen) -> list:
    """Multi-perturbation labels whose every component occurs as a single-perturbation label
    among the screen's cells (sorted)."""
    n_comp = screen.n_components()
    labels = np.asarray(screen.labels)
    singles = set(labels[n_comp == 1])
    combos = sorted(set(labels[n_comp >= 2]))
    sep = screen.separator
    return [str(c) for c in combos if all(part in singles for part in c.split(sep))]


def _ood_split(screen, fractions, seed, ood_fraction, control_test_fraction) -> np.ndarray:
    if not 0 < ood_fraction <= 1:
        raise ValueError(f"ood_fraction must be in (0, 1], got {ood_fraction}")
    if not 0 <= control_test_fraction < 1:
        raise ValueError(f"control_test_fraction must be in [0, 1), got {control_test_fraction}")
    candidates = ood_candidates(screen)
    if not candidates:
        n_multi = int((screen.n_components() >= 2).sum())
        raise ValueError(
            "no combination can be held out: ood_combinations needs multi-perturbation cells whose "
            f"every component also has single-perturbation cells (this screen has {n_multi} "
            "multi-perturbation cells, none qualifying). Use kind='random' instead.")
    rng = np.random.default_rng([seed, 1])
    n_hold = max(1, int(np.rint(ood_fraction * len(candidates))))
    held = [candidates[i] for i in np.sort(rng.permutation(len(candidates))[:n_hold])]
    test = np.isin(np.asarray(screen.labels, dtype=object), np.asarray(held, dtype=object))
    controls = np.flatnonzero(np.asarray(screen.is_control, dtype=bool))
    n_ref = int(np.rint(control_test_fraction * controls.size))
    test[rng.permutation(controls)[:min(n_ref, controls.size - 1)]] = True
    out = np.full(screen.n_cells, "test", dtype="<U5")
    rest = np.flatnonzero(~test)
    tv = np.array([fractions[0], fractions[1], 0.0]) / (fractions[0] + fractions[1])
    out[rest] = _stratified(np.asarray(screen.labels)[rest], tv, rng)
    return out


def validate_split(values, n_cells: int, source: str = "split") -> np.ndarray:
    """Check an (n_cells,) array of train/val/test strings; return it as a numpy str array."""
    series = pd.Series(np.asarray(values, dtype=object).ravel())
    if series.size != n_cells:
        raise ValueError(f"{source} has {series.size} values for {n_cells} cells")
    if series.isna().any():
        raise ValueError(f"{source} has {int(series.isna().sum())} missing values; every cell needs "
                         f"one of {SPLIT_VALUES}")
    vals = series.astype(str).str.strip().str.lower().to_numpy()
    bad = sorted(set(vals) - set(SPLIT_VALUES))
    if bad:
        raise ValueError(f"{source} holds values {bad[:5]} besides {list(SPLIT_VALUES)}; "
                         "use exactly 'train', 'val' and 'test'")
    if not np.any(vals == "train"):
        raise ValueError(f"{source} assigns no cell to 'train'")
    return vals.astype("<U5")


def make_split(screen, kind: str = "random", *, fractions: Sequence[float] = (0.8, 0.1, 0.1),
               seed: int = 0, ood_fraction: float = 1.0, column: Optional[str] = None,
               control_test_fraction: float = 0.3) -> np.ndarray:
    """(n_cells,) array of ``"train"``/``"val"``/``"test"`` for the cells of ``screen``.

    kind: ``"random"``, ``"ood_combinations"``, or the name of an obs column holding the split
    (also ``kind="column", column=name``). Deterministic for a given seed.
    ``control_test_fraction``: ``ood_combinations`` only, the share of the control cells put in
    the test split as the held-out combinations' own reference (see the module docstring).
    """
    if kind == "random":
        f = _check_fractions(fractions)
        return _stratified(np.asarray(screen.labels), f, np.random.default_rng([seed, 0]))
    if kind == "ood_combinations":
        return _ood_split(screen, _check_fractions(fractions), seed, ood_fraction,
                          control_test_fraction)
    name = column if kind == "column" else kind
    if name is None:
        raise ValueError("kind='column' needs column='<obs column holding train/val/test>'")
    if name not in screen.obs.columns:
        raise ValueError(f"unknown split {name!r}: not 'random' or 'ood_combinations', and not an "
                         f"obs column (columns: {list(screen.obs.columns)})")
    return validate_split(screen.obs[name].to_numpy(), screen.n_cells, source=f"obs[{name!r}]")


def write_split(screen, split, column: str = "split") -> None:
    """Store a split in ``screen.obs[column]`` as a categorical train/val/test column."""
    vals = validate_split(split, screen.n_cells)
    screen.obs[column] = pd.Categorical(vals, categories=list(SPLIT_VALUES))


def split_indices(split) -> dict:
    """``{"train": idx, "val": idx, "test": idx}``: int64 row indices of each part."""
    vals = np.asarray(split)
    return {name: np.flatnonzero(vals == name).astype(np.int64) for name in SPLIT_VALUES}
