"""The training loop: Adam on the model's negative ELBO, validation, checkpoints, exact resume.

Under ``torchrun`` (:class:`~samsvae.train.distributed.DistributedTrainer`) ``rank`` /
``world_size`` decide who writes and prints, validation sums go through
:meth:`Trainer._all_reduce`, and the model is reached through ``self.model`` (the object to
wrap) vs ``self.raw_model`` (the one to save). Schedules that reshape the model between steps
are callbacks (:mod:`samsvae.train.callbacks`).

Resuming from ``checkpoints/last.pt`` reproduces the uninterrupted run exactly: the loader's
order is a function of (seed, epoch) through ``set_epoch``, the batches already consumed in the
current epoch are skipped, and the model's noise generator, torch's, numpy's and Python's global
generators, the optimiser and the history come back from the checkpoint.
"""
from __future__ import annotations

import copy
import math
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .callbacks import GlobalWarmup, callbacks_for
from .checkpoint import (
    atomic_torch_save,
    capture_rng_state,
    load_checkpoint_with_fallback,
    restore_rng_state,
    rotate_checkpoint,
)
from .config import RESUME_LOCKED, TrainConfig

CHECKPOINT_FORMAT = "samsvae-checkpoint-v1"
_LOG_EVERY = 10  # steps between host syncs for the loss (progress bar, NaN check)
_VAL_SEED_OFFSET = 0x5A175  # validation noise stream, distinct from the training one


