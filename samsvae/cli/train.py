"""``samsvae train``: train a model on a screen (.h5ad) into a run directory, or ``--demo``.

    samsvae train DATA.h5ad --out RUN_DIR [--model sams_vae] [--guide mean_field] ...
    samsvae train DATA.h5ad --out RUN_DIR --resume      # continue from checkpoints/last.pt
    samsvae train --demo [--out samsvae-demo]           # simulate, train, evaluate (~1-2 min)
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

from .. import ops
from ..data import load_screen, make_split, simulate_screen
from ..data.stream_stats import CACHE_NAME, load_backed_screen
from ..models import MODEL_GUIDES
from ..ops import BackendUnavailableError
from ..train import TrainConfig, fit
from ..train.distributed import DistributedFailure, init_from_env, shutdown
from ..train.prepare import build_model_for_screen, split_indices
from ..train.run_dir import (
    align_screen,
    load_run,
    read_config,
    read_split,
    run_config,
    screen_for_run,
)
from .evaluate import evaluate_run, print_metrics
from .execution import add_execution_arguments

DEMO_DIR = "samsvae-demo"
# The demo: a simulated screen sized to train and evaluate in about 1-2 minutes on 2 CPU cores.
# Short training wants larger steps (lr 3e-3, batches of 256) than the paper's defaults, and the
# correlated guide, which learns the perturbation effects much faster than mean-field.
DEMO = {"cells": 5000, "genes": 500, "perturbations": 20, "combinations": 5, "latent": 10,
        "epochs": 30, "guide": "corr_both", "lr": 3e-3, "batch_size": 256,
        "iwelbo_particles": 100, "ate_particles": 500}
TRAIN_DEFAULTS = {"lr": TrainConfig.lr, "batch_size": 512}
# Options that define the model and the data: --resume must be given the run's values.
IDENTITY_OPTIONS = ("model", "guide", "latent", "hidden", "split", "seed", "perturbation_key",
                    "control_label", "drop_labels", "keep_labels", "layer", "model_options",
                    "batch_key")
# Model options of the command line: (flag, build_model keyword, type, help). Unset flags keep
# the model's default (the paper's); build_model rejects an option the chosen model lacks.
MODEL_OPTIONS = (
    ("--mask-prior-prob", "mask_prior_prob", float,
     "sams_vae: prior probability alpha of a mask entry (default: 0.01)"),
    ("--global-param-scale", "global_param_scale", float,
     "sams_vae/cpa_vae: per-perturbation guide parameters move this many times faster than "
     "the network weights (default: 1)"),
    ("--basal-covariance", "basal_covariance", str,
     "sams_vae/cpa_vae: diagonal | full covariance of q(z_basal) (default: diagonal)"),
    ("--mask-prior-weight", "mask_prior_weight", float,
     "sams_vae: extra weight of log p(m_t) per cell carrying t (0 = exact ELBO, the default)"),
    ("--sparse-rotation-every", "sparse_rotation_every", int,
     "sams_vae: every N training steps, rotate the latent axes to the sparsest orientation "
     "of the perturbation effects (0 = never, the default)"),
    ("--sparse-rotation-until", "sparse_rotation_until", int,
     "sams_vae: last training step of the rotation phase (0 = rotate until the end)"),
    ("--sparse-rotation-reopen", "sparse_rotation_reopen", float,
     "sams_vae: after each rotation every mask probability is at least this (default: 0)"),
    ("--gene-offsets", "gene_offset_prior_scale", float,
     "sams_vae/cpa_vae, a variant of the paper's model: each perturbation also shifts every "
     "gene's log rate directly, with a N(0, S^2) prior (S, e.g. 1; default 0 = the paper's "
     "model). For effects the latent space does not span, e.g. a CRISPRi target's own "
     "knockdown"),
)


class UserError(Exception):
    """A problem with the command line or the files it names (printed without a traceback)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser
    p.add_argument("data", nargs="?", metavar="DATA.h5ad",
                   help="screen with raw counts in X (or --layer) and labels in obs")
    p.add_argument("--out", metavar="RUN_DIR",
                   help=f"run directory to write (required; --demo default: ./{DEMO_DIR})")
    p.add_argument("--demo", action="store_true",
                   help="simulate a small screen, train sams_vae on it briefly and evaluate it")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="sams_vae",
                   help="cvae | svae_plus | cpa_vae | sams_vae (default: sams_vae)")
    g.add_argument("--guide", default=None,
                   help="inference variant: mean_field | corr_embedding | corr_basal | corr_both "
                        "(default: mean_field; --demo: corr_both)")
    g.add_argument("--latent", type=int, default=None, help="latent dimensions (default: 100; --demo: 10)")
    g.add_argument("--hidden", type=int, default=400, help="hidden units of the MLPs (default: 400)")
    g = p.add_argument_group(
        "model options", "not given: the paper's defaults. Mask recovery on simulated screens "
        "(benchmarks/sim_recovery.py): --basal-covariance full "
        "--mask-prior-weight 0.02 --sparse-rotation-every 300 --sparse-rotation-reopen 0.5 "
        "--sparse-rotation-until (3/4 of --max-steps) --lr 3e-3 (the per-perturbation "
        "learning rate is already 10x: --perturbation-lr-scale)")
    for flag, key, kind, text in MODEL_OPTIONS:
        extra = {"choices": ("diagonal", "full")} if flag == "--basal-covariance" else {}
        g.add_argument(flag, dest=key, type=kind, default=None, help=text, **extra)
    g = p.add_argument_group("training")
    steps = g.add_mutually_exclusive_group()
    steps.add_argument("--max-steps", type=int, default=None, help="optimiser steps to run")
    steps.add_argument("--max-epochs", type=int, default=None,
                       help="passes over the training cells (default: min(400, 8e6 / cells))")
    g.add_argument("--batch-size", type=int, default=None,
                   help="cells per step (default: 512; --demo: 256)")
    g.add_argument("--particles", type=int, default=5,
                   help="Monte Carlo samples per cell in the ELBO (default: 5)")
    g.add_argument("--lr", type=float, default=None,
                   help=f"Adam learning rate of the networks (default: {TrainConfig.lr:g}; "
                        "--demo: 3e-3)")
    g.add_argument("--perturbation-lr-scale", type=float,
                   default=TrainConfig.perturbation_lr_scale, metavar="K",
                   help="per-perturbation parameters (embeddings, masks) learn at K x --lr: "
                        "each gets gradient only from the few cells carrying it (default: "
                        f"{TrainConfig.perturbation_lr_scale:g})")
    g.add_argument("--global-kl-warmup", type=float, default=TrainConfig.global_kl_warmup,
                   metavar="F",
                   help="the prior terms of the per-perturbation variables (embeddings, masks) "
                        "enter the loss with a weight rising from 0 to 1 over this fraction of "
                        "the steps, so sparse masks do not close before the decoder has learnt "
                        "the effects; a correlated basal guide reads z_p only after it "
                        f"(default: {TrainConfig.global_kl_warmup:g}; 0: off)")
    g.add_argument("--early-stopping-patience", type=int,
                   default=TrainConfig.early_stopping_patience, metavar="N",
                   help="stop when N validations in a row brought no better validation ELBO "
                        f"(default: {TrainConfig.early_stopping_patience}; 0: run the whole "
                        "budget)"),
    g.add_argument("--weight-decay", type=float, default=1e-6, help="Adam weight decay (default: 1e-6)")
    g.add_argument("--grad-clip", type=float, default=None, help="clip the gradient norm to this")
    g.add_argument("--val-every", type=int, default=None,
                   help="validate every N steps (default: every epoch)")
    g.add_argument("--checkpoint-every", type=int, default=1000,
                   help="write checkpoints/last.pt every N steps (default: 1000; also at each "
                        "validation and at the end)")
    g.add_argument("--checkpoint-minutes", type=float, default=5.0, metavar="M",
                   help="also write it when M minutes of wall time passed since the last one "
                        "(default: 5; 0: never by time). The previous one is kept as "
                        "last.prev.pt, the fallback when last.pt cannot be read")
    g.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    add_execution_arguments(g, what="this training")
    g.add_argument("--resume", action="store_true",
                   help="continue RUN_DIR from checkpoints/last.pt (same options as the first run)")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress bar: one line per validation")
    g = p.add_argument_group("data")
    g.add_argument("--split", default="random",
                   help="random | ood_combinations | an obs column holding train/val/test "
                        "(default: random)")
    g.add_argument("--perturbation-key", default="perturbation",
                   help="obs column with perturbation labels, combinations joined by '+'")
    g.add_argument("--control-label", default=None,
                   help="label of control cells (default: detect control/ctrl/non-targeting)")
    g.add_argument("--drop-labels", default=None, metavar="L1,L2",
                   help="comma-separated labels whose cells are left out (e.g. unassigned; "
                        "'' drops empty labels). Labels that look like non-cells (unassigned, "
                        "multiplet, NA, nan, None, empty) are refused unless dropped or kept")
    g.add_argument("--keep-labels", default=None, metavar="L1,L2",
                   help="comma-separated labels that look like non-cells but are real "
                        "perturbations: model them")
    g.add_argument("--layer", default=None, help="AnnData layer with raw counts (default: X)")
    g.add_argument("--batch-key", default=None, metavar="COL",
                   help="obs column of a batch covariate (cell line, donor, lane): encoder and "
                        "decoder read its one-hot, and evaluate computes treatment effects "
                        "within each batch against that batch's controls (default: none)")
    g.add_argument("--backed", action="store_true",
                   help="stream the counts from the file instead of loading them (screens larger "
                        "than memory; statistics cached in RUN_DIR/data_stats.npz)")
    g.add_argument("--chunk-rows", type=int, default=None, metavar="N",
                   help="streaming: consecutive cells per read and shuffling unit (default: "
                        "1024 backed, 1 in memory)")
    g.add_argument("--buffer-chunks", type=int, default=16, metavar="K",
                   help="streaming: chunks read and shuffled together (default: 16)")
    # sizes of the simulated demo screen (tests shrink it)
    for name, default in (("cells", DEMO["cells"]), ("genes", DEMO["genes"]),
                          ("perturbations", DEMO["perturbations"])):
        p.add_argument(f"--demo-{name}", type=int, default=default, help=argparse.SUPPRESS)


