"""Training options (:class:`TrainConfig`) and how they turn into a number of steps."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Optional

# Options that change the sequence of updates: a resumed run must use the values it started with.
RESUME_LOCKED = ("batch_size", "particles", "lr", "perturbation_lr_scale", "weight_decay",
                 "grad_clip", "seed", "val_particles", "global_kl_warmup")


@dataclass
class TrainConfig:
    """Options of :class:`samsvae.train.Trainer`.

    Attributes:
        max_steps: optimiser steps to run (exclusive with ``max_epochs``).
        max_epochs: passes over the training cells. With neither given, scvi-tools' rule:
            ``min(400, round(400 * 20000 / n_train_cells))`` epochs.
        batch_size: cells per minibatch.
        particles: Monte Carlo samples per cell in the training ELBO.
        lr: Adam learning rate of the networks (encoder, decoder, dispersion).
        perturbation_lr_scale: the per-perturbation parameters (embeddings, masks, shifts; see
            ``PerturbationModel.perturbation_parameters``) learn at ``lr`` times this. Adam
            moves every parameter by about its learning rate per step, and each perturbation's
            parameters get a gradient only from the few cells of a batch that carry it: at the
            networks' rate they would travel too little in a training run (1 = one rate).
        global_kl_warmup: fraction of the step budget over which the weight of the global term
            (log prior minus log guide of the per-perturbation variables: embeddings, masks)
            in the training loss rises linearly from 0 to 1 (0: the full ELBO from the first
            step). Without it the masks' KL to their sparse prior (1.6 nats per latent
            dimension at the initial q = 0.5) closes them before the decoder has learnt what
            an effect would do, and most perturbations end up sharing a few latent
            dimensions or absorbed by the basal encoder. Validations during the warm-up are
            neither kept as "best" nor counted for early stopping: the objective is not yet
            the ELBO. During it a correlated basal guide (corr_basal, corr_both) does not
            read z_p.
        weight_decay: Adam L2 weight decay.
        grad_clip: clip the global gradient norm to this value (None: no clipping).
        val_every: validate every this many steps (None: at the end of each epoch).
        val_particles: Monte Carlo samples per cell in the validation ELBO.
        early_stopping_patience: stop when this many validations in a row brought no better
            validation ELBO (None: run the whole budget); the best weights are kept either way.
        checkpoint_every: write ``checkpoints/last.pt`` every this many steps (and at the end).
        checkpoint_minutes: also write it when this many minutes of wall time have passed since
            the last one (None or 0: never by time); it is also written at each validation.
        seed: seeds the data order, the model's noise and torch's global generator.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        progress: show a tqdm bar when stderr is a terminal (otherwise one line per validation).
    """
    max_steps: Optional[int] = None
    max_epochs: Optional[int] = None
    batch_size: int = 512
    particles: int = 5
    lr: float = 1e-3
    perturbation_lr_scale: float = 10.0
    weight_decay: float = 1e-6
    global_kl_warmup: float = 0.3
    grad_clip: Optional[float] = None
    val_every: Optional[int] = None
    val_particles: int = 1
    early_stopping_patience: Optional[int] = 20
    checkpoint_every: int = 1000
    checkpoint_minutes: Optional[float] = 5.0
    seed: int = 0
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self):
        if self.max_steps is not None and self.max_epochs is not None:
            raise ValueError(f"give max_steps ({self.max_steps}) or max_epochs "
                             f"({self.max_epochs}), not both")
        positive = {"max_steps": self.max_steps, "max_epochs": self.max_epochs,
                    "batch_size": self.batch_size, "particles": self.particles,
                    "val_every": self.val_every, "val_particles": self.val_particles,
                    "early_stopping_patience": self.early_stopping_patience,
                    "checkpoint_every": self.checkpoint_every}
        for name, value in positive.items():
            if value is not None and (int(value) != value or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.checkpoint_minutes is not None and not self.checkpoint_minutes >= 0:
            raise ValueError(f"checkpoint_minutes must be >= 0, got {self.checkpoint_minutes!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not self.perturbation_lr_scale > 0:
            raise ValueError(f"perturbation_lr_scale must be > 0, got "
                             f"{self.perturbation_lr_scale!r}")
        if not 0 <= self.global_kl_warmup < 1:
            raise ValueError(f"global_kl_warmup must be a fraction in [0, 1), got "
                             f"{self.global_kl_warmup!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 (or None to disable), got {self.grad_clip!r}")

    def total_steps(self, batches_per_epoch: int, n_train_cells: int) -> int:
        """Number of optimiser steps this configuration asks for."""
        if batches_per_epoch < 1:
            raise ValueError("the training split is empty: no minibatch to train on; check the "
                             "split (train fraction, split column) and the dropped labels")
        if self.max_steps is not None:
            return int(self.max_steps)
        return int(self.epochs(n_train_cells)) * batches_per_epoch

    def warmup_steps(self, total_steps: int) -> int:
        """Steps of the global-term warm-up in a budget of ``total_steps``."""
        return int(round(self.global_kl_warmup * total_steps))

    def epochs(self, n_train_cells: int) -> int:
        if self.max_epochs is not None:
            return int(self.max_epochs)
        return default_max_epochs(n_train_cells)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def default_max_epochs(n_train_cells: int) -> int:
    """scvi-tools' default: about 20k cells x 400 epochs of work, at most 400 epochs."""
    return int(max(1, min(400, round(400 * 20000 / max(n_train_cells, 1)))))
