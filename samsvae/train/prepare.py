"""Turn a screen and a split into what the trainer needs: a model sized for it and loaders."""
from __future__ import annotations

import numpy as np

from ..data import (MinibatchLoader, gene_log1p_stats, log_depth_shifts,
                    perturbation_cell_counts)
from ..data.streaming import StreamingLoader
from ..models import build_model, svae_plus_labels


def split_indices(split: np.ndarray, part: str) -> np.ndarray:
    """(n,) int64 rows of ``split`` equal to ``part``."""
    return np.flatnonzero(np.asarray(split).astype(str) == part).astype(np.int64)


def build_model_for_screen(screen, train_idx: np.ndarray, *, model: str = "sams_vae",
                           guide: str = "mean_field", n_latent: int = 100, n_hidden: int = 400,
                           gene_stats=None, **kwargs):
    """A PerturbationModel for ``screen`` whose data-dependent parts come from training cells.

    The encoder's input standardisation (per-gene mean/std of log1p counts), the number of
    cells N_t carrying each perturbation (which weights the global KL terms) and each
    perturbation's shift of log depth (which predictions of measured cells use) are computed
    over ``train_idx`` only, so nothing about validation or test cells leaks into the model.
    ``gene_stats``: ``(mean, std)`` of log1p counts over ``train_idx`` already computed (e.g.
    by the one-pass statistics of a backed screen, ``samsvae.data.stream_stats``), which
    spares a pass over the counts.
    """
    train_idx = np.asarray(train_idx, dtype=np.int64)
    if train_idx.size == 0:
        raise ValueError("the training split holds no cell; check the split (its train "
                         "fraction or split column) and drop_labels")
    mean, std = gene_log1p_stats(screen, train_idx) if gene_stats is None else gene_stats
    counts = perturbation_cell_counts(screen.dosage, train_idx)
    if getattr(screen, "n_batches", 0) and "n_batches" not in kwargs:
        # the batch covariate (screen.batch_key): encoder and decoder read its one-hot
        kwargs["n_batches"] = screen.n_batches
    if model == "svae_plus" and "labels" not in kwargs:
        # SVAE+ gives each seen combination its own shift: its vocabulary is the training labels
        kwargs.update(svae_plus_labels(screen.dosage[train_idx]))
    built = build_model(model, guide, n_genes=screen.n_genes,
                        n_perturbations=screen.n_perturbations, n_latent=n_latent,
                        n_hidden=n_hidden, gene_log1p_mean=mean, gene_log1p_std=std,
                        perturbation_counts=counts, **kwargs)
    built.set_perturbation_log_depth(log_depth_shifts(screen.dosage, screen.library, train_idx))
    return built


def make_loaders(screen, split: np.ndarray, *, batch_size: int = 512, seed: int = 0,
                 device="cpu", rank: int = 0, world_size: int = 1, **stream_options):
    """``(train_loader, val_loader or None)`` over the ``train`` / ``val`` cells of ``split``.

    One process with counts in memory: MinibatchLoader (uniform shuffling). A backed screen or
    several processes: :class:`~samsvae.data.streaming.StreamingLoader`, which reads the file
    in shuffled chunks behind a prefetch thread and gives rank ``rank`` its disjoint shard of
    each epoch (``batch_size`` is then the global batch). ``stream_options`` (chunk_rows,
    buffer_chunks, prefetch_batches, max_gap) go to StreamingLoader.
    """
    train_idx = split_indices(split, "train")
    val_idx = split_indices(split, "val")
    if train_idx.size == 0:
        raise ValueError("the training split holds no cell; check the split and drop_labels")
    if world_size == 1 and not getattr(screen, "is_backed", False):
        train = MinibatchLoader(screen, train_idx, batch_size, shuffle=True, seed=seed,
                                drop_last=False, device=device)
        val = None
        if val_idx.size:
            val = MinibatchLoader(screen, val_idx, batch_size, shuffle=False, seed=seed,
                                  drop_last=False, device=device)
        return train, val
    shard = dict(rank=rank, world_size=world_size, device=device, seed=seed, **stream_options)
    train = StreamingLoader(screen, train_idx, batch_size, shuffle=True, **shard)
    val = None
    if val_idx.size:  # ranks validate their pieces and sum: the batch counts may differ
        val = StreamingLoader(screen, val_idx, batch_size, shuffle=False, even_batches=False,
                              **shard)
    return train, val

