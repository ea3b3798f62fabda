"""The evaluation harness: any tool's predicted ATE against the data's, beside the baselines.

Metrics per label (``METRICS``; predicted and data ATE in log2 units of normalised expression,
``log2(1 + 1e4 x / library)``, label minus control):

* ``ate_pearson``: Pearson r over all genes (higher is better, 1 = perfect).
* ``ate_pearson_top20``: Pearson r over the label's 20 genes of largest |data ATE|.
* ``mse_top20``: mean squared error over those 20 genes (log2 units squared; lower is better).
* ``sign_top20``: fraction of those 20 genes whose predicted ATE has the data's sign (a zero
  prediction agrees with nothing; 0.5 is chance).
* ``systema_pearson``: Pearson r over all genes after subtracting, from both sides, the mean
  shift of all perturbed TRAINING cells vs control (Systema): what is left is what is specific
  to the label, not the shift every perturbation shares.

The split-half ceiling (:func:`split_half_ate`) scores, with the same metrics, the ATE of one
random half of a label's evaluated cells (and of the control cells) against the other half: the
agreement the data's own noise allows (with half the cells on each side, so a conservative
ceiling). Below ~0.2 the label's effect is indistinguishable from noise.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import numpy as np

from ..data.loader import check_indices
from .ate import _group_means, data_ate, pearson

METRICS = ("ate_pearson", "ate_pearson_top20", "mse_top20", "sign_top20", "systema_pearson")
TOP_K = 20
NOISE_CEILING = 0.2
METRIC_LEGEND = (
    "pearson: r of predicted vs data ATE (log2 units), 1 best, all genes / top20: the 20 of largest "
    "|data ATE| / systema: minus the shift of all perturbed training cells;\n"
    "mse_top20: log2 units^2, 0 best; sign_top20: fraction with the data's sign, 1 best (0.5 "
    "chance); split_half: data half vs half (noise ceiling); n/a: undefined")


def label_metrics(pred: np.ndarray, true: np.ndarray, *, shift: Optional[np.ndarray] = None,
                  top_k: int = TOP_K) -> dict:
    """Per-label metrics of ``METRICS`` for (n, G) predicted vs data ATE (rows = labels).

    ``shift``: (G,) mean shift of all perturbed training cells vs control, for
    ``systema_pearson`` (NaN without it). A NaN prediction row gives NaN metrics.
    Returns ``{metric: (n,) float64}``.
    """
    p, d = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    if p.shape != d.shape or p.ndim != 2:
        raise ValueError(f"predicted and data ATE must be (labels, genes) of the same shape, "
                         f"got {p.shape} and {d.shape}")
    n = p.shape[0]
    k = min(top_k, p.shape[1])
    out = {m: np.full(n, np.nan) for m in METRICS}
    for i in range(n):
        if not np.all(np.isfinite(p[i])):
            continue
        out["ate_pearson"][i] = pearson(p[i], d[i])
        sel = np.argsort(-np.abs(np.nan_to_num(d[i])), kind="stable")[:k]
        out["ate_pearson_top20"][i] = pearson(p[i, sel], d[i, sel])
        out["mse_top20"][i] = float(np.mean((p[i, sel] - d[i, sel]) ** 2))
        out["sign_top20"][i] = float(np.mean(np.sign(p[i, sel]) == np.sign(d[i, sel])))
        if shift is not None:
            out["systema_pearson"][i] = pearson(p[i] - shift, d[i] - shift)
    return out


def _nanmean(v) -> float:
    v = np.asarray(v, dtype=np.float64)
    return float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")


PAIRED_METRICS = ("ate_pearson", "ate_pearson_top20")


def paired_difference(model_scores, baseline_scores) -> dict:
    """Model minus a baseline, label by label, on the labels where both are defined.

    Both arguments are (n_labels,) per-label scores of one metric (higher is better), on the
    same labels in the same order. Labels share the data's noise, so the per-label difference
    is far less noisy than the difference of two means taken apart.

    Returns ``{"diff": mean difference, "se": its standard error (sd / sqrt(n), NaN for n < 2),
    "ahead": labels where the model scores higher, "n": labels compared, "verdict": "ahead" /
    "behind" when the mean difference is more than two standard errors from 0, else "within
    noise"}``.
    """
    a = np.asarray(model_scores, np.float64)
    b = np.asarray(baseline_scores, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"per-label scores of different shapes: {a.shape} and {b.shape}")
    d = (a - b)[np.isfinite(a) & np.isfinite(b)]
    n = int(d.size)
    diff = float(d.mean()) if n else float("nan")
    se = float(d.std(ddof=1) / np.sqrt(n)) if n >= 2 else float("nan")
    if not (np.isfinite(diff) and np.isfinite(se)) or abs(diff) <= 2 * se:
        verdict = "within noise"
    else:
        verdict = "ahead" if diff > 0 else "behind"
    return {"diff": diff, "se": se, "ahead": int((d > 0).sum()), "n": n, "verdict": verdict}


def paired_differences(per_label, rows: Sequence[str], metrics: Sequence[str] = PAIRED_METRICS
                       ) -> dict:
    """``{row: {metric: paired_difference(model, row)}}`` from a ``compare_with_baselines``
    per-label table (columns ``{metric}_{row}``, with a ``model`` row); rows the table lacks,
    or that are undefined on every label (``control``'s Pearson), are skipped."""
    out = {}
    for row in rows:
        if any(f"{m}_{row}" not in per_label for m in metrics):
            continue
        diffs = {m: paired_difference(per_label[f"{m}_model"], per_label[f"{m}_{row}"])
                 for m in metrics}
        if any(d["n"] for d in diffs.values()):
            out[row] = diffs
    return out


def split_half_ate(screen, indices, labels: Sequence[str], *, seed: int = 0):
    """(half A ATE, half B ATE), each (n_labels, G): every label's evaluated cells, and the
    control cells (those among ``indices``, else all of the screen's, as in ``data_ate``),
    split at random into two halves (fixed ``seed``); each half's label mean minus the same
    half's control mean. A label with fewer than 2 cells gets NaN rows."""
    rows = check_indices(screen, indices)
    labels = [str(l) for l in labels]
    labels_all = np.asarray(screen.labels).astype(str)
    is_control = np.asarray(screen.is_control, dtype=bool)
    ctrl = rows[is_control[rows]]
    if ctrl.size == 0:
        ctrl = np.flatnonzero(is_control)
    pos = {lab: i for i, lab in enumerate(labels)}
    rng = np.random.default_rng(seed)
    n = len(labels)
    sel_rows, group = [], []
    for lab_rows, gi in [(rows[labels_all[rows] == lab], pos[lab]) for lab in labels] + \
            [(ctrl, n)]:
        perm = rng.permutation(lab_rows)
        half = perm.size // 2
        sel_rows += [perm[:half], perm[half:2 * half]]
        group += [np.full(half, 2 * gi, np.int64), np.full(half, 2 * gi + 1, np.int64)]
    means = _group_means(screen, np.concatenate(sel_rows), np.concatenate(group), 2 * n + 2)
    a = means[0:2 * n:2] - means[2 * n]
    b = means[1:2 * n:2] - means[2 * n + 1]
    sizes = np.bincount(np.concatenate(group), minlength=2 * n + 2)
    empty = sizes[0:2 * n:2] == 0
    a[empty], b[empty] = np.nan, np.nan
    return a, b


def data_ate_anndata(screen, indices, *, train_indices=None, labels: Optional[Sequence[str]] = None,
                     seed: int = 0):
    """The data's ATE as an AnnData for :func:`evaluate_predictions` (obs = labels, var = genes).

    Args:
        indices: the evaluated cells (rows or bool mask).
        train_indices: the training cells: gives ``obs["n_cells_train"]`` and
            ``var["perturbed_shift"]`` (mean shift of all perturbed training cells vs control,
            for the Systema metric).
        labels: keep these labels only (default: every non-control label among ``indices``).
        seed: seed of the split-half ceiling.

    Returns:
        AnnData: ``X`` (n_labels, G) data ATE (float64, log2 units), ``obs["n_cells"]`` (evaluated
        cells per label), ``obs["n_cells_train"]``, ``layers["split_half_a"/"split_half_b"]``
        (the two halves' ATE), ``var["perturbed_shift"]`` (with ``train_indices``).
    """
    import anndata
    import pandas as pd
    from .baselines import perturbed_shift
    rows = check_indices(screen, indices)
    all_labels, ate = data_ate(screen, rows)
    if labels is not None:
        keep = {str(l) for l in labels}
        sel = [i for i, l in enumerate(all_labels) if l in keep]
        all_labels, ate = [all_labels[i] for i in sel], ate[sel]
    labels_all = np.asarray(screen.labels).astype(str)
    counts = dict(zip(*np.unique(labels_all[rows], return_counts=True)))
    obs = pd.DataFrame({"n_cells": [int(counts.get(l, 0)) for l in all_labels]},
                       index=pd.Index(all_labels, dtype=str))
    var = pd.DataFrame(index=pd.Index(np.asarray(screen.gene_names).astype(str), dtype=str))
    if train_indices is not None:
        train = check_indices(screen, train_indices)
        tcounts = dict(zip(*np.unique(labels_all[train], return_counts=True)))
        obs["n_cells_train"] = [int(tcounts.get(l, 0)) for l in all_labels]
        var["perturbed_shift"] = perturbed_shift(screen, train)
    out = anndata.AnnData(X=np.asarray(ate, np.float64), obs=obs, var=var)
    a, b = split_half_ate(screen, rows, all_labels, seed=seed)
    out.layers["split_half_a"], out.layers["split_half_b"] = a, b
    return out


def _label_key(label: str, sep: str = "+") -> str:
    return sep.join(sorted(p.strip() for p in str(label).split(sep)))


def evaluate_predictions(adata_pred, adata_true=None, *, perturbed_shift=None,
                         top_k: int = TOP_K, min_cells: int = 0, layer: Optional[str] = None):
    """Score predicted ATEs against the data's, per label.

    Args:
        adata_pred: AnnData of predicted ATE (obs = labels, var = genes; ``X`` or ``layer``),
            from samsvae (``SAMSVAE.average_treatment_effects``, :func:`baseline_anndata`) or
            any other tool; labels are matched by name, then by their parts in any order
            (``"B+A"`` = ``"A+B"``); genes by name.
        adata_true: AnnData of the data ATE (:func:`data_ate_anndata`); default: ``adata_pred``'s
            own ``layers["data_ate"]`` (as ``SAMSVAE.average_treatment_effects`` returns).
        perturbed_shift: (G,) shift of all perturbed training cells vs control for
            ``systema_pearson`` (default: ``adata_true.var["perturbed_shift"]`` when present).
        top_k: genes of largest |data ATE| for the top-k metrics (the column names say 20).
        min_cells: leave out labels with fewer evaluated cells (``adata_true.obs["n_cells"]``).

    Returns:
        pandas DataFrame indexed by label: the columns of ``METRICS``, ``n_cells`` /
        ``n_cells_train`` when the data AnnData has them, and ``split_half`` (the split-half
        ``ate_pearson``) when it has the halves; ``.mean()`` averages over labels. Its
        ``attrs["left_out"]`` lists labels left out by ``min_cells``, ``attrs["unmatched"]`` the
        data labels without a prediction.
    """
    import pandas as pd
    if adata_true is None:
        if "data_ate" not in adata_pred.layers:
            raise ValueError("give adata_true (the data ATE, e.g. samsvae.infer.data_ate_anndata) "
                             "or a prediction carrying layers['data_ate']")
        true_x, true_obs, true_var = adata_pred.layers["data_ate"], adata_pred.obs, adata_pred.var
        true_layers = {}
    else:
        true_x, true_obs, true_var = adata_true.X, adata_true.obs, adata_true.var
        true_layers = adata_true.layers
    pred_x = adata_pred.layers[layer] if layer else adata_pred.X
    pred_x, true_x = _dense(pred_x), _dense(true_x)
    genes_t = [str(g) for g in true_var.index]
    gpos = {str(g): i for i, g in enumerate(adata_pred.var_names)}
    common = [g for g in genes_t if g in gpos]
    if not common:
        raise ValueError("the predicted and data AnnData share no gene name (var_names)")
    gsel_t = np.array([i for i, g in enumerate(genes_t) if g in gpos])
    gsel_p = np.array([gpos[g] for g in common])
    by_name = {str(l): i for i, l in enumerate(adata_pred.obs_names)}
    by_key = {_label_key(l): i for l, i in by_name.items()}
    labels_t = [str(l) for l in true_obs.index]
    n_cells = (np.asarray(true_obs["n_cells"]) if "n_cells" in true_obs
               else np.full(len(labels_t), -1))
    rows_t, rows_p, kept, left_out, unmatched = [], [], [], [], []
    for i, lab in enumerate(labels_t):
        if min_cells and n_cells[i] >= 0 and n_cells[i] < min_cells:
            left_out.append(lab)
            continue
        j = by_name.get(lab, by_key.get(_label_key(lab)))
        if j is None:
            unmatched.append(lab)
            continue
        rows_t.append(i)
        rows_p.append(j)
        kept.append(lab)
    if unmatched:
        warnings.warn(f"no prediction for {len(unmatched)} data label(s): "
                      f"{', '.join(unmatched[:10])}{' ...' if len(unmatched) > 10 else ''}; "
                      "they are left out of the scores", stacklevel=2)
    pred = pred_x[rows_p][:, gsel_p]
    true = true_x[rows_t][:, gsel_t]
    if perturbed_shift is None and "perturbed_shift" in true_var:
        perturbed_shift = np.asarray(true_var["perturbed_shift"], np.float64)
    shift = None if perturbed_shift is None else np.asarray(perturbed_shift, np.float64)[gsel_t]
    scores = label_metrics(pred, true, shift=shift, top_k=top_k)
    df = pd.DataFrame(scores, index=pd.Index(kept, name="label"))
    for col in ("n_cells", "n_cells_train"):
        if col in true_obs:
            df[col] = np.asarray(true_obs[col])[rows_t]
    if "split_half_a" in true_layers:
        a = _dense(true_layers["split_half_a"])[rows_t][:, gsel_t]
        b = _dense(true_layers["split_half_b"])[rows_t][:, gsel_t]
        df["split_half"] = label_metrics(a, b, shift=shift, top_k=top_k)["ate_pearson"]
    df.attrs["left_out"] = left_out
    df.attrs["unmatched"] = unmatched
    return df


def shared_reference_controls(screen, eval_indices, train_indices) -> int:
    """Training control cells in the reference of the evaluated cells' data ATE: 0 when the
    evaluated cells hold control cells of their own, else the training controls among the
    screen's (which ``data_ate`` then uses). See :func:`compare_with_baselines`."""
    is_control = np.asarray(screen.is_control, dtype=bool)
    rows = check_indices(screen, eval_indices)
    if is_control[rows].any():
        return 0
    return int(is_control[check_indices(screen, train_indices)].sum())


def _dense(x) -> np.ndarray:
    if hasattr(x, "toarray"):
        x = x.toarray()
    return np.asarray(x, dtype=np.float64)


def compare_with_baselines(screen, eval_indices, train_indices, labels: Sequence[str],
                           model_ate: Optional[np.ndarray] = None, *, seed: int = 0,
                           top_k: int = TOP_K):
    """The model (when given) and every baseline scored on the same ``labels``.

    Args:
        eval_indices / train_indices: evaluated and training cells.
        labels: the evaluated labels (each with cells in ``eval_indices``).
        model_ate: (n_labels, G) the model's ATE for ``labels`` (None: baselines only).

    Returns:
        ``(per_label, summary, reasons)``: ``per_label`` a DataFrame indexed by label with
        ``n_cells_train``, ``n_cells`` and ``{metric}_{row}`` for the rows ``model`` (if any),
        each baseline and ``split_half``; ``summary`` ``{row: {metric: mean over labels,
        "n_labels": labels with a defined prediction, "n_cells": their evaluated cells}}``;
        ``reasons`` ``{baseline: {label: why undefined}}``; ``info`` ``{"linear_alpha",
        "mean_abs_data_ate", "baselines", "shared_reference_controls"}``. Returned as
        ``(per_label, summary, reasons, info)``.

    ``shared_reference_controls``: when the evaluated cells hold no control cell, the data ATE
    is measured against all of the screen's (``data_ate``); this counts the training cells among
    them. The baselines subtract the same training controls, so they share that reference's
    noise with the data and score higher than on an independent reference (norman2019's
    held-out doubles: additive r = 0.83 against the same 50 control cells, 0.37 against the
    other 50; ``benchmarks/control_reference.py``). 0 when the evaluated split has its own controls.
    """
    import pandas as pd
    from .baselines import BASELINES, baseline_ate, perturbed_shift
    labels = [str(l) for l in labels]
    rows = check_indices(screen, eval_indices)
    train = check_indices(screen, train_indices)
    all_labels, d_all = data_ate(screen, rows)
    pos = {l: i for i, l in enumerate(all_labels)}
    missing = [l for l in labels if l not in pos]
    if missing:
        raise ValueError(f"labels without evaluated cells: {missing[:5]}")
    true = d_all[[pos[l] for l in labels]] if labels else np.zeros((0, screen.n_genes))
    shift = perturbed_shift(screen, train)
    base = baseline_ate(screen, train, labels)
    labels_all = np.asarray(screen.labels).astype(str)
    counts = dict(zip(*np.unique(labels_all[rows], return_counts=True)))
    n_eval = np.array([int(counts.get(l, 0)) for l in labels], dtype=np.int64)
    preds = {}
    if model_ate is not None:
        preds["model"] = np.asarray(model_ate, np.float64)
    preds.update(base.ate)
    a, b = split_half_ate(screen, rows, labels, seed=seed)
    per_label = pd.DataFrame({"n_cells_train": base.n_cells_train, "n_cells": n_eval},
                             index=pd.Index(labels, name="label"))
    summary = {}
    for name, pred in list(preds.items()) + [("split_half", None)]:
        scores = (label_metrics(a, b, shift=shift, top_k=top_k) if pred is None
                  else label_metrics(pred, true, shift=shift, top_k=top_k))
        defined = np.isfinite(scores["ate_pearson"]) if pred is None else \
            np.all(np.isfinite(pred), axis=1) if len(labels) else np.zeros(0, bool)
        for m in METRICS:
            per_label[f"{m}_{name}"] = scores[m]
        summary[name] = {m: _nanmean(scores[m]) for m in METRICS}
        summary[name].update(n_labels=int(defined.sum()), n_cells=int(n_eval[defined].sum()))
    reasons = {name: {l: r for l, r in zip(labels, why) if r}
               for name, why in base.reasons.items()}
    return per_label, summary, reasons, {"linear_alpha": base.linear_alpha,
                                         "mean_abs_data_ate": float(np.mean(np.abs(true)))
                                         if true.size else float("nan"),
                                         "baselines": list(BASELINES),
                                         "shared_reference_controls":
                                             shared_reference_controls(screen, rows, train)}
