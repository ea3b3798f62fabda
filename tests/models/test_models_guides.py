"""Guide building blocks: Gaussian posteriors (diagonal / full covariance) against
torch.distributions in float64, and the options that shape the SAMS-VAE guide."""
import numpy as np
import pytest
import torch
from torch.distributions import MultivariateNormal, Normal

from samsvae.data import load_screen, make_batch, simulate_screen
from samsvae.models import build_model, per_cell_global_term
from samsvae.models.distributions import GaussianPosterior
from samsvae.ops import batch_perturbations
from samsvae.train.prepare import build_model_for_screen


def _tril(shape, L, gen):
    a = torch.randn(*shape, L, L, dtype=torch.float64, generator=gen).tril(-1) * 0.4
    return a + torch.diag_embed(torch.rand(*shape, L, dtype=torch.float64, generator=gen) + 0.3)


def test_full_covariance_posterior_matches_torch():
    gen = torch.Generator().manual_seed(0)
    L = 4
    loc = torch.randn(3, 5, L, dtype=torch.float64, generator=gen)
    tril = _tril((5,), L, gen)                       # shared over the particle dimension
    q = GaussianPosterior(loc, scale_tril=tril)
    eps = torch.randn(3, 5, L, dtype=torch.float64, generator=gen)
    z = q.sample(eps)
    ref = MultivariateNormal(loc, scale_tril=tril.expand(3, 5, L, L))
    torch.testing.assert_close(q.log_prob_of_sample(eps), ref.log_prob(z))
    prior = MultivariateNormal(torch.zeros(L, dtype=torch.float64),
                               torch.eye(L, dtype=torch.float64))
    torch.testing.assert_close(q.kl_normal(), torch.distributions.kl_divergence(ref, prior))
    shift = torch.randn(L, dtype=torch.float64, generator=gen)
    moved = MultivariateNormal(loc - shift, scale_tril=tril.expand(3, 5, L, L))
    torch.testing.assert_close(q.shifted(-shift).kl_normal(),
                               torch.distributions.kl_divergence(moved, prior))


def test_diagonal_posterior_matches_torch():
    gen = torch.Generator().manual_seed(1)
    loc = torch.randn(6, 3, dtype=torch.float64, generator=gen)
    scale = torch.rand(6, 3, dtype=torch.float64, generator=gen) + 0.1
    q = GaussianPosterior(loc, scale=scale)
    eps = torch.randn(2, 6, 3, dtype=torch.float64, generator=gen)
    ref = Normal(loc, scale)
    torch.testing.assert_close(q.log_prob_of_sample(eps), ref.log_prob(q.sample(eps)).sum(-1))
    prior_loc = torch.randn(6, 3, dtype=torch.float64, generator=gen)
    expect = torch.distributions.kl_divergence(ref, Normal(prior_loc, 1.0)).sum(-1)
    torch.testing.assert_close(q.kl_normal(prior_loc), expect)
    with pytest.raises(ValueError, match="exactly one"):
        GaussianPosterior(loc)


@pytest.fixture(scope="module")
def screen():
    return load_screen(simulate_screen(n_cells=120, n_genes=20, n_perturbations=4,
                                       n_combinations=1, n_latent=3, seed=8))


@pytest.mark.parametrize("guide", ["mean_field", "corr_both"])
def test_full_basal_covariance_trains_and_evaluates(guide, screen):
    torch.manual_seed(0)
    model = build_model("sams_vae", guide, n_genes=screen.n_genes,
                        n_perturbations=screen.n_perturbations, n_latent=3, n_hidden=8,
                        perturbation_counts=screen.perturbation_counts, basal_covariance="full")
    batch = make_batch(screen, np.arange(screen.n_cells))
    out = model.loss(batch, particles=3, generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and model.encoder.out.weight.grad.abs().sum() > 0
    a = model.iwelbo(batch, particles=6, chunk=4)
    b = model.iwelbo(batch, particles=6, chunk=6)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match="covariance"):
        build_model("sams_vae", n_genes=5, n_perturbations=2, basal_covariance="banded")


