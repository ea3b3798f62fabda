"""Turn a screen and a split into what the trainer needs: a model sized for it and loaders."""
from __future__ import annotations

import numpy as np

SPLIT_PARTS = ("train", "val", "test")


def split_indices(split: np.ndarray, part: str) -> np.ndarray:
    """(n,) int64 rows of ``split`` equal to ``part``."""
    return np.flatnonzero(np.asarray(split).astype(str) == part).astype(np.int64)


def build_model_for_screen(screen, train_idx: np.ndarray, *, model: str = "sams_vae",
                           guide: str = "mean_field", n_latent: int = 100, n_hidden: int = 400,
                           backend: str = "auto", **kwargs):
    """A PerturbationModel for ``screen`` whose data-dependent parts come from training cells.

    The encoder's input standardisation (per-gene mean/std of log1p counts) and the number of
    cells N_t carrying each perturbation (which weights the global KL terms) are computed over
    ``train_idx`` only, so nothing about validation or test cells leaks into the model.
    """
    from ..data import gene_log1p_stats, perturbation_cell_counts
    from ..models import build_model, svae_plus_labels
    train_idx = np.asarray(train_idx, dtype=np.int64)
    if train_idx.size == 0:
        raise ValueError("the training split holds no cell; check the split (its train "
                         "fraction or split column) and drop_labels")
    mean, std = gene_log1p_stats(screen, train_idx)
    counts = perturbation_cell_counts(screen.dosage, train_idx)
    if model == "svae_plus" and "labels" not in kwargs:
        # SVAE+ gives each seen combination its own shift: its vocabulary is the training labels
        kwargs.update(svae_plus_labels(screen.dosage[train_idx]))
    return build_model(model, guide, n_genes=screen.n_genes,
                       n_perturbations=screen.n_perturbations, n_latent=n_latent,
                       n_hidden=n_hidden, gene_log1p_mean=mean, gene_log1p_std=std,
                       perturbation_counts=counts, backend=backend, **kwargs)


def make_loaders(screen, split: np.ndarray, *, batch_size: int = 512, seed: int = 0,
                 device="cpu", rank: int = 0, world_size: int = 1):
    """``(train_loader, val_loader or None)`` over the ``train`` / ``val`` cells of ``split``.

    Under data parallelism each rank takes every ``world_size``-th training cell of a fixed
    permutation (not implemented yet: ``world_size`` must be 1).
    """
    from ..data import MinibatchLoader
    if world_size != 1:
        raise NotImplementedError("multi-process training comes with the torchrun issue")
    train_idx = split_indices(split, "train")
    val_idx = split_indices(split, "val")
    if train_idx.size == 0:
        raise ValueError("the training split holds no cell; check the split and drop_labels")
    train = MinibatchLoader(screen, train_idx, batch_size, shuffle=True, seed=seed,
                            drop_last=False, device=device)
    val = None
    if val_idx.size:
        val = MinibatchLoader(screen, val_idx, batch_size, shuffle=False, seed=seed,
                              drop_last=False, device=device)
    return train, val


def mask_row_names(model, perturbations) -> list:
    """Names of the rows of ``model.perturbation_masks()`` / ``perturbation_embeddings()``:
    the perturbations, or for SVAE+ its labels (combinations joined by '+')."""
    labels = getattr(model, "config", {}).get("labels")
    if labels:
        return ["+".join(str(perturbations[c]) for c in label) for label in labels]
    return [str(p) for p in perturbations]