def run(args) -> int:
    try:
        if args.demo:
            return _run_demo(args)
        _check_args(args)
        for name, value in TRAIN_DEFAULTS.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
        train_from_args(args)
        return 0
    except (UserError, ValueError, FileNotFoundError, NotImplementedError,
            BackendUnavailableError) as exc:
        if os.environ.get("SAMSVAE_DEBUG"):  # show the traceback
            raise
        print(f"samsvae train: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        if not isinstance(exc, DistributedFailure) or os.environ.get("SAMSVAE_DEBUG"):
            raise
        print(f"samsvae train: error: {exc}", file=sys.stderr)
        return 1


def _check_args(args) -> None:
    if args.data is None:
        raise UserError("give the screen to train on (samsvae train DATA.h5ad --out RUN_DIR) "
                        "or --demo")
    if not Path(args.data).is_file():
        raise UserError(f"data file {args.data} does not exist")
    if args.out is None:
        raise UserError("give the run directory to write with --out RUN_DIR")
    _check_model_guide(args.model, args.guide or "mean_field")
    _check_device(args.device)
    for name in ("batch_size", "particles", "hidden", "checkpoint_every", "latent",
                 "chunk_rows", "buffer_chunks"):
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    warm = getattr(args, "global_kl_warmup", 0.0)
    if not 0 <= warm < 1:
        raise UserError(f"--global-kl-warmup is a fraction of the training steps in [0, 1), "
                        f"got {warm} (0 turns the warm-up off)")


def _check_device(device: str) -> None:
    import torch
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for but CUDA is not available here; use "
                        "--device cpu")


