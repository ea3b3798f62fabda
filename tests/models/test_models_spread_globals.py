"""The 1/N_t reweighting of the global terms: summed over the training cells, each
perturbation's (or SVAE+ label's) global log-ratio counts exactly once, and the minibatch
objective is unbiased for the full-data one."""
import itertools

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from samsvae.data import load_screen, make_batch, perturbation_cell_counts, simulate_screen
from samsvae.models import build_model, per_cell_global_term, svae_plus_labels
from samsvae.ops import batch_perturbations


def _csr(rows, n_cols):
    """torch CSR dosage from a list of {col: value} rows."""
    data, indices, indptr = [], [], [0]
    for r in rows:
        for c in sorted(r):
            indices.append(c)
            data.append(r[c])
        indptr.append(len(indices))
    m = sp.csr_matrix((np.asarray(data, dtype=np.float64), indices, indptr),
                      shape=(len(rows), n_cols))
    return torch.sparse_csr_tensor(torch.as_tensor(m.indptr, dtype=torch.int64),
                                   torch.as_tensor(m.indices, dtype=torch.int64),
                                   torch.as_tensor(m.data), size=m.shape,
                                   check_invariants=False)


def test_per_cell_terms_sum_to_each_global_once():
    # 7 cells, 4 perturbations; a double, a control, a dosage of 2 (counts once, like 1)
    rows = [{0: 1.0}, {0: 1.0, 2: 1.0}, {}, {1: 2.0}, {2: 1.0}, {0: 1.0}, {3: 1.0}]
    dosage = _csr(rows, 4)
    index = batch_perturbations(dosage)[0]
    counts = torch.tensor([3.0, 1.0, 2.0, 1.0])          # cells carrying each perturbation
    g = torch.tensor([[1.5, -2.0, 0.25, 4.0], [0.5, 1.0, -3.0, 2.0]], dtype=torch.float64)
    per_cell = per_cell_global_term(dosage, index, g, counts)
    assert per_cell.shape == (2, 7)
    torch.testing.assert_close(per_cell.sum(1), g.sum(1))
    assert torch.all(per_cell[:, 2] == 0)                 # the control carries nothing
    torch.testing.assert_close(per_cell[:, 1], g[:, 0] / 3 + g[:, 2] / 2)


def test_minibatch_objective_is_unbiased_over_all_batches():
    """E over uniformly drawn batches of (N / b) * sum_batch (local + global share) equals
    sum_i local_i + sum_t G_t exactly (enumerating every batch of size b)."""
    rows = [{0: 1.0}, {0: 1.0, 2: 1.0}, {}, {1: 1.0}, {2: 1.0}, {0: 1.0}]
    N, b = len(rows), 3
    T = 3
    counts = torch.tensor([3.0, 1.0, 2.0])
    g_all = torch.tensor([[0.7, -1.3, 2.2]], dtype=torch.float64)      # G_t, one particle
    local = torch.tensor([-5.0, -3.0, -4.0, -6.5, -2.0, -1.0], dtype=torch.float64)
    full = float(local.sum() + g_all.sum())
    values = []
    for batch_rows in itertools.combinations(range(N), b):
        dosage = _csr([rows[i] for i in batch_rows], T)
        index = batch_perturbations(dosage)[0]
        share = per_cell_global_term(dosage, index, g_all[:, index], counts)[0]
        values.append(N / b * float((local[list(batch_rows)] + share).sum()))
    assert np.mean(values) == pytest.approx(full, rel=1e-12)
    assert np.std(values) > 0  # individual batches do differ


@pytest.fixture(scope="module")
def screen():
    return load_screen(simulate_screen(n_cells=120, n_genes=20, n_perturbations=4,
                                       n_combinations=2, n_latent=3, seed=5))


@pytest.mark.parametrize("name,guide", [("sams_vae", "mean_field"),
                                        ("sams_vae", "corr_embedding"),
                                        ("sams_vae", "corr_both"), ("cpa_vae", "mean_field")])
def test_model_global_share_sums_to_spread_globals(name, guide, screen):
    """For a fixed sample of the globals, the per-cell global terms of the loss summed over all
    (training) cells equal the sum over perturbations of the global log-ratio."""
    rows = np.arange(screen.n_cells)
    batch = make_batch(screen, rows)
    torch.manual_seed(0)
    model = build_model(name, guide, n_genes=screen.n_genes,
                        n_perturbations=screen.n_perturbations, n_latent=3, n_hidden=8,
                        perturbation_counts=perturbation_cell_counts(screen.dosage, rows))
    model = model.double()
    P = 3
    z_p, index, ratio = model._sample_globals(batch.dosage, P, torch.Generator().manual_seed(4))
    assert ratio.shape == (P, index.numel()) and index.numel() == screen.n_perturbations
    out = model.loss(batch, particles=P, generator=torch.Generator().manual_seed(4))
    per_cell_sum = out["terms"]["global"] * screen.n_cells      # mean over particles and cells
    assert per_cell_sum == pytest.approx(float(ratio.detach().mean(0).sum()), rel=1e-9)


def test_svae_plus_label_share_sums_to_label_terms(screen):
    rows = np.arange(screen.n_cells)
    batch = make_batch(screen, rows)
    torch.manual_seed(0)
    model = build_model("svae_plus", n_genes=screen.n_genes,
                        n_perturbations=screen.n_perturbations, n_latent=3, n_hidden=8,
                        perturbation_counts=screen.perturbation_counts,
                        **svae_plus_labels(screen.dosage)).double()
    P = 2
    _, present, _, label_term = model._sample_globals(batch.dosage, P,
                                                      torch.Generator().manual_seed(9))
    assert present.numel() == model.n_labels == screen.n_perturbations + 2
    out = model.loss(batch, particles=P, generator=torch.Generator().manual_seed(9))
    assert out["terms"]["global"] * screen.n_cells == pytest.approx(
        float(label_term.detach().mean(0).sum()), rel=1e-9)
