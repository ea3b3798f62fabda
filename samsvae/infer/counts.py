"""Simulated raw counts as an AnnData: what perturbation challenges and differential-expression
tools (scanpy, pertpy, PyDESeq2) take. Used by ``SAMSVAE.sample_counts`` and ``samsvae
predict``."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import scipy.sparse as sp

from .ate import condition_dosage, control_library, warn_untrained_parts


def batch_codes_for(model, screen, batch) -> list:
    """The batch positions to simulate: ``[None]`` for a model without a batch covariate;
    otherwise the named batches (a name or a list of names of ``screen.batch_categories``), or
    every batch when ``batch`` is None."""
    if not getattr(model, "n_batches", 0):
        if batch is not None:
            raise ValueError("this model was trained without a batch covariate: leave out the "
                             "batch")
        return [None]
    cats = [str(c) for c in (screen.batch_categories or [])]
    if batch is None:
        return list(range(len(cats)))
    names = [batch] if isinstance(batch, str) else [str(b) for b in batch]
    unknown = [b for b in names if b not in cats]
    if unknown:
        raise ValueError(f"unknown batch {', '.join(unknown)}; the model's batches: "
                         f"{', '.join(cats)}")
    return [cats.index(b) for b in names]


def sample_counts_anndata(model, screen, labels: Sequence[str], *, n_cells: int,
                          library="control", batch=None, seed: int = 0,
                          effects: str = "mean"):
    """``n_cells`` simulated cells of each condition (and batch), as integer counts.

    Args:
        model: a trained ``PerturbationModel``. screen: its ``ScreenData`` (the control cells'
            depths, the vocabulary, the batches).
        labels: conditions: seen perturbations or compositions (``"A"``, ``"A+B"``) or the
            control label.
        library: ``"control"`` (default): each simulated cell's library size drawn (seeded)
            from the control cells' library sizes (of its batch), times the condition's depth
            shift ``model.library_scale``; a number: every cell at that size.
        batch: for a model with a batch covariate: a batch name, a list of names, or None
            (every batch, ``n_cells`` each).
        seed: the cells of a condition depend on ``seed`` and that condition (and batch) only.

    Returns:
        AnnData: ``X`` (cells x genes) int32 CSR counts; ``obs["condition"]`` (canonical
        label), ``obs["library"]`` (the size the cell was simulated at; its counts sum to about
        that), ``obs["batch"]`` with a batch covariate; ``var_names`` the genes;
        ``uns["samsvae_sample_counts"]`` the settings.
    """
    import anndata
    import pandas as pd
    import torch
    if int(n_cells) != n_cells or n_cells < 1:
        raise ValueError(f"n_cells must be a positive integer, got {n_cells!r}")
    n_cells = int(n_cells)
    dosage, canonical = condition_dosage(screen, labels)
    warn_untrained_parts(model, screen, dosage, canonical)
    codes = batch_codes_for(model, screen, batch)
    cats = [str(c) for c in (getattr(screen, "batch_categories", None) or [])]
    if isinstance(library, str):
        if library != "control":
            raise ValueError(f"library must be 'control' or a number, got {library!r}")
        scale = model.library_scale(dosage)
    else:
        if not (np.isscalar(library) and np.isfinite(library) and library > 0):
            raise ValueError(f"library must be 'control' or a positive number, got {library!r}")
        scale = None
    device = next(model.parameters()).device
    blocks, obs = [], {"condition": [], "library": [], "batch": []}
    model.eval()
    for code in codes:
        if scale is not None:
            pool = control_library(screen, seed, batch=code)
            sizes = np.random.default_rng(seed).choice(pool, size=n_cells, replace=True)
        else:
            sizes = float(library)
        gen = torch.Generator(device=device)
        gen.manual_seed(int(seed))
        for i, _, lib, x in model.sample_counts(dosage, n_cells=n_cells, library=sizes,
                                                library_scale=scale, effects=effects,
                                                generator=gen, batch=code):
            blocks.append(sp.csr_matrix(x.numpy().astype(np.int32)))
            obs["condition"] += [canonical[i]] * x.shape[0]
            obs["library"].append(lib.numpy())
            obs["batch"] += [cats[code] if code is not None else None] * x.shape[0]
    X = sp.vstack(blocks, format="csr").astype(np.int32)
    frame = pd.DataFrame({"condition": pd.Categorical(obs["condition"]),
                          "library": np.concatenate(obs["library"]).astype(np.float64)})
    if codes != [None]:
        frame["batch"] = pd.Categorical(obs["batch"])
    frame.index = pd.Index([f"sim{k}" for k in range(X.shape[0])], dtype=str)
    var = pd.DataFrame(index=pd.Index(np.asarray(screen.gene_names).astype(str), dtype=str))
    out = anndata.AnnData(X=X, obs=frame, var=var)
    out.uns["samsvae_sample_counts"] = {
        "n_cells": n_cells, "seed": int(seed), "effects": effects,
        "library": "control" if scale is not None else float(library),
        "conditions": list(dict.fromkeys(canonical))}
    return out