def _check_model_guide(model: str, guide: str) -> None:
    if model not in MODEL_GUIDES or guide not in MODEL_GUIDES[model]:
        pairs = "; ".join(f"--model {m} --guide {'|'.join(g)}" for m, g in MODEL_GUIDES.items())
        what = (f"unknown model {model!r}" if model not in MODEL_GUIDES
                else f"model {model!r} has no guide {guide!r}")
        raise UserError(f"{what}. Valid pairs: {pairs}")


def _drop_labels(args, name: str = "drop_labels") -> list:
    value = getattr(args, name, None)
    if value is not None and value.strip() == "":
        return [""]  # --drop-labels '': the cells with an empty label
    return [s.strip() for s in (value or "").split(",") if s.strip()]


def model_options(args) -> dict:
    """The model options given on the command line, as ``build_model`` keywords."""
    return {key: getattr(args, key) for _, key, _, _ in MODEL_OPTIONS
            if getattr(args, key, None) is not None}


def _identity(args) -> dict:
    return {"model": args.model, "guide": args.guide or "mean_field",
            "model_options": model_options(args),
            "latent": args.latent if args.latent is not None else 100, "hidden": args.hidden,
            "split": args.split, "seed": args.seed, "perturbation_key": args.perturbation_key,
            "control_label": args.control_label, "drop_labels": _drop_labels(args),
            "keep_labels": _drop_labels(args, "keep_labels"), "layer": args.layer,
            "batch_key": getattr(args, "batch_key", None)}


