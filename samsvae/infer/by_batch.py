"""Treatment effects within batches of a covariate (cell line, donor, lane), and pooled.

With a batch key (``ScreenData.batch_codes``), the ATE of label t in batch b compares t's cells
of batch b with the control cells of batch b only (the evaluated ones; all of the batch's when
the evaluated cells hold none), so a difference between batches is never read as an effect:

    ATE_b(t) = mean_{i in t, b} y_i - mean_{i in control, b} y_i,   y = log2(1 + 1e4 x / library)

The model's ATE in batch b simulates cells with batch b's one-hot (a model trained with the
key; one without it predicts the same cells in every batch) at the depth of batch b's control
cells, scaled by the label's depth shift. Baselines use batch b's training cells only.

Pooled: ``ATE(t) = sum_b w_bt ATE_b(t) / sum_b w_bt`` with ``w_bt`` the evaluated cells of t
in batch b: the cell-weighted mean of the per-batch effects (the pooled ATE of a stratified
design: each cell's effect is measured against its own batch's controls), applied alike to the
data, the model, every baseline and the split halves, which are then scored as without batches.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ..data.loader import check_indices
from .ate import control_library, data_ate, group_ate, ate_label_groups, warn_untrained_parts
from .spread import gather_in_order, my_items


def has_batches(screen) -> bool:
    return getattr(screen, "batch_codes", None) is not None


def batch_rows(screen, rows: np.ndarray, b: int) -> np.ndarray:
    """``rows`` of batch ``b``, plus all control cells of batch ``b`` when none is among them."""
    codes = np.asarray(screen.batch_codes)
    sel = rows[codes[rows] == b]
    is_control = np.asarray(screen.is_control, dtype=bool)
    if not is_control[sel].any():
        sel = np.concatenate([sel, np.flatnonzero(is_control & (codes == b))])
    return sel


def label_batch_counts(screen, rows, labels: Sequence[str]) -> np.ndarray:
    """(n_labels, n_batches) int64: cells of each label among ``rows`` in each batch."""
    rows = check_indices(screen, rows)
    pos = {str(l): i for i, l in enumerate(labels)}
    lab = np.asarray(screen.labels).astype(str)[rows]
    codes = np.asarray(screen.batch_codes)[rows]
    out = np.zeros((len(labels), screen.n_batches), dtype=np.int64)
    for l, c in zip(lab, codes):
        i = pos.get(l)
        if i is not None:
            out[i, c] += 1
    return out


def pool(per_batch: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(n_batches, n, G) per-batch ATE (NaN rows where undefined) and (n, n_batches) cell
    weights -> (n, G) weighted mean over the batches with weight > 0 (NaN when any of those
    is undefined, or none has weight)."""
    w = np.asarray(weights, np.float64).T[:, :, None]                  # (n_batches, n, 1)
    used = w > 0
    bad = (used & ~np.all(np.isfinite(per_batch), axis=2, keepdims=True)).any(axis=0)
    total = np.where(used, np.nan_to_num(per_batch) * w, 0.0).sum(axis=0)
    out = total / np.maximum(w.sum(axis=0), 1e-300)
    out[np.broadcast_to(bad | (w.sum(axis=0) == 0), out.shape)] = np.nan
    return out


def data_ate_by_batch(screen, rows, labels: Sequence[str]):
    """``(per_batch (n_batches, n_labels, G), weights (n_labels, n_batches))``: each label's
    data ATE within each batch (NaN where the label has no evaluated cell in the batch)."""
    rows = check_indices(screen, rows)
    labels = [str(l) for l in labels]
    weights = label_batch_counts(screen, rows, labels)
    out = np.full((screen.n_batches, len(labels), screen.n_genes), np.nan)
    for b in range(screen.n_batches):
        if not weights[:, b].any():
            continue
        names, ate = data_ate(screen, batch_rows(screen, rows, b))
        pos = {l: i for i, l in enumerate(names)}
        for i, l in enumerate(labels):
            if weights[i, b] and l in pos:
                out[b, i] = ate[pos[l]]
    return out, weights


def model_ate_by_batch(model, screen, labels: Sequence[str], weights: np.ndarray, *,
                       n_samples: int = 2500, seed: int = 0, comm=None,
                       effects: str = "mean") -> np.ndarray:
    """(n_batches, n_labels, G) model ATE of each label in each batch where ``weights`` (n_labels,
    n_batches) is > 0 (NaN elsewhere): cells simulated with the batch's one-hot (models with a
    batch covariate) at the depth of the batch's control cells. Work items (batch, label group)
    are dealt over the ranks of ``comm``; each item's seed depends on its group alone."""
    labels = [str(l) for l in labels]
    out = np.full((screen.n_batches, len(labels), screen.n_genes), np.nan)
    if not labels:
        return out
    dosage, starts, group = ate_label_groups(screen, labels)
    if comm is None or comm.is_main:
        warn_untrained_parts(model, screen, dosage, labels)
    conditioned = bool(getattr(model, "n_batches", 0))
    items = [(b, gi) for b in range(screen.n_batches) for gi in range(len(starts))
             if weights[starts[gi]:starts[gi] + group, b].any()]
    libs = {}
    local = {}
    for k in my_items(len(items), comm):
        b, gi = items[k]
        if b not in libs:
            libs[b] = control_library(screen, seed, batch=b)
        local[k] = group_ate(model, dosage, starts[gi], group, gi, n_samples=n_samples,
                             seed=seed, library=libs[b], effects=effects,
                             batch=b if conditioned else None)
    results = gather_in_order(comm, local, len(items))
    for (b, gi), ate in zip(items, results):
        out[b, starts[gi]:starts[gi] + ate.shape[0]] = ate
    out[np.broadcast_to((weights.T == 0)[:, :, None], out.shape)] = np.nan
    return out


