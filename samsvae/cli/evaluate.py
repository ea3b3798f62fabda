"""``samsvae evaluate RUN_DIR``: test IWELBO, ATE Pearson and mask recovery of a trained run.

    samsvae evaluate RUN_DIR [--data DATA.h5ad] [--iwelbo-particles 100] [--ate-particles 2500]
                             [--split test] [--min-cells 20] [--plots] [--batch-size 512]

Writes ``RUN_DIR/metrics.json``, ``RUN_DIR/ate_per_label.csv`` (and ``RUN_DIR/plots/*.png``
with ``--plots``) and prints the metrics, then the model beside the baselines that need no
model (control, train_mean, additive, linear) and the split-half ceiling, on the same labels.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from .. import ops
from ..infer import (
    METRIC_LEGEND,
    METRICS,
    NOISE_CEILING,
    compare_with_baselines,
    data_ate,
    evaluate_model,
    masks_untrained,
    model_ate,
    paired_differences,
)
from ..infer import plots as figures
from ..data import with_batches
from ..infer.by_batch import compare_by_batch
from ..infer.masks import UNTRAINED_MASK_TOLERANCE
from ..train.checkpoint import atomic_write_text
from ..train.distributed import init_from_env, shutdown
from ..train.run_dir import load_run, plain_json
from .execution import add_execution_arguments

MIN_CELLS = 20
# mean |model ATE| above this many times the data's: the model invents effects
ATE_MAGNITUDE_RATIO = 2.0
TABLE_ROWS = ("model", "control", "train_mean", "additive", "linear", "split_half")


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="directory written by samsvae train")
    parser.add_argument("--data", default=None, metavar="DATA.h5ad",
                        help="screen to evaluate on (default: the run's training file)")
    parser.add_argument("--iwelbo-particles", type=int, default=100,
                        help="importance samples per cell for the test IWELBO (default: 100)")
    parser.add_argument("--ate-particles", type=int, default=2500,
                        help="simulated cells per condition for the model ATE (default: 2500)")
    parser.add_argument("--split", default="test",
                        help="cells to evaluate: train | val | test | all (default: test)")
    parser.add_argument("--min-cells", type=int, default=MIN_CELLS, metavar="N",
                        help="leave out of every ATE metric the labels with fewer than N cells in "
                             "the evaluated split (their ATE is mostly noise); the number left "
                             f"out is printed (default: {MIN_CELLS}; 0 keeps all)")
    parser.add_argument("--plots", action="store_true",
                        help="also write PNG figures into RUN_DIR/plots/")
    parser.add_argument("--batch-size", type=int, default=512,
                        help="cells per IWELBO batch (default: 512)")
    parser.add_argument("--batch-key", default=None, metavar="COL",
                        help="compute treatment effects within each batch of this obs column "
                             "(against that batch's controls) and pool them, for a run trained "
                             "without --batch-key (a run trained with one always does, with its "
                             "own key)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the Monte Carlo estimates")
    add_execution_arguments(parser, what="this evaluation")


def run(args) -> int:
    comm = init_from_env(args.device)  # under torchrun: cells spread over the processes
    completed = False
    try:
        if args.min_cells < 0:
            raise ValueError(f"--min-cells must be >= 0, got {args.min_cells}")
        for name in ("iwelbo_particles", "ate_particles", "batch_size"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, "
                                 f"got {getattr(args, name)}")
        device = args.device if comm is None else comm.device
        if args.backend != "auto":  # an explicit backend must exist here: fail before any work
            ops.backends.require_backend(args.backend, device)
        ops.backends.set_tf32(getattr(args, "tf32", False), device)
        loaded = load_run(args.run_dir, data=args.data, map_location=device)
        key = getattr(args, "batch_key", None)
        if key is not None:
            loaded = with_batch_key(loaded, key)
        with ops.use_backend(args.backend):
            metrics = evaluate_run(loaded, split=args.split,
                                   iwelbo_particles=args.iwelbo_particles,
                                   ate_particles=args.ate_particles, batch_size=args.batch_size,
                                   seed=args.seed, plots=args.plots, data_path=args.data,
                                   comm=comm, min_cells=args.min_cells)
        completed = True
    except (ValueError, FileNotFoundError, ops.BackendUnavailableError) as exc:
        if os.environ.get("SAMSVAE_DEBUG"):
            raise
        print(f"samsvae evaluate: error: {exc}", file=sys.stderr)
        return 2
    finally:
        shutdown(comm, completed=completed)
    if comm is None or comm.is_main:
        print_metrics(metrics)
        print(f"wrote {Path(args.run_dir) / 'metrics.json'}")
        if metrics.get("plots"):
            print(f"wrote {len(metrics['plots'])} plots (PNG) to {Path(args.run_dir) / 'plots'}")
    return 0


def with_batch_key(loaded, key: str):
    """``loaded`` with its screen's batches read from ``obs[key]`` (``--batch-key``)."""
    import dataclasses
    own = loaded.config["data"].get("batch_key")
    if own is not None:
        if own != key:
            raise ValueError(f"this run was trained with --batch-key {own}; evaluate it with "
                             f"that key (or leave out --batch-key), not {key}")
        return loaded
    return dataclasses.replace(loaded, screen=with_batches(loaded.screen, key))


