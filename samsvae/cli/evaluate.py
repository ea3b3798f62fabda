"""``samsvae evaluate RUN_DIR``: test IWELBO, ATE Pearson and mask recovery of a trained run.

    samsvae evaluate RUN_DIR [--data DATA.h5ad] [--iwelbo-particles 100] [--ate-particles 2500]
                             [--split test] [--plots] [--batch-size 512]

Writes ``RUN_DIR/metrics.json`` (and ``RUN_DIR/plots/*.png`` with ``--plots``) and prints the
metrics.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from .. import ops
from ..infer import data_ate, evaluate_model, model_ate
from ..infer import plots as figures
from ..train.checkpoint import atomic_write_text
from ..train.distributed import init_from_env, shutdown
from ..train.run_dir import load_run, plain_json


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
    parser.add_argument("--plots", action="store_true",
                        help="also write PNG figures into RUN_DIR/plots/")
    parser.add_argument("--batch-size", type=int, default=512,
                        help="cells per IWELBO batch (default: 512)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the Monte Carlo estimates")
    parser.add_argument("--device", default="cpu", help="cpu | cuda (default: cpu)")
    parser.add_argument("--backend", default="auto", choices=("auto",) + ops.backends.BACKENDS,
                        help="kernel backend of the fused ops for this evaluation, whatever the "
                             "run was trained with (default: auto)")


def run(args) -> int:
    comm = init_from_env(args.device)  # under torchrun: cells spread over the processes
    completed = False
    try:
        for name in ("iwelbo_particles", "ate_particles", "batch_size"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, "
                                 f"got {getattr(args, name)}")
        device = args.device if comm is None else comm.device
        if args.backend != "auto":  # an explicit backend must exist here: fail before any work
            ops.backends.require_backend(args.backend, device)
        loaded = load_run(args.run_dir, data=args.data, map_location=device)
        with ops.use_backend(args.backend):
            metrics = evaluate_run(loaded, split=args.split,
                                   iwelbo_particles=args.iwelbo_particles,
                                   ate_particles=args.ate_particles, batch_size=args.batch_size,
                                   seed=args.seed, plots=args.plots, data_path=args.data,
                                   comm=comm)
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
    return 0


def evaluate_run(loaded, *, split: str = "test", iwelbo_particles: int = 100,
                 ate_particles: int = 2500, batch_size: int = 512, seed: int = 0,
                 plots: bool = False, data_path=None, comm=None) -> dict:
    """Evaluate a :class:`~samsvae.train.run_dir.LoadedRun` on one split; write metrics.json.

    Returns the metrics dict: ``test_iwelbo`` (mean nats per cell), ``ate_pearson``,
    ``ate_pearson_top20``, ``n_cells``, ``mask_f1``/``mask_precision``/``mask_recall`` when the
    data carry simulated ground truth, plus ``split``, the particle counts and ``seconds``.
    ``comm`` (``samsvae.train.distributed.init_from_env``): every process of the group calls
    this; the cells and ATE label groups are spread over them, rank 0 writes the files.
    """
    t0 = time.perf_counter()
    idx = loaded.indices(split)
    raw = evaluate_model(loaded.model, loaded.screen, idx, iwelbo_particles=iwelbo_particles,
                         ate_particles=ate_particles, seed=seed, batch_size=batch_size,
                         comm=comm)
    if comm is not None and not comm.is_main:
        return {k: plain_json(v) for k, v in raw.items() if _is_scalar(v)}
    metrics = {k: plain_json(v) for k, v in raw.items() if _is_scalar(v)}
    metrics.update(split=split, iwelbo_particles=iwelbo_particles, ate_particles=ate_particles,
                   seed=seed, seconds=round(time.perf_counter() - t0, 2),
                   data=str(data_path) if data_path is not None else loaded.config["data"]["path"])
    # per-label lists go to metrics.json; the (labels x genes) ATE matrices only to the plots
    details = {k: plain_json(v) for k, v in raw.items()
               if not _is_scalar(v) and np.ndim(v) == 1 and _jsonable(v)}
    if details:
        metrics["details"] = details
    path = Path(loaded.run_dir) / "metrics.json"
    atomic_write_text(path, json.dumps(metrics, indent=1, allow_nan=True) + "\n")
    if plots:
        metrics["plots"] = write_plots(loaded, idx, raw, ate_particles=ate_particles, seed=seed)
        atomic_write_text(path, json.dumps(metrics, indent=1, allow_nan=True) + "\n")
    return metrics


def write_plots(loaded, idx, raw: dict, *, ate_particles: int, seed: int) -> list:
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


def print_metrics(metrics: dict) -> None:
    shown = [k for k in ("test_iwelbo", "ate_pearson", "ate_pearson_top20", "mask_f1",
                         "mask_precision", "mask_recall", "n_cells") if k in metrics]
    shown += [k for k, v in metrics.items() if k not in shown and isinstance(v, float)
              and k != "seconds"]
    width = max(len(k) for k in shown) if shown else 0
    print(f"metrics on the {metrics.get('split', '?')} split "
          f"({metrics.get('seconds', float('nan')):.1f} s):")
    for k in shown:
        v = metrics[k]
        print(f"  {k:<{width}}  {v:.4f}" if isinstance(v, float) else f"  {k:<{width}}  {v}")


def _is_scalar(v) -> bool:
    return isinstance(v, (int, float, str, bool, np.integer, np.floating)) or v is None


def _jsonable(v) -> bool:
    try:
        json.dumps(plain_json(v))
        return True
    except (TypeError, ValueError):
        return False