def compare_by_batch(screen, eval_indices, train_indices, labels: Sequence[str],
                     model_per_batch: Optional[np.ndarray] = None, *, seed: int = 0,
                     top_k: int = 20):
    """:func:`~samsvae.infer.harness.compare_with_baselines` within batches, and pooled.

    Returns ``(per_label, summary, reasons, info, by_batch, per_batch_label)``: the first four
    as ``compare_with_baselines`` on the pooled ATEs (data, model, baselines, split halves all
    pooled with the same cell weights); ``by_batch`` ``{batch name: {row: {metric: mean over
    the batch's labels, "n_labels", "n_cells"}}}``; ``per_batch_label`` a DataFrame with one
    row per (batch, label) and the columns ``{metric}_{row}``.
    """
    import pandas as pd
    from .baselines import BASELINES, baseline_ate, perturbed_shift
    from .harness import (METRICS, _nanmean, label_metrics, shared_reference_controls,
                          split_half_ate)
    labels = [str(l) for l in labels]
    rows = check_indices(screen, eval_indices)
    train = check_indices(screen, train_indices)
    n, g, nb = len(labels), screen.n_genes, screen.n_batches
    d_pb, w = data_ate_by_batch(screen, rows, labels)
    train_w = label_batch_counts(screen, train, labels)
    names = ["model"] if model_per_batch is not None else []
    names += list(BASELINES)
    preds = {k: np.full((nb, n, g), np.nan) for k in names}
    if model_per_batch is not None:
        preds["model"] = np.asarray(model_per_batch, np.float64)
    half_a, half_b = np.full((nb, n, g), np.nan), np.full((nb, n, g), np.nan)
    shifts, shift_w = np.zeros((nb, g)), np.zeros(nb)
    reasons = {k: {} for k in BASELINES}
    is_control = np.asarray(screen.is_control, dtype=bool)
    codes = np.asarray(screen.batch_codes)
    cats = [str(c) for c in screen.batch_categories]
    by_batch, frames = {}, []
    for b in range(nb):
        sel = np.flatnonzero(w[:, b] > 0)
        if sel.size == 0:
            continue
        lab_b = [labels[i] for i in sel]
        eval_b, train_b = batch_rows(screen, rows, b), batch_rows(screen, train, b)
        base = baseline_ate(screen, train_b, lab_b)
        for k, ate in base.ate.items():
            preds[k][b, sel] = ate
        for k, why in base.reasons.items():
            for l, r in zip(lab_b, why):
                if r:
                    reasons[k][l] = f"{cats[b]}: {r}"
        a, c = split_half_ate(screen, eval_b, lab_b, seed=seed)
        half_a[b, sel], half_b[b, sel] = a, c
        shifts[b] = perturbed_shift(screen, train_b)
        shift_w[b] = int((~is_control[train] & (codes[train] == b)).sum())
        true = d_pb[b, sel]
        summary_b, cols = {}, {}
        for k in names + ["split_half"]:
            s = (label_metrics(a, c, shift=shifts[b], top_k=top_k) if k == "split_half"
                 else label_metrics(preds[k][b, sel], true, shift=shifts[b], top_k=top_k))
            summary_b[k] = {m: _nanmean(s[m]) for m in METRICS}
            summary_b[k]["n_labels"] = int(np.isfinite(s["ate_pearson"]).sum())
            for m in METRICS:
                cols[f"{m}_{k}"] = s[m]
        by_batch[cats[b]] = dict(summary_b, n_cells=int(w[sel, b].sum()))
        frame = pd.DataFrame({"batch": cats[b], "label": lab_b, "n_cells_train": train_w[sel, b],
                              "n_cells_eval": w[sel, b], **cols})
        frames.append(frame)
    true = pool(d_pb, w)
    shift = (shifts * shift_w[:, None]).sum(0) / max(shift_w.sum(), 1.0)
    n_eval = w.sum(axis=1)
    per_label = pd.DataFrame({"n_cells_train": train_w.sum(axis=1), "n_cells": n_eval},
                             index=pd.Index(labels, name="label"))
    summary = {}
    pooled = {k: pool(v, w) for k, v in preds.items()}
    for k in names + ["split_half"]:
        s = (label_metrics(pool(half_a, w), pool(half_b, w), shift=shift, top_k=top_k)
             if k == "split_half" else label_metrics(pooled[k], true, shift=shift, top_k=top_k))
        defined = (np.isfinite(s["ate_pearson"]) if k == "split_half"
                   else np.all(np.isfinite(pooled[k]), axis=1) if n else np.zeros(0, bool))
        for m in METRICS:
            per_label[f"{m}_{k}"] = s[m]
        summary[k] = {m: _nanmean(s[m]) for m in METRICS}
        summary[k].update(n_labels=int(defined.sum()), n_cells=int(n_eval[defined].sum()))
    per_batch_label = (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame())
    info = {"linear_alpha": None, "baselines": list(BASELINES),
            "mean_abs_data_ate": float(np.nanmean(np.abs(true))) if true.size else float("nan"),
            "pooling": "cell-weighted mean of the per-batch ATEs",
            "shared_reference_controls": shared_reference_controls(screen, eval_indices,
                                                                   train_indices)}
    return per_label, summary, reasons, info, by_batch, per_batch_label