def evaluate_run(loaded, *, split: str = "test", iwelbo_particles: int = 100,
                 ate_particles: int = 2500, batch_size: int = 512, seed: int = 0,
                 plots: bool = False, data_path=None, comm=None, min_cells: int = 0,
                 baselines: bool = True) -> dict:
    """Evaluate a :class:`~samsvae.train.run_dir.LoadedRun` on one split; write metrics.json.

    Returns the metrics dict: ``test_iwelbo`` (mean nats per cell), ``ate_pearson``,
    ``ate_pearson_top20``, ``n_cells``, ``mask_f1``/``mask_precision``/``mask_recall`` when the
    data carry simulated ground truth, plus ``split``, the particle counts and ``seconds``.
    ``comm`` (``samsvae.train.distributed.init_from_env``): every process of the group calls
    this; the cells and ATE label groups are spread over them, rank 0 writes the files.

    ``min_cells``: labels with fewer evaluated cells are left out of every ATE metric.
    ``baselines`` (default): also score the baselines and the split-half ceiling on the same
    labels: ``metrics["baselines"]`` (``{name: {metric: mean}}``, ``split_half``, ``n_labels``,
    ``n_labels_left_out``), the model's ``ate_mse_top20`` / ``ate_sign_top20`` /
    ``ate_systema_pearson``, ``notes`` (lines for the user) and ``RUN_DIR/ate_per_label.csv``.
    """
    t0 = time.perf_counter()
    idx = loaded.indices(split)
    raw = evaluate_model(loaded.model, loaded.screen, idx, iwelbo_particles=iwelbo_particles,
                         ate_particles=ate_particles, seed=seed, batch_size=batch_size,
                         comm=comm, min_cells=min_cells)
    if comm is not None and not comm.is_main:
        return {k: plain_json(v) for k, v in raw.items() if _is_scalar(v)}
    metrics = {k: plain_json(v) for k, v in raw.items() if _is_scalar(v)}
    if "ate_by_batch" in raw:
        metrics["ate_by_batch"] = plain_json(raw["ate_by_batch"])
        metrics["ate_pooling"] = "cell-weighted mean of the per-batch ATEs"
    per_label = None
    if baselines:
        per_label = _baselines(loaded, idx, raw, metrics, seed=seed, min_cells=min_cells)
    metrics.update(split=split, min_cells=int(min_cells), iwelbo_particles=iwelbo_particles,
                   ate_particles=ate_particles,
                   seed=seed, seconds=round(time.perf_counter() - t0, 2),
                   data=str(data_path) if data_path is not None else loaded.config["data"]["path"])
    # per-label lists go to metrics.json; the (labels x genes) ATE matrices only to the plots
    details = {k: plain_json(v) for k, v in raw.items()
               if not _is_scalar(v) and np.ndim(v) == 1 and _jsonable(v)}
    if details:
        metrics["details"] = details
    path = Path(loaded.run_dir) / "metrics.json"
    atomic_write_text(path, json.dumps(metrics, indent=1, allow_nan=True) + "\n")
    if per_label is not None:
        csv = Path(loaded.run_dir) / "ate_per_label.csv"
        atomic_write_text(csv, per_label.to_csv(float_format="%.6g"))
        metrics["per_label_csv"] = str(csv)
        per_batch = per_label.attrs.get("per_batch")
        if per_batch is not None and len(per_batch):
            csv = Path(loaded.run_dir) / "ate_per_batch.csv"
            atomic_write_text(csv, per_batch.to_csv(index=False, float_format="%.6g"))
            metrics["per_batch_csv"] = str(csv)
    if plots:
        metrics["plots"] = write_plots(loaded, idx, raw, ate_particles=ate_particles, seed=seed,
                                       per_label=per_label)
        atomic_write_text(path, json.dumps(metrics, indent=1, allow_nan=True) + "\n")
    return metrics


