"""Test-set IWELBO: the paper's headline metric, one importance-weighted estimate per cell."""
from __future__ import annotations


import numpy as np
import torch

from ..data import make_batch
from .spread import gather_in_order, my_items


def model_device(model) -> torch.device:
    """The device of a model's parameters."""
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
    device = model_device(model)
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


@torch.no_grad()
def cells_iwelbo(model, screen, rows, *, batch_size: int = 512, particles: int = 100,
                 chunk: int = 10, global_seed: int = 0, comm=None) -> np.ndarray:
    """IWELBO (nats) of cells ``rows`` of ``screen``, in the order of ``rows``.

    The cells are cut into batches of ``batch_size`` in the order given. With a process group
    ``comm`` (``samsvae.train.distributed.init_from_env``), batch ``j`` is computed by rank
    ``j % world_size`` and the results are gathered by batch number, so every rank gets the
    values of the single-process call. Returns (n,) float64.
    """
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    device = model_device(model)
    n_batches = -(-rows.size // batch_size)
    was_training = model.training
    model.eval()
    local = {}
    try:
        for j in my_items(n_batches, comm):
            batch = make_batch(screen, rows[j * batch_size:(j + 1) * batch_size]).to(device)
            iw = model.iwelbo(batch, particles=particles, chunk=chunk, global_seed=global_seed)
            local[j] = iw.detach().to("cpu", torch.float64).numpy()
    finally:
        model.train(was_training)
    parts = gather_in_order(comm, local, n_batches)
    return np.concatenate(parts) if parts else np.zeros(0)
