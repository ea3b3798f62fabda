"""Baseline implementations the fused ops are compared against (each written once, here).

Imported by the benchmark scripts and by ``tests/test_bench_*.py`` (which check them against the
float64 reference ``samsvae.ops.nb_log_prob_reference``), so a baseline that drifts from the
math fails a test instead of producing a flattering table.

Negative binomial: every function maps ``(counts, logits, log_library, log_theta)`` with
logits ``(C, G)`` or ``(P, C, G)``, counts ``(C, G)``, log_library ``(C,)``, log_theta ``(G,)``
to the per-row log-likelihood ``logits.shape[:-1]`` (nats, summed over genes).

Masked embedding: every function maps ``(dosage, loc, log_scale, mask_logits, particles,
temperature, noise)`` to ``z_p (P, C, L)``; see :func:`embedding_noise` for the noise layout.
"""
from __future__ import annotations

import functools
import importlib.util
from typing import Callable, Dict

import torch
import torch.nn.functional as F

from samsvae.ops.embedding import batch_perturbations, draw_noise, relaxed_bernoulli_st

# ----------------------------------------------------------------------------------------------
# Negative binomial log-likelihood baselines
# ----------------------------------------------------------------------------------------------


def nb_eager(counts, logits, log_library, log_theta):
    """Eager PyTorch, log_softmax form with the usual lgamma formula on dense counts.

    log NB = theta (log theta - log(theta + mu)) + x (log mu - log(theta + mu))
             + lgamma(x + theta) - lgamma(theta) - lgamma(x + 1),   log mu = log l + log_softmax
    """
    x = counts.to(logits.dtype)
    log_theta = log_theta.to(logits.dtype)
    theta = log_theta.exp()
    log_mu = log_library.to(logits.dtype).unsqueeze(-1) + torch.log_softmax(logits, dim=-1)
    log_theta_mu = torch.logaddexp(log_theta, log_mu)
    res = (theta * (log_theta - log_theta_mu) + x * (log_mu - log_theta_mu)
           + torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1.0))
    return res.sum(-1)


def log_nb_positive_formula(x, mu, theta, eps: float = 1e-8):
    """scvi-tools' ``log_nb_positive`` written from its published formula (elementwise)."""
    log_theta_mu_eps = torch.log(theta + mu + eps)
    return (theta * (torch.log(theta + eps) - log_theta_mu_eps)
            + x * (torch.log(mu + eps) - log_theta_mu_eps)
            + torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1))


def nb_scvi_formula(counts, logits, log_library, log_theta):
    """scvi-tools decoder + likelihood: ``mu = exp(library) * softmax(logits)`` then
    ``log_nb_positive(x, mu, theta).sum(-1)`` (probability space, eps-guarded logs)."""
    x = counts.to(logits.dtype)
    mu = log_library.to(logits.dtype).exp().unsqueeze(-1) * torch.softmax(logits, dim=-1)
    return log_nb_positive_formula(x, mu, log_theta.to(logits.dtype).exp()).sum(-1)


def _scvi_real():
    from scvi.distributions._negative_binomial import log_nb_positive  # type: ignore

    def nb_scvi_real(counts, logits, log_library, log_theta):
        x = counts.to(logits.dtype)
        mu = log_library.to(logits.dtype).exp().unsqueeze(-1) * torch.softmax(logits, dim=-1)
        theta = log_theta.to(logits.dtype).exp()
        # scvi reduces over nothing by default; broadcasting theta to mu's shape as scvi does
        return log_nb_positive(x, mu, theta.expand_as(mu)).sum(-1)
    return nb_scvi_real


def _pyro_gamma_poisson():
    from pyro.distributions import GammaPoisson  # type: ignore

    def nb_pyro(counts, logits, log_library, log_theta):
        x = counts.to(logits.dtype)
        mu = log_library.to(logits.dtype).exp().unsqueeze(-1) * torch.softmax(logits, dim=-1)
        theta = log_theta.to(logits.dtype).exp()
        return GammaPoisson(concentration=theta, rate=theta / mu).log_prob(x).sum(-1)
    return nb_pyro


def nb_sparse_coo(coo, logits, log_library, log_theta):
    """Sparsity-aware form: lgamma only on the non-zero entries, gathered by index.

    ``coo = (rows, cols, values)`` of the ``(C, G)`` counts (``values`` float); the x = 0 part
    ``theta (log theta - log(theta + mu))`` is summed densely over every gene.
    """
    rows, cols, x = coo
    dtype = logits.dtype
    x = x.to(dtype)
    log_theta = log_theta.to(dtype)
    theta = log_theta.exp()
    log_mu = log_library.to(dtype).unsqueeze(-1) + torch.log_softmax(logits, dim=-1)
    log_theta_mu = torch.logaddexp(log_theta, log_mu)
    zero_part = (theta * (log_theta - log_theta_mu)).sum(-1)
    th = theta[cols]
    term = (x * (log_mu[..., rows, cols] - log_theta_mu[..., rows, cols])
            + torch.lgamma(x + th) - torch.lgamma(th) - torch.lgamma(x + 1.0))
    return zero_part.index_add(-1, rows, term)


