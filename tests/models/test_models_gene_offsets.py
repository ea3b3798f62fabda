"""The gene-offset variant of SAMS-VAE / CPA-VAE (``gene_offset_prior_scale`` > 0): each
perturbation also shifts every gene's log rate, through the fused last layer; against the
explicit computation, in gradients, in the ELBO's prior term and in predictions."""
import numpy as np
import pytest
import torch

from samsvae import ops
from samsvae.data import load_screen, make_batch, simulate_screen
from samsvae.infer import model_ate
from samsvae.train.prepare import build_model_for_screen


@pytest.fixture(scope="module")
def screen():
    return load_screen(simulate_screen(300, 20, 4, n_combinations=2, seed=3))


def _model(screen, model="sams_vae", guide="mean_field", scale=1.0):
    torch.manual_seed(0)
    m = build_model_for_screen(screen, np.arange(screen.n_cells), model=model, guide=guide,
                               n_latent=3, n_hidden=8, gene_offset_prior_scale=scale)
    with torch.no_grad():
        m.gene_offsets.normal_(0.0, 0.5)
    return m


@pytest.mark.parametrize("model,guide", [("sams_vae", "mean_field"), ("sams_vae", "corr_both"),
                                         ("cpa_vae", "corr_basal")])
def test_offset_likelihood_is_the_logits_plus_the_cells_offsets(screen, model, guide):
    m = _model(screen, model, guide).double()
    batch = make_batch(screen, np.arange(40))
    index = ops.batch_perturbations(batch.dosage.double())[0]
    hidden = torch.randn(2, 40, m.n_hidden, dtype=torch.float64, requires_grad=True)
    dosage = batch.dosage.double()
    log_lib = torch.log(batch.library.double())
    got = m._offset_log_lik(batch.counts.double(), hidden, log_lib, dosage, index)
    offsets = torch.as_tensor(screen.dosage[:40].toarray(), dtype=torch.float64) @ m.gene_offsets
    want = ops.nb_log_prob(batch.counts.double(), m.decoder.out(hidden) + offsets, log_lib,
                           m.likelihood.log_theta, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-8)
    g1 = torch.autograd.grad(got.sum(), [hidden, m.gene_offsets])
    g2 = torch.autograd.grad(want.sum(), [hidden, m.gene_offsets])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-8)


def test_elbo_carries_the_offsets_gaussian_prior(screen):
    m = _model(screen)
    index = torch.tensor([0, 2])
    b = m.gene_offsets[index].detach().double()
    want = (-0.5 * (b * b).sum(-1)).float()  # MAP: the density up to its constant
    torch.testing.assert_close(m._gene_offset_log_prior(index).detach(), want)
    batch = make_batch(screen, np.arange(64))
    loss = m.loss(batch, particles=2, generator=torch.Generator().manual_seed(0))["loss"]
    loss.backward()
    assert m.gene_offsets.grad is not None and m.gene_offsets.grad.abs().sum() > 0
    assert any(p is m.gene_offsets for p in m.perturbation_parameters())


def test_predictions_carry_the_offsets_of_their_own_perturbations(screen):
    m = _model(screen)
    m.eval()
    labels = [str(p) for p in screen.perturbations[:2]]
    with torch.no_grad():
        m.gene_offsets.zero_()
    before = model_ate(m, screen, labels, n_samples=400, seed=0)
    with torch.no_grad():
        m.gene_offsets[0, 5] = 3.0  # perturbation 0 raises gene 5's rate e^3-fold
    after = model_ate(m, screen, labels, n_samples=400, seed=0)
    change = after[0] - before[0]
    assert change[5] > 0.5 and change[5] == change.max()
    np.testing.assert_allclose(after[1], before[1], atol=1e-6)


def test_the_papers_model_has_no_offsets_and_negative_scales_are_refused(screen):
    m = build_model_for_screen(screen, np.arange(screen.n_cells), n_latent=3, n_hidden=8)
    assert m.gene_offsets is None and m._condition_logit_offset(None) == 0.0
    with pytest.raises(ValueError, match="gene_offset_prior_scale"):
        build_model_for_screen(screen, np.arange(screen.n_cells), n_latent=3, n_hidden=8,
                               gene_offset_prior_scale=-1.0)
