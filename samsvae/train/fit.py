"""``fit``: the one training pipeline, used by ``samsvae train``, ``SAMSVAE.train`` and torchrun.

Given a built model, its screen and a split, ``fit`` writes the run directory (when asked),
makes the loaders, trains with :class:`~samsvae.train.Trainer` (or its DDP form when a process
group is given), restores the best validation weights, measures what the basal encoder absorbed
of each perturbation's effect (:mod:`samsvae.train.basal_shift`) and writes ``model.pt`` and
``history.json``. Everything before (reading the data, choosing the split, building the model)
belongs to the caller, since the command line and the AnnData class get those differently.
"""
from __future__ import annotations

import time
import warnings
from typing import Callable, List, Optional, Tuple

import numpy as np

from .basal_shift import fit_basal_shift
from .config import TrainConfig
from .distributed import DistributedTrainer
from .prepare import make_loaders
from .run_dir import save_run, write_history, write_model
from .trainer import Trainer

# a label with fewer training cells than this has an effect estimated from too few cells
MIN_TRAIN_CELLS = 10
# the validation ELBO counts as still improving when the best of the last tenth of the
# validations beats the best before by more than this fraction of |ELBO| (above its Monte Carlo
# noise on a few hundred validation cells)
IMPROVING_TOLERANCE = 1e-3


def few_cell_labels(screen, split, min_cells: int = MIN_TRAIN_CELLS) -> List[Tuple[str, int]]:
    """``[(label, training cells)]`` of the perturbation labels (not the control) carried by
    at least one but fewer than ``min_cells`` training cells, fewest first."""
    rows = np.flatnonzero(np.asarray(split).astype(str) == "train")
    labels = np.asarray(screen.labels).astype(str)[rows]
    labels = labels[~np.asarray(screen.is_control, dtype=bool)[rows]]
    names, counts = np.unique(labels, return_counts=True)
    few = [(str(n), int(c)) for n, c in zip(names, counts) if c < min_cells]
    return sorted(few, key=lambda x: (x[1], x[0]))


def dropped_lines(dropped) -> List[str]:
    """Log lines for ``ScreenData.dropped``: ``"dropped 662 cells (label unassigned)"``."""
    lines = []
    for reason, n in (dropped or {}).items():
        if reason.startswith("drop_labels: "):
            reason = f"label {reason[len('drop_labels: '):] or repr('')}"
        lines.append(f"dropped {int(n)} cells ({reason})")
    return lines


def still_improving(history: dict, *, fraction: float = 0.1,
                    tol: float = IMPROVING_TOLERANCE) -> Optional[str]:
    """A one-line warning when the validation ELBO was still improving as training ended: the
    best of the last ``fraction`` of the validations beats the best before by more than ``tol``
    times its magnitude (nats per cell). None otherwise (or with fewer than 2 validations)."""
    val = (history or {}).get("val") or {}
    elbo = np.asarray(val.get("elbo", []), dtype=np.float64)
    steps = list(val.get("step", []))
    if elbo.size < 2 or not np.isfinite(elbo).any():
        return None
    k = max(1, int(np.ceil(fraction * elbo.size)))
    before, last = elbo[:-k], elbo[-k:]
    if not np.isfinite(before).any() or not np.isfinite(last).any():
        return None
    best_before = float(np.nanmax(before))
    gain = float(np.nanmax(last)) - best_before
    if gain <= tol * abs(best_before):
        return None
    span = f"steps {steps[-k]}-{steps[-1]}" if k > 1 else f"step {steps[-1]}"
    return (f"training ended while the validation ELBO was still improving: the best of the "
            f"last {k} of {elbo.size} validations ({span}) is {gain:.3f} nats/cell "
            f"({100 * gain / max(abs(best_before), 1e-12):.2f}%) above the best before; the model has not converged, train longer (more --max-steps / "
            f"--max-epochs) before trusting its predictions")