def csr_to_coo(counts_csr: torch.Tensor):
    """``(rows, cols, values)`` of a CSR matrix (what :func:`nb_sparse_coo` takes); copies, so
    that torch.compile sees plain dense tensors rather than views into a sparse one."""
    crow = counts_csr.crow_indices()
    rows = torch.repeat_interleave(torch.arange(crow.numel() - 1, device=crow.device),
                                   crow[1:] - crow[:-1])
    return rows, counts_csr.col_indices().clone(), counts_csr.values().clone()


@functools.lru_cache(maxsize=None)
def compiled(fn: Callable, backend: str = "inductor") -> Callable:
    """``torch.compile(fn, backend=backend)``, cached so every caller shares one compiled object.

    ``backend="aot_eager"`` traces forward and backward without generating code (the smoke
    tests use it: it catches graph-capture failures in seconds instead of a cold compile)."""
    return torch.compile(fn, dynamic=False, backend=backend)


def optional_nb_baselines() -> Dict[str, Callable]:
    """The real scvi-tools / pyro functions, only when those packages are importable."""
    out = {}
    if importlib.util.find_spec("scvi") is not None:
        out["scvi_log_nb_positive"] = _scvi_real()
    if importlib.util.find_spec("pyro") is not None:
        out["pyro_GammaPoisson"] = _pyro_gamma_poisson()
    return out


# ----------------------------------------------------------------------------------------------
# Masked perturbation embedding baselines
# ----------------------------------------------------------------------------------------------


def embedding_noise(particles, n_perturbations, latent, index, *, dtype, device, generator=None,
                    masked=True):
    """Noise for both baseline families, consistent with the op's own draw.

    Draws ``(eps, u)`` of shape (P, U, L) exactly as ``samsvae.ops.draw_noise`` does for the
    batch's U perturbations (so the op with the same generator state sees the same noise), and
    also returns all-T versions (P, T, L) holding that noise at ``index`` and fresh noise
    elsewhere. Returns ``(noise_U, noise_T)``.
    """
    eps_u, u_u = draw_noise(particles, index.numel(), latent, dtype=dtype, device=device,
                            generator=generator, masked=masked)
    eps_t, u_t = draw_noise(particles, n_perturbations, latent, dtype=dtype, device=device,
                            generator=generator, masked=masked)
    eps_t[:, index] = eps_u
    if masked:
        u_t[:, index] = u_u
    return (eps_u, u_u), (eps_t, u_t)


def _sample_values(loc, log_scale, mask_logits, noise, temperature):
    eps, u = noise
    values = loc if log_scale is None else loc + log_scale.exp() * eps
    if mask_logits is not None:
        values = values * relaxed_bernoulli_st(mask_logits, u, temperature)
    return values


def embedding_dense_all_t(dosage_dense, loc, log_scale, mask_logits, particles, temperature=1.0,
                          noise=None):
    """Sample e and m for all T perturbations, then ``z_p = D @ (E * M)`` with dense D (C, T)."""
    P, (T, L) = particles, loc.shape
    if noise is None:
        noise = draw_noise(P, T, L, dtype=loc.dtype, device=loc.device,
                           masked=mask_logits is not None)
    values = _sample_values(loc, log_scale, mask_logits, noise, temperature)     # (P, T, L)
    return torch.matmul(dosage_dense.to(loc.dtype), values)                      # (P, C, L)


def _bag_sum(rows_csr_crow, cols, weights, table, particles, stride):
    """embedding_bag over particles folded into the table: bag (p, i) sums table[p*stride+col]."""
    nnz = cols.numel()
    offsets_one = rows_csr_crow[:-1]
    idx = (cols.unsqueeze(0) + stride * torch.arange(particles, device=cols.device)[:, None])
    offsets = (offsets_one.unsqueeze(0) + nnz * torch.arange(particles, device=cols.device)[:, None])
    out = F.embedding_bag(idx.reshape(-1), table.reshape(-1, table.shape[-1]), offsets.reshape(-1),
                          mode="sum", per_sample_weights=weights.repeat(particles),
                          include_last_offset=False)
    return out.view(particles, rows_csr_crow.numel() - 1, table.shape[-1])


def embedding_bag_all_t(parts, loc, log_scale, mask_logits, particles, temperature=1.0,
                        noise=None):
    """Sample all T, then ``F.embedding_bag`` (per-sample weights = dosages) per cell.

    ``parts = (crow, col, values)`` of the ``(C, T)`` dosage as plain tensors (see
    :func:`csr_parts`), which torch.compile accepts where a sparse tensor would not.
    """
    crow, col, val = parts
    P, (T, L) = particles, loc.shape
    if noise is None:
        noise = draw_noise(P, T, L, dtype=loc.dtype, device=loc.device,
                           masked=mask_logits is not None)
    values = _sample_values(loc, log_scale, mask_logits, noise, temperature)     # (P, T, L)
    return _bag_sum(crow, col, val.to(loc.dtype), values, P, T)