def train_from_args(args, *, log=print):
    """Load the data, split, build the model, train into ``args.out``; returns the Trainer.

    Under torchrun (``WORLD_SIZE`` > 1) every process runs this: they join the process group,
    train their shards with DDP, and only rank 0 writes the run directory and logs.
    """
    comm = init_from_env(args.device)
    completed = False
    trainer = None
    try:
        with ops.use_backend(args.backend), warnings.catch_warnings():
            # an execution setting (never saved with the run); zero-count cells: the log says
            # "dropped N cells (zero counts)"
            warnings.filterwarnings("ignore", message=r"dropping \d+ cells with zero counts")
            trainer = _train(args, log=log if comm is None or comm.is_main else _silent,
                             comm=comm)
        completed = True
        return trainer
    finally:
        if comm is not None and trainer is not None:
            trainer.close()  # the DDP wrapper must not outlive the process group
        shutdown(comm, completed=completed)


def _silent(*_args, **_kwargs) -> None:
    pass


def _train(args, *, log, comm):
    import numpy as np
    import torch


    out = Path(args.out)
    if comm is not None:  # cuda -> this process's GPU (cuda:LOCAL_RANK)
        args.device = str(comm.device)
    identity = _identity(args)
    data_options = {"layer": args.layer, "perturbation_key": args.perturbation_key,
                    "separator": "+", "control_label": args.control_label,
                    "drop_labels": identity["drop_labels"], "dosage_key": None,
                    "keep_labels": identity["keep_labels"], "backed": args.backed,
                    "batch_key": identity["batch_key"]}
    train_config = TrainConfig(max_steps=args.max_steps, max_epochs=args.max_epochs,
                               batch_size=args.batch_size, particles=args.particles, lr=args.lr,
                               perturbation_lr_scale=args.perturbation_lr_scale,
                               global_kl_warmup=args.global_kl_warmup,
                               early_stopping_patience=args.early_stopping_patience or None,
                               weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                               val_every=args.val_every, checkpoint_every=args.checkpoint_every,
                               checkpoint_minutes=getattr(args, "checkpoint_minutes", 5.0),
                               seed=args.seed, device=args.device,
                               progress=not args.no_progress)
    log(ops.backends.kernels_line(args.device))
    log("backends (auto):\n  " + ops.backend_report().replace("\n", "\n  ")
        + (f"\nrequested backend: {args.backend}" if args.backend != "auto" else ""))

    if args.backend != "auto":  # an explicit backend must exist here: fail before any work
        ops.backends.require_backend(args.backend, args.device)
    if ops.backends.set_tf32(getattr(args, "tf32", False), args.device):
        log("TF32 matrix products: on")
    existing = (out / "config.json").is_file()
    if existing and not args.resume:
        raise UserError(f"{out} already holds a run; pass --resume to continue it or choose "
                        "another --out")
    if comm is not None:  # every rank has looked at the directory before rank 0 writes to it
        comm.barrier("checking the run directory")
    t0 = time.perf_counter()
    resuming = args.resume and existing
    if resuming:
        config = read_config(out)
        saved = config.get("cli", {})
        changed = [f"--{k.replace('_', '-')}: run {saved.get(k)!r} vs now {identity[k]!r}"
                   for k in IDENTITY_OPTIONS if k in saved and saved[k] != identity[k]]
        if changed:
            raise UserError("cannot resume with different model/data options ("
                            + "; ".join(changed) + "); repeat the original options")
    gene_stats = None
    if args.backed:
        # one pass over the file (shared by the ranks) for library sizes, validation and the
        # training cells' gene statistics, cached beside the run for --resume / evaluate
        if resuming:
            def split_fn(s):
                return read_split(out, s.cell_names)
        else:
            def split_fn(s):
                return np.asarray(make_split(s, args.split, seed=args.seed)).astype(str)
        screen, split, stats = load_backed_screen(
            args.data, split_fn, cache_path=out / CACHE_NAME, comm=comm, log=log,
            layer=args.layer, perturbation_key=args.perturbation_key,
            control_label=args.control_label, drop_labels=tuple(identity["drop_labels"]),
            keep_labels=tuple(identity["keep_labels"]), batch_key=identity["batch_key"],
            batch_categories=config.get("batches") if resuming else None)
        if resuming:
            screen = align_screen(screen, config["genes"], config["perturbations"])
        gene_stats = (stats.gene_log1p_mean, stats.gene_log1p_std)
    elif resuming:
        screen = screen_for_run(config, args.data)
        split = read_split(out, screen.cell_names)
    else:
        screen = load_screen(args.data, layer=args.layer, perturbation_key=args.perturbation_key,
                             control_label=args.control_label,
                             drop_labels=tuple(identity["drop_labels"]), backed=args.backed,
                             keep_labels=tuple(identity["keep_labels"]),
                             batch_key=identity["batch_key"])
        split = np.asarray(make_split(screen, args.split, seed=args.seed)).astype(str)
    log(f"data: {screen!r} ({time.perf_counter() - t0:.1f} s)")
    if getattr(screen, "batch_key", None):
        log(f"batch covariate {screen.batch_key!r}: {screen.n_batches} batches "
            f"({', '.join(screen.batch_categories[:10])}"
            f"{' ...' if screen.n_batches > 10 else ''})")
    parts = {k: int((split == k).sum()) for k in ("train", "val", "test")}
    log(f"split {args.split!r}: " + ", ".join(f"{k} {v}" for k, v in parts.items()))

    torch.manual_seed(args.seed)  # the initial weights
    model = build_model_for_screen(screen, split_indices(split, "train"), model=args.model,
                                   guide=identity["guide"], n_latent=identity["latent"],
                                   n_hidden=args.hidden, gene_stats=gene_stats,
                                   **identity["model_options"])
    config = run_config(model_name=args.model, guide=identity["guide"],
                        model_config=model.config, screen=screen, data_options=data_options,
                        split_options={"kind": args.split, "seed": args.seed, "counts": parts},
                        train_config=train_config.to_dict(), data_path=args.data)
    config["cli"] = identity
    stream = {k: getattr(args, k) for k in ("chunk_rows", "buffer_chunks")
              if getattr(args, k, None) is not None}
    trainer = fit(model, screen, split, train_config, run_dir=out, run_config=config, comm=comm,
                  resume=args.resume, stream_options=stream, log=log)
    log(f"wrote {out}/model.pt; evaluate with: samsvae evaluate {out}")
    return trainer