def fit(model, screen, split: np.ndarray, config: TrainConfig, *, run_dir=None,
        run_config: Optional[dict] = None, comm=None, resume: bool = False,
        stream_options: Optional[dict] = None, restore_best: bool = True,
        log: Optional[Callable[[str], None]] = print) -> Trainer:
    """Train ``model`` on the ``"train"`` cells of ``split``, validating on the ``"val"`` cells.

    Args:
        model: a ``samsvae.models.PerturbationModel`` built for ``screen``.
        screen: the ``samsvae.data.ScreenData`` (in memory or backed).
        split: (n_cells,) ``"train"`` / ``"val"`` / ``"test"`` per screen row.
        config: the optimiser, length and device options.
        run_dir: directory for ``config.json``, ``split.csv``, ``checkpoints/``, ``model.pt``
            and ``history.json``; None keeps everything in memory (no resume).
        run_config: the ``config.json`` content (``samsvae.train.run_dir.run_config``);
            required with ``run_dir``.
        comm: the process group of ``samsvae.train.distributed.init_from_env`` (None: one
            process). Every rank calls ``fit``; rank 0 writes the files.
        resume: continue from ``run_dir/checkpoints/last.pt`` when it exists.
        stream_options: ``chunk_rows`` / ``buffer_chunks`` of the streaming loader.
        restore_best: end with the weights of the best validation ELBO (else the last ones).
        log: one line per event (None: silent).

    Returns:
        the Trainer, its model holding the best validation weights by default (``trainer.history``,
        ``trainer.best_step``, ``trainer.step``).
    """
    split = np.asarray(split).astype(str)
    is_main = comm is None or comm.is_main
    if run_dir is not None:
        if run_config is None:
            raise ValueError("fit(run_dir=...) needs the run_config to write into config.json")
        if is_main:
            save_run(run_dir, config=run_config, screen=screen, split=split)
        if comm is not None:
            comm.barrier("rank 0 writing the run directory")
    train_loader, val_loader = make_loaders(
        screen, split, batch_size=config.batch_size, seed=config.seed, device=config.device,
        rank=0 if comm is None else comm.rank, world_size=1 if comm is None else comm.world_size,
        **(stream_options or {}))
    n_train = int((split == "train").sum())
    common = dict(run_dir=run_dir, run_config=run_config, n_train_cells=n_train, log=log)
    if comm is None:
        trainer = Trainer(model, train_loader, val_loader, config, **common)
        where = config.device
    else:
        trainer = DistributedTrainer(model, train_loader, val_loader, config, comm=comm,
                                     **common)
        where = f"{comm.world_size} processes ({config.device} ...)"
    say = log if (log is not None and is_main) else None
    few = few_cell_labels(screen, split) if is_main else []
    # labels made only of perturbations with < 10 cells in the whole data were listed by
    # load_screen's warning already: this one is about what the split leaves for training
    rare = {p for p, n in zip(screen.perturbations, screen.perturbation_counts)
            if n < MIN_TRAIN_CELLS}
    sep = getattr(screen, "separator", "+") or "+"
    few = [(lab, n) for lab, n in few if not set(lab.split(sep)) <= rare]
    if few:
        shown = ", ".join(f"{lab} ({n})" for lab, n in few[:10])
        warnings.warn(f"{len(few)} label(s) have fewer than {MIN_TRAIN_CELLS} training cells: "
                      f"{shown}{' ...' if len(few) > 10 else ''}; their effects are learned from "
                      "too few cells to be trusted", UserWarning, stacklevel=2)
    if say is not None:
        for line in dropped_lines(getattr(screen, "dropped", None)):
            say(line)
        n_params = sum(p.numel() for p in model.parameters())
        say(f"model {model.model_name}/{model.guide_name} ({n_params:,} parameters), "
            f"{trainer.total_steps} steps of {config.batch_size} cells "
            f"({trainer.batches_per_epoch} per epoch) on {where}")
    t0 = time.perf_counter()
    trainer.fit(resume=resume)
    if restore_best:
        trainer.load_best_weights()
    # measured on the weights that are kept, before they are written
    fit_basal_shift(model, screen, np.flatnonzero(split == "train"), comm=comm,
                    device=config.device)
    if run_dir is not None and is_main:
        write_model(run_dir, model, step=trainer.best_step)
        write_history(run_dir, trainer.history)
    if say is not None:
        best = ("" if trainer.best_val is None
                else f"; best validation ELBO {trainer.best_val:.3f} at step {trainer.best_step}")
        ran = trainer.step - getattr(trainer, "start_step", 0)
        resumed = (f" (resumed at step {trainer.start_step}: {ran} steps ran in this process)"
                   if getattr(trainer, "start_step", 0) else "")
        say(f"trained {trainer.step} steps{resumed} in {time.perf_counter() - t0:.1f} s{best}")
    improving = still_improving(trainer.history) if is_main else None
    if improving:
        warnings.warn(improving, UserWarning, stacklevel=2)
    return trainer