def csr_parts(csr: torch.Tensor):
    """``(crow, col, values)`` copies of a CSR tensor's parts (dense tensors)."""
    return csr.crow_indices().clone(), csr.col_indices().clone(), csr.values().clone()


def coo_local(dosage: torch.Tensor):
    """``(index, (rows, local_col, values))`` of a CSR dosage batch as plain tensors: what a data
    loader could precompute for :func:`embedding_index_add_batch_u`."""
    index, local_col, rows, val = batch_perturbations(dosage)
    return index, (rows, local_col, val.clone())


def embedding_bag_batch_u(dosage, loc, log_scale, mask_logits, particles, temperature=1.0,
                          noise=None):
    """Sample only the U perturbations in the batch (unique), then ``F.embedding_bag``."""
    index, local_col, _, val = batch_perturbations(dosage)
    P, L = particles, loc.shape[-1]
    U = index.numel()
    if noise is None:
        noise = draw_noise(P, U, L, dtype=loc.dtype, device=loc.device,
                           masked=mask_logits is not None)
    values = _sample_values(loc[index], None if log_scale is None else log_scale[index],
                            None if mask_logits is None else mask_logits[index], noise,
                            temperature)                                          # (P, U, L)
    return _bag_sum(dosage.crow_indices(), local_col, val.to(loc.dtype), values, P, U)


def embedding_index_add_batch_u(coo, n_cells, index, loc, log_scale, mask_logits, particles,
                                temperature=1.0, noise=None):
    """Gather + ``index_add`` on precomputed batch indices (compile-friendly: no CSR, no unique).

    ``coo = (rows, local_col, values)`` of the batch dosage (:func:`coo_local`), ``index`` the U
    ids present.
    """
    rows, local_col, val = coo
    P, L = particles, loc.shape[-1]
    if noise is None:
        noise = draw_noise(P, index.numel(), L, dtype=loc.dtype, device=loc.device,
                           masked=mask_logits is not None)
    values = _sample_values(loc[index], None if log_scale is None else log_scale[index],
                            None if mask_logits is None else mask_logits[index], noise,
                            temperature)
    contrib = values[:, local_col, :] * val.to(loc.dtype)[None, :, None]
    return values.new_zeros(P, n_cells, L).index_add(1, rows, contrib)


def make_dosage(cells: int, n_perturbations: int, *, max_per_cell: int = 2, seed: int = 0,
                dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Random ``(cells, T)`` CSR dosage with 1..max_per_cell distinct perturbations per cell."""
    g = torch.Generator().manual_seed(seed)
    per_cell = torch.randint(1, max_per_cell + 1, (cells,), generator=g)
    cols = [torch.randperm(n_perturbations, generator=g)[:k].sort().values for k in per_cell.tolist()]
    crow = torch.zeros(cells + 1, dtype=torch.int64)
    crow[1:] = torch.cumsum(per_cell, 0)
    col = torch.cat(cols)
    val = torch.ones(col.numel(), dtype=dtype)
    return torch.sparse_csr_tensor(crow, col, val, size=(cells, n_perturbations),
                                   check_invariants=False).to(device)


def make_counts(cells: int, genes: int, zero_fraction: float, *, seed: int = 0,
                device="cpu") -> torch.Tensor:
    """Dense float32 ``(cells, genes)`` counts with about ``zero_fraction`` zeros; non-zeros are
    ``1 + Poisson`` with a heavy tail (a few counts in the hundreds)."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(cells, genes, generator=g) >= zero_fraction
    rate = torch.exp(torch.randn(cells, genes, generator=g) * 1.2)
    x = (1.0 + torch.poisson(rate, generator=g)) * keep
    return x.to(device)


def nb_inputs(particles: int, cells: int, genes: int, zero_fraction: float, *, seed: int = 0,
              dtype=torch.float32, device="cpu"):
    """Realistic NB benchmark inputs: ``(counts (C,G) dense, logits (P,C,G) or (C,G) when
    particles is None, log_library (C,), log_theta (G,))``."""
    counts = make_counts(cells, genes, zero_fraction, seed=seed, device=device)
    g = torch.Generator().manual_seed(seed + 1)
    shape = (cells, genes) if particles is None else (particles, cells, genes)
    logits = (torch.randn(*shape, generator=g) * 1.5).to(device=device, dtype=dtype)
    log_library = torch.log(counts.sum(1).clamp_min(1.0)).to(dtype)
    log_theta = (torch.randn(genes, generator=g) * 1.5 + 1.0).to(device=device, dtype=dtype)
    return counts, logits, log_library, log_theta


NB_BASELINES: Dict[str, Callable] = {"eager": nb_eager, "scvi_formula": nb_scvi_formula}

__all__ = [
    "nb_eager", "nb_scvi_formula", "log_nb_positive_formula", "nb_sparse_coo", "csr_to_coo",
    "compiled", "optional_nb_baselines", "embedding_noise", "embedding_dense_all_t",
    "embedding_bag_all_t", "embedding_bag_batch_u", "embedding_index_add_batch_u",
    "csr_parts", "coo_local",
    "make_dosage", "make_counts", "nb_inputs", "NB_BASELINES",
]
