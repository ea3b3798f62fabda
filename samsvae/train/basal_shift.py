"""After training: what the basal encoder absorbed of each perturbation's effect.

SAMS-VAE's amortised basal guide q(z_basal | x) reads a cell's counts, so it can encode into the
basal state whatever it sees of the cell's perturbation, although the model's basal prior is the
same N(0, I) for every cell. Predictions that draw the basal state from that prior then miss the
absorbed part. :func:`fit_basal_shift` measures it on the training cells, as each
perturbation's additive shift of the basal posterior means over the control cells' (least
squares on the dosage, ``samsvae.data.additive_shifts``), and stores it in the model
(``SAMSVAE.set_perturbation_basal_shift``), whose predictions add it to the guide's effects.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..data import additive_gram, additive_shifts, make_batch

CHUNK_CELLS = 4096


@torch.no_grad()
def fit_basal_shift(model, screen, rows, *, comm=None, device: Optional[str] = None,
                    chunk_cells: int = CHUNK_CELLS) -> Optional[np.ndarray]:
    """Fit and set ``model``'s per-perturbation basal shift on the cells ``rows``.

    Args:
        model: a model with ``set_perturbation_basal_shift`` (SAMS-VAE, CPA-VAE); others are
            left alone (None is returned).
        screen: the ``samsvae.data.ScreenData`` (in memory or backed).
        rows: (n,) training cell rows.
        comm: the process group (``samsvae.train.distributed``): each rank encodes every
            world_size-th cell and the sums are added up, so every rank sets the same shift.
        device: where the encoder runs (default: the model's device).
        chunk_cells: cells encoded at once.

    Returns:
        (T, L) float64 shift (0 for perturbations no cell of ``rows`` carries), or None.
    """
    if not hasattr(model, "set_perturbation_basal_shift"):
        return None
    rows = np.asarray(rows, dtype=np.int64)
    mine = rows if comm is None else rows[comm.rank::comm.world_size]
    device = device or next(model.parameters()).device
    dosage = screen.dosage
    xty = np.zeros((dosage.shape[1] + 1, model.n_latent))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, mine.size, chunk_cells):
            part = mine[start:start + chunk_cells]
            z = model.latent_representation(make_batch(screen, part).to(device), "basal")
            z = z.to("cpu", torch.float64).numpy()
            xty[0] += z.sum(0)
            xty[1:] += np.asarray(dosage[part].T @ z)
    finally:
        model.train(was_training)
    if comm is not None:
        total = comm.all_reduce(torch.from_numpy(xty).to(comm.device))
        xty = total.to("cpu", torch.float64).numpy()
    shift = additive_shifts(additive_gram(dosage, rows), xty)
    model.set_perturbation_basal_shift(shift)
    return shift