class Trainer:
    """Fits a :class:`~samsvae.models.PerturbationModel` with Adam.

    Args:
        model: a ``PerturbationModel`` (``loss(batch, particles=, generator=)`` returning
            ``{"loss": scalar, "elbo": (B,), ...}``).
        train_loader: a :class:`~samsvae.data.MinibatchLoader` over the training cells
            (shuffled; ``set_epoch`` is called before every epoch).
        val_loader: loader over the validation cells, or None to skip validation.
        config: :class:`TrainConfig`.
        run_dir: directory receiving ``checkpoints/{last,best}.pt``; None keeps everything in
            memory (no checkpoint, no resume).
        run_config: JSON-serialisable description of the run stored in each checkpoint.
        n_train_cells: number of training cells over all ranks (default: ``len(train_loader)``
            batches times the batch size is not exact, so pass it when known).
        rank, world_size: process rank and count under torch.distributed.
        log: called with one line of text per validation when no progress bar is shown;
            None silences the trainer.
        callbacks: objects with ``on_step_start(trainer, step)`` and/or ``allows_best(step)``
            (:mod:`samsvae.train.callbacks`); default: those the model's configuration asks
            for (``callbacks_for(model)``).
    """

    def __init__(self, model, train_loader, val_loader=None, config: Optional[TrainConfig] = None,
                 *, run_dir=None, run_config: Optional[dict] = None,
                 n_train_cells: Optional[int] = None, rank: int = 0, world_size: int = 1,
                 log: Optional[Callable[[str], None]] = print,
                 callbacks: Optional[Sequence] = None):
        self.config = config or TrainConfig()
        self.device = torch.device(self.config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but CUDA is not available here; "
                               "use device='cpu' (--device cpu)")
        self.raw_model = model.to(self.device)
        self.model = self.raw_model  # under DDP: DistributedDataParallel(self.raw_model)
        self.callbacks = list(callbacks_for(model) if callbacks is None else callbacks)
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.run_config = run_config or {}
        self.rank, self.world_size = rank, world_size
        self.is_main = rank == 0
        self.log = log if self.is_main else None

        self.batches_per_epoch = len(train_loader)
        self.n_train_cells = int(n_train_cells if n_train_cells is not None
                                 else _loader_cells(train_loader))
        self.total_steps = self.config.total_steps(self.batches_per_epoch, self.n_train_cells)
        # the global term's warm-up is a callback: its "best" gate is the callbacks' own
        self.warmup = GlobalWarmup(self.config.warmup_steps(self.total_steps))
        self.callbacks.append(self.warmup)

        # fused Adam: one kernel over all parameters (4x faster than foreach on CPU for the
        # ~10M parameters of an 8,000-gene model; deterministic, so exact resume still holds)
        self.optimizer = torch.optim.Adam(parameter_groups(self.raw_model, self.config),
                                          lr=self.config.lr,
                                          weight_decay=self.config.weight_decay, fused=True)
        self.noise = torch.Generator(device=self.device)
        self.noise.manual_seed(rank_seed(self.config.seed, rank))
        self.val_noise = torch.Generator(device=self.device)

        self.step = 0       # optimiser steps taken
        self.epoch = 0      # current epoch
        self.position = 0   # batches of the current epoch already consumed
        self.history = {"train": {"step": [], "epoch": [], "loss": []},
                        "val": {"step": [], "epoch": [], "elbo": []}}
        self.best_val: Optional[float] = None
        self.best_step: Optional[int] = None
        self.best_state: Optional[dict] = None  # CPU copy of the best weights
        self._pending: list = []  # (step, epoch, loss tensor) not yet copied to the host

    # -- public -------------------------------------------------------------------------------

    @property
    def checkpoint_dir(self) -> Optional[Path]:
        return None if self.run_dir is None else self.run_dir / "checkpoints"

    def fit(self, resume: bool = False) -> dict:
        """Train until ``total_steps``; returns the history.

        With ``resume=True`` and ``checkpoints/last.pt`` present, continues from it (a missing
        checkpoint starts from scratch, so preemptible jobs can always pass it).
        """
        torch.manual_seed(self.config.seed)
        self._remove_stale_temp_files()
        if resume:
            self._resume()
        self.start_step = self.step  # steps before this process (a resume) are not its own
        self._last_checkpoint_time = time.monotonic()
        if self.step >= self.total_steps or self.history.get("stopped_early"):
            self._say(f"nothing to do: training ended at step {self.step} "
                      f"({self.total_steps} steps asked for)")
            return self.history

        bar = self._progress_bar()
        self.raw_model.train()
        t_last, cells_since = time.perf_counter(), 0
        while self.step < self.total_steps and not self.history.get("stopped_early"):
            self.train_loader.set_epoch(self.epoch)
            if self.position and hasattr(self.train_loader, "iter_from"):
                # resume mid-epoch: a streaming loader skips the batches seen without reading
                batches = self.train_loader.iter_from(self.position)
            else:
                batches = iter(self.train_loader)
                for _ in range(self.position):  # resume mid-epoch: same order, skip what was seen
                    next(batches)
            for batch in batches:
                for cb in self.callbacks:
                    if hasattr(cb, "on_step_start"):
                        cb.on_step_start(self, self.step + 1)
                loss = self._train_step(batch.to(self.device))
                self._pending.append((self.step, self.epoch, loss))
                cells_since += int(batch.index.shape[0])
                self.step += 1
                self.position += 1
                end_of_epoch = self.position >= self.batches_per_epoch
                if end_of_epoch:
                    self.epoch, self.position = self.epoch + 1, 0
                done = self.step >= self.total_steps
                val_due = self._validation_due(end_of_epoch, done)
                # last.pt at each validation, every checkpoint_every steps and at least every
                # checkpoint_minutes of wall time, so a kill loses little work
                ckpt_due = (self.step % self.config.checkpoint_every == 0 or done or val_due
                            or self._checkpoint_time_due())

                if self.step % _LOG_EVERY == 0 or end_of_epoch or val_due or ckpt_due:
                    last_loss = self._flush_losses()
                    now = time.perf_counter()
                    speed = cells_since * self.world_size / max(now - t_last, 1e-9)
                    cells_since = 0
                    if bar is not None:
                        bar.update(self.step - bar.n)
                        bar.set_postfix(loss=f"{last_loss:.4g}", cells_s=f"{speed:,.0f}")
                if val_due:
                    val = self.validate()
                    self._record_validation(val)
                    if self._stalled():
                        self.history["stopped_early"] = self.step
                        self._say(f"stopping early at step {self.step}: no better validation "
                                  f"ELBO in the last {self.config.early_stopping_patience} "
                                  f"validations (best {self.best_val:.4f} at step "
                                  f"{self.best_step})")
                        done = ckpt_due = True
                    if bar is not None:
                        bar.set_postfix(loss=f"{last_loss:.4g}", val_elbo=f"{val:.4g}",
                                        cells_s=f"{speed:,.0f}")
                    else:
                        self._say(f"step {self.step}/{self.total_steps} epoch {self.epoch} | "
                                  f"loss {last_loss:.4f} | val elbo {val:.4f} | "
                                  f"{speed:,.0f} cells/s")
                if ckpt_due:
                    self.save_checkpoint("last")
                if cells_since == 0:  # speed excludes validation and checkpoint time
                    t_last = time.perf_counter()
                if done:
                    break
        if bar is not None:
            bar.close()
        if self.best_state is None:  # no (selectable) validation: keep the final weights
            self.best_state = _cpu_state(self.raw_model)
        return self.history

    @torch.no_grad()
    def validate(self) -> float:
        """Mean per-cell validation ELBO (nats), with the same noise at every call."""
        if self.val_loader is None:
            raise RuntimeError("no validation loader was given")
        self.raw_model.eval()
        self.val_noise.manual_seed(rank_seed(self.config.seed + _VAL_SEED_OFFSET, self.rank))
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for batch in self.val_loader:
            out = self.raw_model.loss(batch.to(self.device), particles=self.config.val_particles,
                                      generator=self.val_noise)
            elbo = out["elbo"].detach().to(torch.float64)
            total[0] += elbo.sum()
            total[1] += elbo.numel()
        self.raw_model.train()
        total = self._all_reduce(total)
        if total[1] == 0:
            raise RuntimeError("the validation split is empty; pass val_loader=None or give "
                               "the split validation cells")
        return float(total[0] / total[1])

    def save_checkpoint(self, name: str = "last") -> Optional[Path]:
        """Write ``checkpoints/<name>.pt`` atomically (main rank only); ``last.pt`` keeps the
        one it replaces as ``last.prev.pt``, the fallback of a resume that cannot read it."""
        if self.checkpoint_dir is None or not self.is_main:
            return None
        self._flush_losses()
        path = self.checkpoint_dir / f"{name}.pt"
        if name == "last":
            self._last_checkpoint_time = time.monotonic()
            return rotate_checkpoint(self._state(include_best=True), path)
        return atomic_torch_save(self._state(include_best=name != "best"), path)

    def _checkpoint_time_due(self) -> bool:
        minutes = getattr(self.config, "checkpoint_minutes", None)
        if not minutes or self.checkpoint_dir is None:
            return False
        due = time.monotonic() - getattr(self, "_last_checkpoint_time", 0.0) >= 60.0 * minutes
        if self.world_size > 1:  # saving is collective: all ranks follow rank 0's clock, asked
            if self.step % _LOG_EVERY:  # only on the steps that sync the host anyway
                return False
            flag = torch.tensor([float(due and self.is_main)], device=self.device)
            due = bool(self._all_reduce(flag)[0] > 0)
        return due

    def _remove_stale_temp_files(self) -> None:
        # a process killed while writing a checkpoint leaves its temporary file behind
        if self.checkpoint_dir is not None and self.is_main and self.checkpoint_dir.is_dir():
            for tmp in self.checkpoint_dir.glob(".*.pt.*.tmp"):
                tmp.unlink(missing_ok=True)

    def load_best_weights(self) -> None:
        """Put the best validation weights (or the last ones without validation) in the model."""
        if self.best_state is not None:
            self.raw_model.load_state_dict(self.best_state)

    # -- the step -----------------------------------------------------------------------------

    def _train_step(self, batch) -> torch.Tensor:
        # Under DDP the call must go through the wrapper's forward so gradients are reduced.
        out = self.raw_model.loss(batch, particles=self.config.particles, generator=self.noise,
                                  global_weight=self.global_weight(self.step + 1))
        loss = out["loss"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        return loss.detach()

    @property
    def warmup_steps(self) -> int:
        """Steps of the global term's warm-up (fixed when the run started; kept by a resume)."""
        return self.warmup.steps

    def global_weight(self, step: int) -> float:
        """Weight of the global term in the loss of optimiser step ``step`` (1-based): rises
        linearly to 1 over the warm-up (``TrainConfig.global_kl_warmup``)."""
        return self.warmup.weight(step)

    def _flush_losses(self) -> float:
        """Copy buffered losses to the history (one host sync); returns the latest one."""
        if not self._pending:
            losses = self.history["train"]["loss"]
            return losses[-1] if losses else float("nan")
        values = torch.stack([p[2] for p in self._pending]).to(torch.float64).cpu().tolist()
        train = self.history["train"]
        for (step, epoch, _), value in zip(self._pending, values):
            if not math.isfinite(value):
                self._pending = []
                raise FloatingPointError(
                    f"training loss became {value} at step {step + 1} (epoch {epoch}); lower the "
                    f"learning rate (now {self.config.lr}) or clip gradients (--grad-clip 10), "
                    "and check the counts are raw integers")
            train["step"].append(step + 1)
            train["epoch"].append(epoch)
            train["loss"].append(value)
        self._pending = []
        return values[-1]

    def _validation_due(self, end_of_epoch: bool, done: bool) -> bool:
        if self.val_loader is None:
            return False
        if self.config.val_every is None:
            return end_of_epoch or done
        return self.step % self.config.val_every == 0 or done

    def _record_validation(self, val: float) -> None:
        val_hist = self.history["val"]
        val_hist["step"].append(self.step)
        val_hist["epoch"].append(self.epoch)
        val_hist["elbo"].append(val)
        # while a callback still reshapes the model or its objective (SAMS-VAE's rotation
        # phase, the global term's warm-up) its weights cannot be kept as "best": the validation
        # ELBO is not comparable across that phase (and patience does not run: no best yet)
        if not all(cb.allows_best(self.step) for cb in self.callbacks
                   if hasattr(cb, "allows_best")):
            return
        if self.best_val is None or val > self.best_val:
            self.best_val, self.best_step = val, self.step
            self.best_state = _cpu_state(self.raw_model)
            self.save_checkpoint("best")

    def _stalled(self) -> bool:
        """Whether the last ``early_stopping_patience`` validations all came after the best."""
        patience = self.config.early_stopping_patience
        if not patience or self.best_step is None:
            return False
        after_best = sum(1 for s in self.history["val"]["step"] if s > self.best_step)
        return after_best >= patience

    def _all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            import torch.distributed as dist
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    # -- checkpoint state ---------------------------------------------------------------------

    def _state(self, include_best: bool = True) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "model_state": self.raw_model.state_dict(),
            "model_config": copy.deepcopy(getattr(self.raw_model, "config", {})),
            "optimizer_state": self.optimizer.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "position": self.position,
            "batches_per_epoch": self.batches_per_epoch,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "rng": capture_rng_state({"noise": self.noise}),
            "loader": {"seed": getattr(self.train_loader, "seed", None), "epoch": self.epoch},
            "train_config": self.config.to_dict(),
            "run_config": self.run_config,
            "history": self.history,
            "best": {"val_elbo": self.best_val, "step": self.best_step},
            # the best weights travel with last.pt: best.pt may be ahead of it after a crash
            "best_model_state": self.best_state if include_best else None,
        }

    def _resume(self) -> None:
        path = None if self.checkpoint_dir is None else self.checkpoint_dir / "last.pt"
        if path is None:
            raise ValueError("resume=True needs a run_dir holding checkpoints/last.pt")
        try:
            ckpt, path = load_checkpoint_with_fallback(path, map_location=self.device,
                                                       log=self._say)
        except FileNotFoundError:
            self._say(f"no checkpoint at {path}: starting from scratch")
            return
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise RuntimeError(f"{path} is not a samsvae training checkpoint "
                               f"(format {ckpt.get('format')!r})")
        saved = dict(ckpt["train_config"])
        saved.setdefault("perturbation_lr_scale", 1.0)  # checkpoints from before the option
        saved.setdefault("global_kl_warmup", 0.0)
        changed = {k: (saved.get(k), getattr(self.config, k)) for k in RESUME_LOCKED
                   if saved.get(k) != getattr(self.config, k)}
        if changed:
            desc = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in changed.items())
            raise ValueError(f"cannot resume {path} with different training options ({desc}); "
                             "use the original values or start a new run directory")
        if ckpt["batches_per_epoch"] != self.batches_per_epoch:
            raise ValueError(f"the checkpoint saw {ckpt['batches_per_epoch']} batches per epoch, "
                             f"this loader gives {self.batches_per_epoch}: the data or split "
                             "changed; resume with the same data, split and batch size")
        self.raw_model.load_state_dict(ckpt["model_state"])
        self.optimizer.load_state_dict(ckpt["optimizer_state"])
        self.step, self.epoch, self.position = ckpt["step"], ckpt["epoch"], ckpt["position"]
        # the warm-up was fixed when the run started: a resume with a larger budget keeps it
        self.warmup.steps = int(ckpt.get("warmup_steps", 0))
        restore_rng_state(ckpt["rng"], {"noise": self.noise})
        self.history = ckpt["history"]
        self.best_val, self.best_step = ckpt["best"]["val_elbo"], ckpt["best"]["step"]
        best = ckpt.get("best_model_state")
        self.best_state = None if best is None else {k: v.to("cpu") for k, v in best.items()}
        self._say(f"resumed from {path} at step {self.step} (epoch {self.epoch}, "
                  f"batch {self.position} of {self.batches_per_epoch})")

    # -- output -------------------------------------------------------------------------------

    def _progress_bar(self):
        if not (self.config.progress and self.is_main and self.log is not None
                and sys.stderr.isatty()):
            return None
        from tqdm.auto import tqdm
        return tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True)

    def _say(self, line: str) -> None:
        if self.log is not None:
            self.log(line)


def parameter_groups(model, config: TrainConfig) -> list:
    """Adam's parameter groups: the networks at ``config.lr``, the model's per-perturbation
    parameters at ``config.lr * config.perturbation_lr_scale`` (one group when that is 1)."""
    fast = list(getattr(model, "perturbation_parameters", lambda: [])())
    if config.perturbation_lr_scale == 1.0 or not fast:
        return [{"params": list(model.parameters())}]
    ids = {id(p) for p in fast}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return [{"params": rest},
            {"params": fast, "lr": config.lr * config.perturbation_lr_scale}]


def _cpu_state(model) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def rank_seed(seed: int, rank: int) -> int:
    """Distinct, reproducible seed per rank (rank 0 keeps ``seed``)."""
    return (int(seed) + 1_000_003 * int(rank)) % (2 ** 63)


def _loader_cells(loader) -> int:
    for attr in ("n_cells", "indices"):
        value = getattr(loader, attr, None)
        if value is not None:
            return int(value) if attr == "n_cells" else len(value)
    return len(loader) * int(getattr(loader, "batch_size", 1))
