"""``evaluate_model``: every metric of a trained model on a set of cells, in one dict."""
from __future__ import annotations

import numpy as np

from ..data.loader import check_indices
from .ate import ate_pearson, data_ate, label_dosage, model_ate
from .by_batch import data_ate_by_batch, has_batches, model_ate_by_batch, pool
from .iwelbo import cells_iwelbo
from .masks import mask_recovery


def _true_masks(screen, ground_truth) -> np.ndarray:
    """(T, L_true) true masks in the order of ``screen.perturbations``."""
    masks = np.asarray(ground_truth["masks"])
    names = ground_truth.get("perturbations")
    if names is None:
        return masks
    pos = {str(n): i for i, n in enumerate(np.asarray(names).ravel())}
    missing = [p for p in screen.perturbations if p not in pos]
    if missing:
        raise ValueError(f"the ground truth has no masks for perturbations {missing[:5]}")
    return masks[[pos[p] for p in screen.perturbations]]


def evaluate_model(model, screen, indices, *, iwelbo_particles: int = 100,
                   ate_particles: int = 2500, seed: int = 0, batch_size: int = 512,
                   comm=None, min_cells: int = 0) -> dict:
    """Test IWELBO, ATE Pearson and (simulated screens) mask recovery on the cells ``indices``.

    Args:
        model: a trained ``samsvae.models.PerturbationModel`` (any device).
        screen: the ``samsvae.data.ScreenData`` it was trained on (same genes and perturbations).
        indices: (n,) rows (or an (n_cells,) bool mask) of the evaluated cells (e.g. the test
            split).
        iwelbo_particles: importance samples per cell. ate_particles: simulated cells per
            condition for the model ATE. seed: seed of every Monte Carlo estimate.
        batch_size: cells per IWELBO batch.
        comm: a process group (``samsvae.train.distributed.init_from_env``) over which the
            IWELBO batches and the model-ATE label groups are spread; every rank calls this and
            gets the same dict, equal to the single-process one. None: one process.
        min_cells: labels with fewer evaluated cells are left out of the ATE metrics (listed in
            ``ate_labels_left_out``, counted in ``n_ate_labels_left_out``); 0 keeps all.

    Returns:
        ``test_iwelbo`` (mean nats per cell), ``n_cells`` (cells evaluated),
        ``n_cells_unpredictable`` (cells left out because the model cannot represent their
        condition: SVAE+ and combinations absent from its label vocabulary), ``ate_pearson``,
        ``ate_pearson_top20``, ``n_ate_labels`` (None when no perturbed cell is evaluated or the
        screen has no control), the arrays ``ate_labels``, ``data_ate``, ``model_ate``,
        ``ate_pearson_per_label``, and ``ate_labels_unpredictable`` (labels the model cannot
        predict, left out of the ATE: SVAE+ and combinations it never saw); with
        ``screen.ground_truth`` holding masks:
        ``mask_f1``, ``mask_precision``, ``mask_recall`` (None for models without masks:
        cvae, cpa_vae).

        With a batch covariate (``screen.batch_codes``): ``data_ate`` / ``model_ate`` are the
        pooled (cell-weighted mean over batches) of the ATEs within each batch against that
        batch's controls (``samsvae.infer.by_batch``), ``ate_pearson`` scores them;
        ``ate_by_batch`` ``{batch: {"ate_pearson", "ate_pearson_top20", "n_labels"}}``, the
        arrays ``data_ate_by_batch`` / ``model_ate_by_batch`` (n_batches, n_labels, G) and
        ``ate_batch_weights`` (n_labels, n_batches) evaluated cells.
    """
    rows = check_indices(screen, indices)
    if rows.size == 0:
        raise ValueError("no cells to evaluate: indices is empty (is the split empty?)")
    all_rows = rows
    known = model.known_conditions(screen.dosage[rows])
    out = {"n_cells_unpredictable": int((~known).sum())}
    rows = rows[known]
    if rows.size == 0:
        raise ValueError("the model cannot evaluate any of these cells (SVAE+ with "
                         "perturbation combinations it was not built with)")
    iw = cells_iwelbo(model, screen, rows, batch_size=batch_size, particles=iwelbo_particles,
                      global_seed=seed, comm=comm)
    out.update(test_iwelbo=float(np.mean(iw)), n_cells=int(rows.size))

    out.update(ate_pearson=None, ate_pearson_top20=None, n_ate_labels=0)
    if np.asarray(screen.is_control).any():
        labels, d_ate = data_ate(screen, all_rows)
        if min_cells > 0 and labels:
            names, sizes = np.unique(np.asarray(screen.labels).astype(str)[all_rows],
                                     return_counts=True)
            size = dict(zip(names.tolist(), sizes.tolist()))
            enough = np.array([size.get(l, 0) >= min_cells for l in labels], dtype=bool)
            out["ate_labels_left_out"] = [l for l, k in zip(labels, enough) if not k]
            labels = [l for l, k in zip(labels, enough) if k]
            d_ate = d_ate[enough]
        out["n_ate_labels_left_out"] = len(out.get("ate_labels_left_out", []))
        known = model.known_conditions(label_dosage(screen, labels)) if labels else []
        if labels and not np.all(known):
            out["ate_labels_unpredictable"] = [l for l, k in zip(labels, known) if not k]
            labels = [l for l, k in zip(labels, known) if k]
            d_ate = d_ate[np.asarray(known, dtype=bool)]
        if labels and has_batches(screen):
            d_pb, weights = data_ate_by_batch(screen, all_rows, labels)
            m_pb = model_ate_by_batch(model, screen, labels, weights, n_samples=ate_particles,
                                      seed=seed, comm=comm)
            d_ate, m_ate = pool(d_pb, weights), pool(m_pb, weights)
            by_batch = {}
            for b, name in enumerate(screen.batch_categories):
                sel = weights[:, b] > 0
                if sel.any():
                    rb = ate_pearson(m_pb[b, sel], d_pb[b, sel], top_k=20)
                    by_batch[str(name)] = {"ate_pearson": rb["ate_pearson"],
                                           "ate_pearson_top20": rb["ate_pearson_top20"],
                                           "n_labels": int(sel.sum()),
                                           "n_cells": int(weights[sel, b].sum())}
            out.update(ate_by_batch=by_batch, data_ate_by_batch=d_pb, model_ate_by_batch=m_pb,
                       ate_batch_weights=weights, batch_key=screen.batch_key)
        elif labels:
            m_ate = model_ate(model, screen, labels, n_samples=ate_particles, seed=seed,
                              comm=comm)
        if labels:
            r = ate_pearson(m_ate, d_ate, top_k=20)
            out.update(ate_pearson=r["ate_pearson"], ate_pearson_top20=r["ate_pearson_top20"],
                       n_ate_labels=len(labels), ate_labels=list(labels), data_ate=d_ate,
                       model_ate=m_ate, ate_pearson_per_label=r["ate_pearson_per_label"])

    out.update(mask_metrics(model, screen))
    return out


def mask_metrics(model, screen) -> dict:
    """``mask_f1/precision/recall`` against the simulator's true masks; {} without ground truth,
    None values for models without masks (cvae, cpa_vae)."""
    truth = getattr(screen, "ground_truth", None)
    if truth is None or "masks" not in truth:
        return {}
    learned = model.perturbation_masks()
    if learned is None:
        return dict(mask_f1=None, mask_precision=None, mask_recall=None)
    rec = mask_recovery(learned, _true_masks(screen, truth))
    return dict(mask_f1=rec["f1"], mask_precision=rec["precision"], mask_recall=rec["recall"])
