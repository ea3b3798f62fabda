"""Test-set IWELBO: the paper's headline metric, one importance-weighted estimate per cell."""
from __future__ import annotations

import numpy as np
import torch


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def test_iwelbo(model, loader, *, particles: int = 100, chunk: int = 10,
                global_seed: int = 0) -> np.ndarray:
    """IWELBO of every cell the loader yields (nats), in loader order.

    Args:
        model: a ``samsvae.models.PerturbationModel``.
        loader: iterable of ``samsvae.data.Batch`` (e.g. ``MinibatchLoader(..., shuffle=False)``);
            batches are moved to the model's device.
        particles: K importance samples per cell; the global variables are the same K draws for
            every cell (seeded by ``global_seed``), so estimates of different cells and batches
            are comparable.
        chunk: particles evaluated at once (memory is that of one chunk).

    Returns:
        (n_cells,) float64 array.
    """
    device = _model_device(model)
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for batch in loader:
                if batch.counts.device != device:
                    batch = batch.to(device)
                iw = model.iwelbo(batch, particles=particles, chunk=chunk, global_seed=global_seed)
                out.append(iw.detach().to("cpu", torch.float64).numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out) if out else np.zeros(0)


test_iwelbo.__test__ = False  # a metric, not a pytest test