def test_mask_prior_weight_adds_prior_per_cell(screen):
    """With weight w each cell carrying t adds w * log p(m_t) to its global share."""
    rows = np.arange(screen.n_cells)
    batch = make_batch(screen, rows)
    kw = dict(n_genes=screen.n_genes, n_perturbations=screen.n_perturbations, n_latent=3,
              n_hidden=8, perturbation_counts=screen.perturbation_counts)
    torch.manual_seed(0)
    plain = build_model("sams_vae", **kw).double()
    torch.manual_seed(0)
    weighted = build_model("sams_vae", mask_prior_weight=0.5, **kw).double()
    _, index, ratio, mask = plain._sample_globals(batch.dosage, 2,
                                                  torch.Generator().manual_seed(3), with_mask=True)
    prior = plain._mask_log_prior(mask)
    cells_per_pert = torch.as_tensor(screen.perturbation_counts, dtype=torch.float64)[index]
    g0 = plain.loss(batch, particles=2, generator=torch.Generator().manual_seed(3))["terms"]
    g1 = weighted.loss(batch, particles=2, generator=torch.Generator().manual_seed(3))["terms"]
    extra = 0.5 * float((prior.detach() * cells_per_pert).mean(0).sum()) / screen.n_cells
    assert g1["global"] - g0["global"] == pytest.approx(extra, rel=1e-9)
    # the helper itself: zero weight leaves the ELBO share unchanged
    share = per_cell_global_term(batch.dosage, index, ratio.detach(),
                                 torch.as_tensor(screen.perturbation_counts), prior, 0.0)
    torch.testing.assert_close(share.sum(1), ratio.detach().sum(1))
    assert batch_perturbations(batch.dosage)[0].equal(index)
    with pytest.raises(ValueError, match="mask_prior_weight"):
        build_model("cpa_vae", mask_prior_weight=0.1, n_genes=5, n_perturbations=2)


@pytest.mark.parametrize("model,guide", [("sams_vae", "corr_basal"), ("cpa_vae", "corr_basal"),
                                         ("sams_vae", "corr_both")])
def test_corr_basal_forms_direct_and_residual(model, guide, screen):
    """The correlated basal mean is the encoder's output on [x, z_p] ("direct", default) or
    that output minus z_p ("residual", the earlier form)."""
    torch.manual_seed(0)
    direct = build_model_for_screen(screen, np.arange(screen.n_cells), model=model, guide=guide,
                                    n_latent=3, n_hidden=8)
    assert direct.config["corr_basal_form"] == "direct"
    residual = build_model(**dict(direct.config, corr_basal_form="residual"))
    residual.load_state_dict(direct.state_dict())
    batch = make_batch(screen, np.arange(16))
    pre = direct.encoder.gene_part(batch.counts)
    z_p = torch.randn(2, 16, 3)
    q_d, q_r = direct._basal_guide(pre, z_p), residual._basal_guide(pre, z_p)
    torch.testing.assert_close(q_r.loc, q_d.loc - z_p)
    torch.testing.assert_close(q_r.scale, q_d.scale)
    with pytest.raises(ValueError, match="corr_basal_form"):
        build_model(**dict(direct.config, corr_basal_form="skip"))


@pytest.mark.parametrize("model,guide", [("sams_vae", "corr_basal"), ("cpa_vae", "corr_basal"),
                                         ("sams_vae", "corr_both")])
def test_corr_basal_guide_starts_unconditioned_and_learns_to_read_z_p(model, guide, screen):
    """The encoder's z_p weights start at zero: a new model's basal guide is the mean-field one
    whatever z_p is; one optimiser step later it reads z_p."""
    torch.manual_seed(0)
    m = build_model_for_screen(screen, np.arange(screen.n_cells), model=model, guide=guide,
                               n_latent=3, n_hidden=8)
    mf = build_model(**dict(m.config, guide="mean_field"))
    mf.load_state_dict({k: v for k, v in m.state_dict().items()
                        if not k.startswith("encoder.conditioning")}, strict=False)
    batch = make_batch(screen, np.arange(16))
    pre = m.encoder.gene_part(batch.counts)
    z_p = torch.randn(2, 16, 3) * 3.0
    q, q0 = m._basal_guide(pre, z_p), mf._basal_guide(pre, z_p)
    torch.testing.assert_close(q.loc, q0.loc.expand_as(q.loc))
    torch.testing.assert_close(q.scale, q0.scale.expand_as(q.scale))
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    m.loss(batch, particles=2, generator=torch.Generator().manual_seed(0))["loss"].backward()
    opt.step()
    with torch.no_grad():
        moved = m._basal_guide(pre, z_p).loc - m._basal_guide(pre, torch.zeros_like(z_p)).loc
    assert float(moved.abs().max()) > 1e-4


def test_runs_saved_before_the_form_option_load_residual(tmp_path, screen):
    from samsvae.train.run_dir import load_model
    torch.manual_seed(0)
    m = build_model_for_screen(screen, np.arange(screen.n_cells), model="sams_vae",
                               guide="corr_basal", n_latent=3, n_hidden=8)
    old = {k: v for k, v in m.config.items() if k != "corr_basal_form"}
    torch.save({"state_dict": m.state_dict(), "config": old}, tmp_path / "model.pt")
    run_config = {"model": {"name": "sams_vae", "guide": "corr_basal", "config": old}}
    assert load_model(tmp_path, config=run_config).corr_basal_form == "residual"
    torch.save({"state_dict": m.state_dict(), "config": m.config}, tmp_path / "model.pt")
    assert load_model(tmp_path, config=run_config).corr_basal_form == "direct"