def _baselines(loaded, idx, raw: dict, metrics: dict, *, seed: int, min_cells: int):
    """Score the baselines beside the model on its evaluated labels; fills ``metrics`` and
    returns the per-label DataFrame (None when no label is evaluated)."""
    notes = metrics.setdefault("notes", [])
    left_out = raw.get("ate_labels_left_out", [])
    if left_out:
        notes.append(f"{len(left_out)} label(s) with fewer than {min_cells} cells in the "
                     f"evaluated split left out (--min-cells): {_names(left_out)}")
    masks = loaded.model.perturbation_masks()
    if masks is not None and masks_untrained(masks):
        notes.append(f"masks untrained: every q(m) is still within {UNTRAINED_MASK_TOLERANCE} "
                     "of its initial 0.5 (train longer; counts of q(m) > 0.5 mean nothing yet)")
    labels = list(raw.get("ate_labels") or [])
    if not labels:
        if left_out:
            notes.append(f"no label has {min_cells} evaluated cells: lower --min-cells")
        return None
    try:
        train = loaded.indices("train")
    except ValueError:
        notes.append("no training cell of the run is in these data: baselines skipped")
        return None
    m_ate = np.asarray(raw["model_ate"], np.float64)
    per_batch = None
    if "model_ate_by_batch" in raw:
        per_label, summary, reasons, info, by_batch, per_batch = compare_by_batch(
            loaded.screen, idx, train, labels, raw["model_ate_by_batch"], seed=seed)
        metrics["baselines_by_batch"] = by_batch
    else:
        per_label, summary, reasons, info = compare_with_baselines(
            loaded.screen, idx, train, labels, m_ate, seed=seed)
    model = summary.pop("model")
    metrics.update(ate_mse_top20=model["mse_top20"], ate_sign_top20=model["sign_top20"],
                   ate_systema_pearson=model["systema_pearson"],
                   ate_split_half=summary["split_half"]["ate_pearson"],
                   n_ate_cells=model["n_cells"])
    metrics["baselines"] = dict(summary, n_labels=len(labels), n_labels_left_out=len(left_out),
                                linear_alpha=info["linear_alpha"])
    if per_batch is None:
        metrics["baselines"]["model_minus"] = paired_differences(
            per_label, [r for r in TABLE_ROWS if r not in ("model", "split_half")])
    for name, why in reasons.items():
        if why:
            first = next(iter(why.values()))
            notes.append(f"{name} undefined for {len(why)} of {len(labels)} label(s) "
                         f"({first}{'; ...' if len(why) > 1 else ''})")
    shared = info.get("shared_reference_controls", 0)
    metrics["baselines"]["shared_reference_controls"] = shared
    if shared:
        notes.append(f"the evaluated split has no control cells, so its data ATE is measured "
                     f"against all control cells, {shared} of them training cells that the "
                     "baselines subtract too: they share that reference's noise with the data "
                     "and score higher than they predict (hold control cells out in the "
                     "evaluated split, as --split ood_combinations does)")
    ceiling = summary["split_half"]["ate_pearson"]
    if math.isfinite(ceiling) and ceiling < NOISE_CEILING:
        notes.append(f"split-half ceiling {ceiling:.2f} < {NOISE_CEILING}: these labels' effects "
                     "are indistinguishable from noise in the evaluated cells; no method can be "
                     "ranked on them")
    data_mag = info["mean_abs_data_ate"]
    model_mag = float(np.mean(np.abs(m_ate)))
    metrics.update(mean_abs_model_ate=model_mag, mean_abs_data_ate=data_mag)
    if data_mag > 0 and model_mag > ATE_MAGNITUDE_RATIO * data_mag:
        line = (f"the model predicts larger effects than the data: mean |model ATE| "
                f"{model_mag:.3f} vs {data_mag:.3f} log2 units in the data "
                f"({model_mag / data_mag:.1f}x) on the evaluated labels (not converged?)")
        warnings.warn(line, UserWarning, stacklevel=3)
        notes.append(line)
    per_label = per_label.rename(columns={"n_cells": "n_cells_eval"})
    if per_batch is not None:
        per_label.attrs["per_batch"] = per_batch
    return per_label


