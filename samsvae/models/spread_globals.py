"""Spreading the global (per-perturbation) ELBO terms over the cells that received them.

The ELBO of a screen with N training cells is

    sum_i local_i  +  sum_t G_t,      G_t = log p(e_t) + log p(m_t) - log q(e_t | .) - log q(m_t)

A minibatch only sees the perturbations of its cells. Cell i carries ``G_t / N_t`` of every
perturbation t it received (N_t = training cells with a non-zero dosage of t), so summing the
per-cell terms over the training split gives each G_t exactly once; for a uniformly drawn batch B
of size b, ``E[(N / b) sum_{i in B} (local_i + sum_{t in i} G_t / N_t)]`` is the full ELBO.
Only the U perturbations present in the batch are touched: no (cells x T) matrix is built.
"""
from __future__ import annotations

import torch

from ..ops import batch_perturbations


def per_cell_global_term(dosage: torch.Tensor, index: torch.Tensor, global_term: torch.Tensor,
                         counts: torch.Tensor, extra_term=None,
                         extra_weight: float = 0.0) -> torch.Tensor:
    """Per-cell share of the global terms.

    Args:
        dosage: (B, T) CSR dosage of the batch (only its pattern is used: a cell carries
            ``1/N_t`` of ``G_t`` whatever its non-zero dosage value).
        index: (U,) sorted perturbation ids present in the batch (``batch_perturbations``).
        global_term: (P, U) ``G_t`` per particle for those perturbations.
        counts: (T,) N_t, number of training cells with each perturbation (values below 1 are
            treated as 1, so a perturbation absent from training cannot divide by zero).
        extra_term, extra_weight: optional (P, U) term A_t that every cell carrying t adds with
            weight ``extra_weight`` on top of its 1/N_t share (the reference implementation's
            "prior weight proportional to n": over the training split A_t counts
            ``extra_weight * N_t`` extra times). Not part of the ELBO; default off.

    Returns:
        (P, B): ``sum_{t in perts(i)} (G_t / N_t + extra_weight * A_t)``; zero for control cells.
    """
    _, local_col, rows, values = batch_perturbations(dosage, index)  # no torch.unique
    inv = 1.0 / counts.to(global_term.dtype)[index].clamp_min(1.0)          # (U,)
    present = (values != 0).to(global_term.dtype)                            # stored zeros: no
    weighted = global_term * inv
    if extra_term is not None and extra_weight:
        weighted = weighted + float(extra_weight) * extra_term
    contrib = weighted[:, local_col] * present                               # (P, nnz)
    out = global_term.new_zeros(global_term.shape[0], dosage.shape[0])
    return out.index_add(1, rows, contrib)
