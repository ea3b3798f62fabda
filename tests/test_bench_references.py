"""The benchmark baselines (benchmarks/references.py) compute what they claim, so the speed-up
tables compare like with like. Checked in float64 against samsvae's reference ops."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import references as R  # noqa: E402

from samsvae.ops import masked_embedding_sum, nb_log_prob_reference  # noqa: E402
from samsvae.ops.embedding import masked_embedding_sum_reference  # noqa: E402


@pytest.mark.parametrize("particles", [None, 3])
@pytest.mark.parametrize("name", ["eager", "scvi_formula", "sparse_coo", *R.optional_nb_baselines()])
def test_nb_baselines_match_reference(name, particles):
    counts, logits, log_lib, log_theta = R.nb_inputs(particles, 17, 40, 0.8, dtype=torch.float64)
    logits = logits.requires_grad_()
    want = nb_log_prob_reference(counts, logits, log_lib, log_theta)
    if name == "sparse_coo":
        got = R.nb_sparse_coo(R.csr_to_coo(counts.to_sparse_csr()), logits, log_lib, log_theta)
    else:
        got = {**R.NB_BASELINES, **R.optional_nb_baselines()}[name](counts, logits, log_lib,
                                                                   log_theta)
    # scvi's eps=1e-8 guards shift its value by ~x*eps/mu; the others are exact rewrites
    scvi = name.startswith("scvi")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-3 if scvi else 1e-9)
    g_got, = torch.autograd.grad(got.sum(), logits)
    g_want, = torch.autograd.grad(want.sum(), logits)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4 if scvi else 1e-9,
                               atol=1e-4 if scvi else 1e-9)


def test_make_counts_zero_fraction_and_integers():
    x = R.make_counts(300, 200, 0.9, seed=3)
    assert abs(float((x == 0).float().mean()) - 0.9) < 0.01
    assert torch.equal(x, x.round()) and x.max() > 5


def test_embedding_baselines_match_reference():
    T, L, P, C = 30, 6, 4, 12
    dosage = R.make_dosage(C, T, seed=2, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    loc, log_scale, mask_logits = (torch.randn(T, L, generator=g, dtype=torch.float64)
                                   for _ in range(3))
    index, coo = R.coo_local(dosage)
    n_u, n_t = R.embedding_noise(P, T, L, index, dtype=torch.float64, device="cpu",
                                 generator=torch.Generator().manual_seed(5))
    want = masked_embedding_sum_reference(dosage, loc, log_scale, mask_logits, particles=P,
                                          noise=n_u).z_p
    # the op with the same seed draws the same batch noise as embedding_noise
    op = masked_embedding_sum(dosage, loc, log_scale, mask_logits, particles=P,
                              generator=torch.Generator().manual_seed(5), backend="reference").z_p
    torch.testing.assert_close(op, want)
    outs = {
        "dense_all_t": R.embedding_dense_all_t(dosage.to_dense(), loc, log_scale, mask_logits, P,
                                               noise=n_t),
        "bag_all_t": R.embedding_bag_all_t(R.csr_parts(dosage), loc, log_scale, mask_logits, P,
                                           noise=n_t),
        "bag_batch_u": R.embedding_bag_batch_u(dosage, loc, log_scale, mask_logits, P, noise=n_u),
        "index_add_batch_u": R.embedding_index_add_batch_u(coo, C, index, loc, log_scale,
                                                           mask_logits, P, noise=n_u),
    }
    for name, got in outs.items():
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=name)


def test_make_dosage_one_or_two_per_cell():
    d = R.make_dosage(200, 50, seed=1)
    per_cell = d.crow_indices().diff()
    assert per_cell.min() == 1 and per_cell.max() == 2 and d.shape == (200, 50)