def _names(labels, limit: int = 10) -> str:
    return ", ".join(labels[:limit]) + (f" ... ({len(labels)})" if len(labels) > limit else "")


def write_plots(loaded, idx, raw: dict, *, ate_particles: int, seed: int,
                per_label=None) -> list:
    """Mask heatmap, ATE scatters and training curves into ``RUN_DIR/plots``; returns paths."""
    out = Path(loaded.run_dir) / "plots"
    written = []
    masks = loaded.model.perturbation_masks()
    if masks is not None:
        figures.plot_mask_heatmap(masks.detach().cpu().numpy(), loaded.screen.perturbations,
                                path=out / "masks.png")
        written.append(out / "masks.png")
    labels, d_ate, m_ate = _ate_arrays(loaded, idx, raw, ate_particles=ate_particles, seed=seed)
    if len(labels):
        figures.plot_ate_scatter(m_ate, d_ate, labels, path=out / "ate_scatter.png")
        figures.plot_ate_scatter(m_ate, d_ate, labels, path=out / "ate_per_perturbation.png",
                               per_perturbation=True)
        written += [out / "ate_scatter.png", out / "ate_per_perturbation.png"]
    if per_label is not None and len(per_label):
        figures.plot_label_metrics(per_label, metric="ate_pearson",
                                   path=out / "ate_per_label.png")
        written.append(out / "ate_per_label.png")
    if loaded.history.get("train", {}).get("step"):
        figures.plot_training_curves(loaded.history, path=out / "training_curves.png")
        written.append(out / "training_curves.png")
    return [str(p) for p in written]


def _ate_arrays(loaded, idx, raw, *, ate_particles, seed):
    """(labels, data ATE, model ATE) for the scatter: from evaluate_model's output when it
    returns them, otherwise recomputed with the same seed and particle count."""
    have = all(k in raw for k in ("ate_labels", "data_ate", "model_ate"))
    if have:
        return list(raw["ate_labels"]), np.asarray(raw["data_ate"]), np.asarray(raw["model_ate"])
    labels, d_ate = data_ate(loaded.screen, idx)
    if not len(labels):
        return [], None, None
    m_ate = model_ate(loaded.model, loaded.screen, labels, n_samples=ate_particles, seed=seed)
    return list(labels), np.asarray(d_ate), np.asarray(m_ate)


SCALAR_LEGEND = (
    "test_iwelbo: importance-weighted lower bound of log p(x), nats per cell, mean over the "
    "split's cells; higher is better\n"
    "ate_pearson: Pearson r between model and data ATE over genes, mean over labels; higher is "
    "better (1 = same shape); ATE = mean log2(1 + 1e4 x / library) of a label's cells minus "
    "the controls' (log2 units; scanpy's log1p is natural log: divide by ln 2 = 0.693)\n"
    "ate_pearson_top20: the same over each label's 20 genes of largest data |ATE|\n"
    "mask_f1/precision/recall (simulated data): recovery of the true masks, 0-1, higher is "
    "better")


def print_metrics(metrics: dict) -> None:
    shown = [k for k in ("test_iwelbo", "ate_pearson", "ate_pearson_top20", "mask_f1",
                         "mask_precision", "mask_recall", "n_cells") if k in metrics]
    shown += [k for k, v in metrics.items() if k not in shown and isinstance(v, float)
              and k != "seconds" and k != "linear_alpha"]
    width = max(len(k) for k in shown) if shown else 0
    print(f"metrics on the {metrics.get('split', '?')} split "
          f"({metrics.get('seconds', float('nan')):.1f} s):")
    for k in shown:
        v = metrics[k]
        print(f"  {k:<{width}}  {v:.4f}" if isinstance(v, float) else f"  {k:<{width}}  {v}")
    for line in SCALAR_LEGEND.splitlines():
        print("  " + line)
    if "baselines" in metrics:
        print_table(metrics)
    if metrics.get("baselines_by_batch"):
        print_batch_table(metrics)
    for line in metrics.get("notes", []):
        print(f"note: {line}")


