"""Trainer callbacks: what changes a model's parameters, or the weights of its loss, between
optimiser steps.

A model computes its loss and nothing else; a schedule that reshapes parameters (or the
objective) during training is a callback the :class:`~samsvae.train.Trainer` calls. A callback
may implement:

* ``on_step_start(trainer, step)``: before the forward pass of optimiser step ``step``
  (1-based, the value ``trainer.step`` takes once the step is done);
* ``allows_best(step) -> bool``: whether weights after ``step`` may be kept as the "best"
  checkpoint (False while the callback still reshapes the model, whose validation ELBO is then
  not comparable with later ones).
"""
from __future__ import annotations

from typing import List


class SparseRotation:
    """Every ``every`` steps up to ``until`` (0: no end), rotate a SAMS-VAE's latent axes to
    the sparsest orientation of its perturbation effects
    (``SAMSVAE.rotate_to_sparse_basis``), then raise every q(m = 1) to at least ``reopen``.

    "Best" checkpoints are allowed only once the masks had one period to settle after the last
    rotation (step > until + every), never when rotations have no end.
    """

    def __init__(self, every: int, until: int = 0, reopen: float = 0.0):
        if int(every) != every or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        self.every, self.until, self.reopen = int(every), int(until), float(reopen)

    def on_step_start(self, trainer, step: int) -> None:
        if step % self.every == 0 and (not self.until or step <= self.until):
            trainer.raw_model.rotate_to_sparse_basis(reopen=self.reopen)

    def allows_best(self, step: int) -> bool:
        return bool(self.until) and step > self.until + self.every


class GlobalWarmup:
    """The weight of the global term (the per-perturbation variables' log prior minus log
    guide) in the training loss rises linearly from 0 to 1 over the first ``steps`` optimiser
    steps (``TrainConfig.global_kl_warmup``; 0: always 1). The trainer passes
    ``weight(step)`` to ``model.loss(global_weight=)``; "best" checkpoints (and so the
    early-stopping patience) start once the objective is the ELBO (step >= steps)."""

    def __init__(self, steps: int):
        if int(steps) != steps or steps < 0:
            raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
        self.steps = int(steps)

    def weight(self, step: int) -> float:
        return 1.0 if not self.steps else min(1.0, step / self.steps)

    def allows_best(self, step: int) -> bool:
        return step >= self.steps


def callbacks_for(model) -> List[object]:
    """The callbacks a model's configuration asks for (SAMS-VAE's ``sparse_rotation_every``,
    ``sparse_rotation_until``, ``sparse_rotation_reopen``)."""
    config = getattr(model, "config", {}) or {}
    every = int(config.get("sparse_rotation_every") or 0)
    if not every:
        return []
    return [SparseRotation(every, int(config.get("sparse_rotation_until") or 0),
                           float(config.get("sparse_rotation_reopen") or 0.0))]
