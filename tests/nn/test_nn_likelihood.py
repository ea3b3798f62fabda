"""NBLikelihood (the drop-in NB head) and the plain-VAE example that uses it."""
import importlib.util
from pathlib import Path

import pytest
import torch

from samsvae.nn import NBLikelihood
from samsvae.ops import nb_log_prob_reference

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "plain_vae_nb_head.py"


def _batch(cells=6, genes=11, hidden=4, particles=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = torch.poisson(torch.rand(cells, genes, generator=g, dtype=torch.float64) * 4, generator=g)
    hid = torch.randn(particles, cells, hidden, generator=g, dtype=torch.float64)
    lin = torch.nn.Linear(hidden, genes).double()
    log_lib = torch.log(counts.sum(1) + 1.0)
    return counts, hid, lin, log_lib


def test_forward_is_nb_log_prob_with_its_log_theta():
    counts, hid, lin, log_lib = _batch()
    head = NBLikelihood(counts.shape[1], init_log_theta=0.7).double()
    logits = lin(hid)
    got = head(counts.to_sparse_csr(), logits, log_lib)
    assert torch.all(head.log_theta == torch.tensor(0.7).double())   # float32 0.7, widened
    want = nb_log_prob_reference(counts, logits, log_lib, head.log_theta)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-10)


def test_forward_linear_matches_forward_value_and_grads():
    counts, hid, lin, log_lib = _batch()
    head = NBLikelihood(counts.shape[1]).double()
    a = head(counts, lin(hid), log_lib).sum()
    ga = torch.autograd.grad(a, [head.log_theta, lin.weight, lin.bias])
    b = head.forward_linear(counts, hid, lin.weight, lin.bias, log_lib).sum()
    gb = torch.autograd.grad(b, [head.log_theta, lin.weight, lin.bias])
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-10)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)


def test_gene_mismatch_names_the_fix():
    counts, hid, lin, log_lib = _batch()
    head = NBLikelihood(counts.shape[1] + 1)
    with pytest.raises(ValueError, match="n_genes="):
        head(counts, lin(hid), log_lib)
    with pytest.raises(ValueError, match="positive integer"):
        NBLikelihood(0)


def _load_example():
    spec = importlib.util.spec_from_file_location("plain_vae_nb_head", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("fused", [True, False])
def test_example_vae_trains(fused):
    example = _load_example()
    losses = example.train(n_cells=200, n_genes=40, steps=40, batch_size=64, fused=fused,
                           verbose=False)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5   # it learns


def test_example_simulator_is_nb():
    example = _load_example()
    counts, log_theta = example.simulate_counts(3000, 4, seed=1)
    assert counts.shape == (3000, 4) and log_theta.shape == (4,)
    assert (counts >= 0).all() and (counts == counts.round()).all()