def print_table(metrics: dict) -> None:
    """The model beside every baseline and the split-half ceiling, means over the same labels."""
    b = metrics["baselines"]
    rows = {"model": {"ate_pearson": metrics.get("ate_pearson"),
                      "ate_pearson_top20": metrics.get("ate_pearson_top20"),
                      "mse_top20": metrics.get("ate_mse_top20"),
                      "sign_top20": metrics.get("ate_sign_top20"),
                      "systema_pearson": metrics.get("ate_systema_pearson"),
                      "n_labels": metrics.get("n_ate_labels"),
                      "n_cells": metrics.get("n_ate_cells")}}
    rows.update({k: b[k] for k in TABLE_ROWS if k in b})
    cols = list(METRICS) + ["n_labels", "n_cells"]
    left = b.get("n_labels_left_out", 0)
    print(f"ATE on the {metrics.get('split', '?')} split, {b.get('n_labels')} labels with >= "
          f"{metrics.get('min_cells', 0)} cells ({left} left out); means over labels, each row "
          "on the same labels (n_labels: those it can predict):")
    widths = [max(len(c), 7) + 2 for c in cols]
    print("  " + f"{'':<11}" + "".join(f"{c:>{w}}" for c, w in zip(cols, widths)))
    for name, row in rows.items():
        cells = []
        for c, w in zip(cols, widths):
            v = row.get(c)
            if v is None or (isinstance(v, float) and not math.isfinite(v)):
                cells.append(f"{'n/a':>{w}}")
            elif isinstance(v, (int, np.integer)):
                cells.append(f"{int(v):>{w}d}")
            else:
                cells.append(f"{v:>{w}.3f}")
        print(f"  {name:<11}" + "".join(cells))
    for line in METRIC_LEGEND.splitlines():
        print("  " + line)
    if b.get("model_minus"):
        ceiling = (b.get("split_half") or {}).get("ate_pearson", float("nan"))
        print_paired(b["model_minus"],
                     noise_level=math.isfinite(ceiling) and ceiling < NOISE_CEILING)


def print_paired(model_minus: dict, noise_level: bool = False) -> None:
    """Model minus each baseline, label by label: mean difference +- standard error.
    ``noise_level``: the labels' split-half ceiling is below ``NOISE_CEILING``, so a difference
    compares two predictions of noise and ranks nothing: said on the header line."""
    print("model minus each baseline, label by label on the same labels: mean difference +- "
          "standard error (labels where the model is ahead); within noise: |difference| <= 2 SE")
    if noise_level:
        print(f"  (split-half ceiling below {NOISE_CEILING}: the data's effects are noise here, "
              "so these differences rank nothing)")
    for name, by_metric in model_minus.items():
        parts = []
        for metric, d in by_metric.items():
            short = metric.replace("ate_pearson", "pearson")
            parts.append(f"{short} {d['diff']:+.3f} +- {d['se']:.3f} ({d['ahead']}/{d['n']}) "
                         f"{d['verdict']}")
        print(f"  {name:<11}" + "; ".join(parts))


def print_batch_table(metrics: dict) -> None:
    """ate_pearson of the model, each baseline and the split-half ceiling within each batch."""
    by = metrics["baselines_by_batch"]
    rows = [r for r in TABLE_ROWS if any(r in v for v in by.values())]
    print(f"ATE within each batch of {metrics.get('batch_key')!r} (against the batch's own "
          "controls; the table above pools them, cell-weighted): ate_pearson, mean over the "
          "batch's labels")
    widths = [max(len(r), 7) + 2 for r in rows]
    print("  " + f"{'batch':<14}" + "".join(f"{r:>{w}}" for r, w in zip(rows, widths))
          + f"{'n_labels':>10}{'n_cells':>9}")
    for name, row in by.items():
        cells = []
        for r, w in zip(rows, widths):
            v = row.get(r, {}).get("ate_pearson")
            cells.append(f"{'n/a':>{w}}" if v is None or not math.isfinite(v) else f"{v:>{w}.3f}")
        n_lab = row.get("model", row.get("control", {})).get("n_labels", 0)
        print(f"  {str(name)[:13]:<14}" + "".join(cells) + f"{n_lab:>10d}{row.get('n_cells', 0):>9d}")


def _is_scalar(v) -> bool:
    return isinstance(v, (int, float, str, bool, np.integer, np.floating)) or v is None


def _jsonable(v) -> bool:
    try:
        json.dumps(plain_json(v))
        return True
    except (TypeError, ValueError):
        return False
