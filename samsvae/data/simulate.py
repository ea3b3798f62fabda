"""Synthetic perturbation screens drawn from the SAMS-VAE generative process.

For cell i with perturbation dosages d_i (one perturbation, two for a combination, none for a
control)::

    z_basal_i ~ N(0, I_L)
    z_i       = z_basal_i + sum_t d_it (e_t * m_t)          e_t ~ N(0, embedding_std^2 I_L)
                                                             m_t ~ Bernoulli(mask_prob)^L
    p_i       = softmax(W2 leaky_relu(W1 z_i + b1) + b2)    a fixed random decoder, L -> H -> G
    l_i       ~ LogUniform(1e3, 1e4)                          target library size (UMIs)
    x_ig      ~ NB(mean l_i p_ig, inverse dispersion theta_g),  theta_g ~ LogNormal(log 5, 0.5)

Every perturbation's mask has at least one active dimension. Negative binomial draws are
Gamma-Poisson: x = Poisson(l p * Gamma(theta, 1) / theta).

Cells are generated in fixed blocks of :data:`BLOCK_CELLS` cells, each from its own generator
seeded by ``(seed, block)``; the global quantities (embeddings, masks, decoder, dispersions,
which cell gets which condition) come from a generator seeded by ``seed`` alone. The result is
therefore deterministic under the seed and identical whether it is built in memory
(:func:`simulate_screen`) or streamed to disk in chunks of any size
(:func:`write_simulated_screen`). Counts are stored as CSR float32 holding integers.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import anndata
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .loader import Batch, batch_perturbation_ids, csr_to_torch

BLOCK_CELLS = 1024
LIBRARY_RANGE = (1e3, 1e4)
THETA_MEDIAN = 5.0
LEAKY_SLOPE = 0.2
UNS_KEY = "samsvae_simulation"
_H5_CHUNK = 1 << 18  # entries per HDF5 chunk of X/data and X/indices (1 MiB as float32)


@dataclass
class _Plan:
    """Everything shared by all cells of one simulated screen."""
    n_cells: int
    n_genes: int
    seed: int
    mask_prob: float
    control_fraction: float
    embedding_std: float
    names: list            # (T,) perturbation names P0..P{T-1}
    masks: np.ndarray      # (T, L) uint8
    embeddings: np.ndarray  # (T, L) float32
    condition_labels: list  # (K,) "control", singles, then combinations
    condition_shift: np.ndarray  # (K, L) float32 sum of the condition's masked embeddings
    condition_size: np.ndarray   # (K,) int number of perturbations in the condition
    cell_condition: np.ndarray   # (n_cells,) int32
    w1: np.ndarray         # (L, H) float32
    b1: np.ndarray         # (H,)
    w2: np.ndarray         # (H, G)
    b2: np.ndarray         # (G,)
    theta: np.ndarray      # (G,) float32

    @property
    def n_blocks(self) -> int:
        return -(-self.n_cells // BLOCK_CELLS)


def _check_args(n_cells, n_genes, n_perturbations, n_combinations, mask_prob, n_latent,
                control_fraction, n_hidden, embedding_std):
    for name, v in (("n_cells", n_cells), ("n_genes", n_genes), ("n_perturbations", n_perturbations),
                    ("n_latent", n_latent), ("n_hidden", n_hidden)):
        if int(v) != v or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v}")
    max_pairs = n_perturbations * (n_perturbations - 1) // 2
    if int(n_combinations) != n_combinations or not 0 <= n_combinations <= max_pairs:
        raise ValueError(f"n_combinations must be an integer in [0, {max_pairs}] (distinct pairs of "
                         f"{n_perturbations} perturbations), got {n_combinations}")
    if not 0 < mask_prob <= 1:
        raise ValueError(f"mask_prob must be in (0, 1], got {mask_prob}")
    if not 0 <= control_fraction < 1:
        raise ValueError(f"control_fraction must be in [0, 1), got {control_fraction}")
    if not embedding_std > 0:
        raise ValueError(f"embedding_std must be positive, got {embedding_std}")


def _sample_pairs(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """(k, 2) distinct unordered pairs (i < j) of range(n)."""
    if k == 0:
        return np.empty((0, 2), dtype=np.int64)
    total = n * (n - 1) // 2
    if total <= 4_000_000:
        i, j = np.triu_indices(n, 1)
        pick = rng.choice(total, size=k, replace=False)
        return np.stack([i[pick], j[pick]], axis=1)
    seen, out = set(), []
    while len(out) < k:
        a, b = rng.integers(0, n, size=(2, 2 * k))
        for x, y in zip(a.tolist(), b.tolist()):
            if x != y and (min(x, y), max(x, y)) not in seen:
                seen.add((min(x, y), max(x, y)))
                out.append((min(x, y), max(x, y)))
                if len(out) == k:
                    break
    return np.asarray(out, dtype=np.int64)


def _make_plan(n_cells, n_genes, n_perturbations, n_combinations, mask_prob, n_latent, seed,
               control_fraction, n_hidden, embedding_std) -> _Plan:
    _check_args(n_cells, n_genes, n_perturbations, n_combinations, mask_prob, n_latent,
                control_fraction, n_hidden, embedding_std)
    rng = np.random.default_rng([seed, 0])
    T, L, H, G = int(n_perturbations), int(n_latent), int(n_hidden), int(n_genes)
    names = [f"P{t}" for t in range(T)]
    embeddings = (embedding_std * rng.standard_normal((T, L))).astype(np.float32)
    masks = (rng.random((T, L)) < mask_prob).astype(np.uint8)
    empty = np.flatnonzero(masks.sum(1) == 0)
    masks[empty, rng.integers(0, L, size=empty.size)] = 1
    effect = embeddings * masks

    pairs = _sample_pairs(rng, T, int(n_combinations))
    labels = ["control"] + names
    for a, b in pairs.tolist():
        labels.append("+".join(sorted((names[a], names[b]))))  # canonical: vocabulary order
    shift = np.concatenate([np.zeros((1, L), np.float32), effect,
                            effect[pairs[:, 0]] + effect[pairs[:, 1]]]).astype(np.float32)
    size = np.r_[0, np.ones(T, np.int64), np.full(len(pairs), 2, np.int64)]

    n_ctrl = int(round(control_fraction * n_cells))
    n_pert_cells = n_cells - n_ctrl
    cond = np.concatenate([np.zeros(n_ctrl, np.int32),
                           1 + (np.arange(n_pert_cells) % (len(labels) - 1)).astype(np.int32)])
    cond = cond[rng.permutation(n_cells)]

    w1 = (rng.standard_normal((L, H)) / np.sqrt(L)).astype(np.float32)
    b1 = (0.1 * rng.standard_normal(H)).astype(np.float32)
    w2 = (rng.standard_normal((H, G)) / np.sqrt(H)).astype(np.float32)
    b2 = rng.standard_normal(G).astype(np.float32)
    theta = np.exp(np.log(THETA_MEDIAN) + 0.5 * rng.standard_normal(G)).astype(np.float32)
    return _Plan(n_cells=int(n_cells), n_genes=G, seed=int(seed), mask_prob=float(mask_prob),
                 control_fraction=float(control_fraction), embedding_std=float(embedding_std),
                 names=names, masks=masks, embeddings=embeddings, condition_labels=labels,
                 condition_shift=shift, condition_size=size, cell_condition=cond,
                 w1=w1, b1=b1, w2=w2, b2=b2, theta=theta)


def _sample_block(plan: _Plan, block: int) -> sp.csr_matrix:
    """Counts of cells [block * BLOCK_CELLS, ...): CSR (n, G) float32 with integer values."""
    lo = block * BLOCK_CELLS
    hi = min(lo + BLOCK_CELLS, plan.n_cells)
    rng = np.random.default_rng([plan.seed, 1, block])
    n = hi - lo
    z = rng.standard_normal((n, plan.w1.shape[0]), dtype=np.float32)
    z += plan.condition_shift[plan.cell_condition[lo:hi]]
    h = z @ plan.w1 + plan.b1
    h = np.where(h > 0, h, LEAKY_SLOPE * h)
    logits = h @ plan.w2
    logits += plan.b2
    logits -= logits.max(axis=1, keepdims=True)
    mean = np.exp(logits, out=logits)  # reuses the buffer: unnormalised proportions
    log_lo, log_hi = np.log(LIBRARY_RANGE[0]), np.log(LIBRARY_RANGE[1])
    library = np.exp(rng.uniform(log_lo, log_hi, size=n)).astype(np.float32)
    mean *= (library / mean.sum(axis=1))[:, None]
    # Gamma-Poisson: rate = mean * Gamma(theta, 1) / theta
    rate = rng.standard_gamma(np.broadcast_to(plan.theta, (n, plan.n_genes)), dtype=np.float32)
    rate *= mean
    rate /= plan.theta
    counts = rng.poisson(rate)
    csr = sp.csr_matrix(counts)
    return sp.csr_matrix((csr.data.astype(np.float32), csr.indices.astype(np.int32),
                          csr.indptr.astype(np.int64)), shape=csr.shape)


def _obs_var_uns(plan: _Plan):
    labels = pd.Categorical.from_codes(plan.cell_condition, categories=plan.condition_labels)
    obs = pd.DataFrame({"perturbation": labels,
                        "n_perturbations": plan.condition_size[plan.cell_condition]},
                       index=pd.Index([f"cell{i}" for i in range(plan.n_cells)]))
    var = pd.DataFrame(index=pd.Index([f"G{g}" for g in range(plan.n_genes)]))
    uns = {UNS_KEY: {
        "masks": plan.masks, "embeddings": plan.embeddings,
        "perturbations": np.asarray(plan.names, dtype=object),
        "combinations": np.asarray(plan.condition_labels[1 + len(plan.names):], dtype=object),
        "n_latent": int(plan.masks.shape[1]), "theta": plan.theta, "seed": plan.seed,
        "mask_prob": plan.mask_prob, "embedding_std": plan.embedding_std,
        "control_fraction": plan.control_fraction,
    }}
    return obs, var, uns


def _blocks(plan: _Plan, progress: bool) -> Iterator[sp.csr_matrix]:
    blocks = range(plan.n_blocks)
    if progress:
        from tqdm.auto import tqdm
        blocks = tqdm(blocks, desc="simulating", unit="block", unit_scale=BLOCK_CELLS / 1000,
                      bar_format="{l_bar}{bar}| {n:.0f}k/{total:.0f}k cells [{elapsed}<{remaining}]")
    for b in blocks:
        yield _sample_block(plan, b)


def simulate_screen(n_cells: int = 5000, n_genes: int = 500, n_perturbations: int = 20, *,
                    n_combinations: int = 0, mask_prob: float = 0.1, n_latent: int = 10,
                    seed: int = 0, control_fraction: float = 0.1, n_hidden: int = 64,
                    embedding_std: float = 1.5) -> anndata.AnnData:
    """A simulated screen in memory (see the module docstring for the process).

    Returns an AnnData with ``X`` (n_cells, n_genes) CSR float32 integer counts,
    ``obs["perturbation"]`` ("control", "P3", "P3+P7"; combinations are random distinct pairs of
    singles), ``obs["n_perturbations"]`` and ``uns["samsvae_simulation"]``: masks (T, L) uint8,
    embeddings (T, L) float32, perturbations (T,) names (row order of masks/embeddings),
    combinations (C,), n_latent, theta (G,) float32, seed, mask_prob, embedding_std,
    control_fraction. Cells are spread evenly over the T + C conditions after
    ``control_fraction`` of them are made controls.
    """
    plan = _make_plan(n_cells, n_genes, n_perturbations, n_combinations, mask_prob, n_latent,
                      seed, control_fraction, n_hidden, embedding_std)
    X = sp.vstack(list(_blocks(plan, progress=False)), format="csr")
    obs, var, uns = _obs_var_uns(plan)
    return anndata.AnnData(X=X, obs=obs, var=var, uns=uns)


def write_simulated_screen(path, n_cells: int, n_genes: int, n_perturbations: int, *,
                           chunk_cells: int = 10_000, compression: Optional[str] = None,
                           progress: bool = False, **kwargs) -> dict:
    """Write the screen :func:`simulate_screen` would return (same arguments) to an .h5ad file.

    Cells are generated and appended ``chunk_cells`` at a time (at least one block of
    :data:`BLOCK_CELLS`): obs/var/uns are written by anndata, ``X`` as an h5ad CSR group whose
    ``data``/``indices`` datasets grow chunk by chunk, so neither the dense matrix nor the whole
    CSR is ever in memory. ``compression`` (e.g. ``"gzip"``) applies to ``X``. Returns a summary
    ``{"path", "n_cells", "n_genes", "n_perturbations", "n_combinations", "nnz", "bytes",
    "seconds"}``.
    """
    t0 = time.perf_counter()
    path = os.fspath(path)
    if chunk_cells < 1:
        raise ValueError(f"chunk_cells must be >= 1, got {chunk_cells}")
    defaults = dict(n_combinations=0, mask_prob=0.1, n_latent=10, seed=0, control_fraction=0.1,
                    n_hidden=64, embedding_std=1.5)
    unknown = set(kwargs) - set(defaults)
    if unknown:
        raise TypeError(f"unknown argument(s) {sorted(unknown)}; expected {sorted(defaults)}")
    opts = {**defaults, **kwargs}
    plan = _make_plan(n_cells, n_genes, n_perturbations, opts["n_combinations"], opts["mask_prob"],
                      opts["n_latent"], opts["seed"], opts["control_fraction"], opts["n_hidden"],
                      opts["embedding_std"])
    obs, var, uns = _obs_var_uns(plan)
    anndata.AnnData(obs=obs, var=var, uns=uns).write_h5ad(path)
    del obs

    with h5py.File(path, "a") as f:
        group = f.create_group("X")
        group.attrs["encoding-type"] = "csr_matrix"
        group.attrs["encoding-version"] = "0.1.0"
        group.attrs["shape"] = np.array([plan.n_cells, plan.n_genes], dtype=np.int64)
        opts_ds = dict(maxshape=(None,), chunks=(_H5_CHUNK,), compression=compression)
        data_ds = group.create_dataset("data", shape=(0,), dtype=np.float32, **opts_ds)
        ind_ds = group.create_dataset("indices", shape=(0,), dtype=np.int32, **opts_ds)
        indptr_ds = group.create_dataset("indptr", shape=(plan.n_cells + 1,), dtype=np.int64)
        indptr_ds[0] = 0
        nnz, row, pending = 0, 0, []

        def flush():
            nonlocal nnz, row
            if not pending:
                return
            data = np.concatenate([m.data for m in pending])
            indices = np.concatenate([m.indices for m in pending])
            lengths = np.concatenate([np.diff(m.indptr) for m in pending])
            data_ds.resize((nnz + data.size,))
            ind_ds.resize((nnz + data.size,))
            data_ds[nnz:] = data
            ind_ds[nnz:] = indices
            indptr_ds[row + 1:row + 1 + lengths.size] = nnz + np.cumsum(lengths)
            nnz += data.size
            row += lengths.size
            pending.clear()

        buffered = 0
        for block in _blocks(plan, progress):
            pending.append(block)
            buffered += block.shape[0]
            if buffered >= chunk_cells:
                flush()
                buffered = 0
        flush()
    return {"path": path, "n_cells": plan.n_cells, "n_genes": plan.n_genes,
            "n_perturbations": len(plan.names),
            "n_combinations": len(plan.condition_labels) - 1 - len(plan.names),
            "nnz": int(nnz), "bytes": os.path.getsize(path),
            "seconds": time.perf_counter() - t0}


def synth_batch(n_cells: int, n_genes: int, n_perturbations: int, *, seed: int = 0,
                control_fraction: float = 0.1, mean_count: float = 0.5):
    """A synthetic :class:`samsvae.data.Batch`.

    counts (n_cells, G) CSR float32 NB(theta=5) counts with log-normal gene proportions and a
    mean of ``mean_count`` UMIs per gene and cell (about 20-30% non-zeros); dosage (n_cells, T)
    CSR with one random perturbation of dosage 1 per non-control cell; library = row sums.
    """
    import scipy.sparse as sp
    import torch


    rng = np.random.default_rng(seed)
    prop = np.exp(rng.normal(0.0, 1.0, n_genes))
    prop /= prop.sum()
    library = mean_count * n_genes * np.exp(rng.normal(0.0, 0.3, n_cells))
    mu = library[:, None] * prop[None, :]
    theta = 5.0
    counts = rng.poisson(rng.gamma(theta, mu / theta)).astype(np.float32)
    counts[:, 0] += (counts.sum(1) == 0)          # no empty cell (library >= 1)
    control = rng.random(n_cells) < control_fraction
    cols = rng.integers(0, n_perturbations, n_cells)
    rows = np.nonzero(~control)[0]
    dosage = sp.csr_matrix((np.ones(rows.size, np.float32), (rows, cols[rows])),
                           shape=(n_cells, n_perturbations))
    csr = sp.csr_matrix(counts)
    return Batch(counts=csr_to_torch(csr), dosage=csr_to_torch(dosage),
                 library=torch.from_numpy(counts.sum(1).astype(np.float32)),
                 index=torch.arange(n_cells, dtype=torch.int64),
                 perturbations=batch_perturbation_ids(dosage))