# -- the demo -------------------------------------------------------------------------------

def _run_demo(args) -> int:

    out = Path(args.out or DEMO_DIR)
    data_path = out / "demo.h5ad"
    args.guide = args.guide or DEMO["guide"]
    for name in TRAIN_DEFAULTS:
        if getattr(args, name) is None:
            setattr(args, name, DEMO[name])
    args.latent = args.latent if args.latent is not None else DEMO["latent"]
    if args.max_steps is None and args.max_epochs is None:
        args.max_epochs = DEMO["epochs"]
    _check_model_guide(args.model, args.guide)
    _check_device(args.device)
    if (out / "config.json").is_file() and not args.resume:
        raise UserError(f"{out} already holds a run; remove it, pass another --out, or --resume")

    t0 = time.perf_counter()
    if not data_path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        adata = simulate_screen(n_cells=args.demo_cells, n_genes=args.demo_genes,
                                n_perturbations=args.demo_perturbations,
                                n_combinations=min(DEMO["combinations"],
                                                   args.demo_perturbations // 2),
                                n_latent=DEMO["latent"], seed=args.seed)
        adata.write_h5ad(data_path)
        print(f"simulated {adata.n_obs} cells x {adata.n_vars} genes, "
              f"{args.demo_perturbations} perturbations -> {data_path}")
    args.data, args.out = str(data_path), str(out)
    train_from_args(args)

    loaded = load_run(out)
    metrics = evaluate_run(loaded, split="test", iwelbo_particles=DEMO["iwelbo_particles"],
                           ate_particles=DEMO["ate_particles"], batch_size=args.batch_size,
                           seed=args.seed, plots=True)
    print_metrics(metrics)
    print(f"demo done in {time.perf_counter() - t0:.0f} s: run directory {out} "
          f"(metrics.json, plots/)")
    return 0
