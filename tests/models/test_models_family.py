"""Every (model, guide) row of the family on a tiny simulated screen: training, gradients,
IWELBO, latents, predictions, rebuild from config."""
import numpy as np
import pytest
import torch

from samsvae.data import gene_log1p_stats, load_screen, make_batch, simulate_screen
from samsvae.models import MODEL_GUIDES, build_model, svae_plus_labels

PAIRS = [(m, g) for m, gs in MODEL_GUIDES.items() for g in gs]
L, H = 4, 16


@pytest.fixture(scope="module")
def screen():
    return load_screen(simulate_screen(n_cells=160, n_genes=30, n_perturbations=5,
                                       n_combinations=2, n_latent=L, seed=3))


@pytest.fixture(scope="module")
def batch(screen):
    return make_batch(screen, np.arange(screen.n_cells))


def make_model(name, guide, screen, seed=0, **kw):
    torch.manual_seed(seed)
    if name == "svae_plus":
        kw.update(svae_plus_labels(screen.dosage))
    mean, std = gene_log1p_stats(screen, np.arange(screen.n_cells))
    return build_model(name, guide, n_genes=screen.n_genes,
                       n_perturbations=screen.n_perturbations, n_latent=L, n_hidden=H,
                       gene_log1p_mean=mean, gene_log1p_std=std,
                       perturbation_counts=screen.perturbation_counts, **kw)


def fixed_loss(model, batch, seed=0):
    return model.loss(batch, particles=4, generator=torch.Generator().manual_seed(seed))


def test_model_guides_table():
    assert set(PAIRS) == {("cvae", "mean_field"), ("svae_plus", "mean_field"),
                          ("cpa_vae", "mean_field"), ("cpa_vae", "corr_basal"),
                          ("sams_vae", "mean_field"), ("sams_vae", "corr_embedding"),
                          ("sams_vae", "corr_basal"), ("sams_vae", "corr_both")}


@pytest.mark.parametrize("name,guide", PAIRS)
def test_loss_finite_and_decreases(name, guide, screen, batch):
    model = make_model(name, guide, screen)
    out = fixed_loss(model, batch)
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    assert out["elbo"].shape == (screen.n_cells,) and not out["elbo"].requires_grad
    assert set(out["terms"]) == {"log_lik", "kl_local", "global"}
    assert all(np.isfinite(v) for v in out["terms"].values())
    # the loss is the negative batch mean of the per-cell ELBO
    before = float(out["loss"].detach())
    assert before == pytest.approx(-float(out["elbo"].mean()), rel=1e-5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(15):
        loss = model.loss(batch, particles=3, generator=gen)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = float(fixed_loss(model, batch)["loss"].detach())
    assert after < before - 1.0, (before, after)


@pytest.mark.parametrize("name,guide", PAIRS)
def test_gradients_reach_every_parameter(name, guide, screen, batch):
    model = make_model(name, guide, screen)
    # One optimiser step first: the correlated-embedding MLP's last layer starts at zero (the
    # guide starts as mean-field), which blocks gradients to its first layer at step 0.
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    fixed_loss(model, batch)["loss"].backward()
    opt.step()
    opt.zero_grad()
    fixed_loss(model, batch, seed=1)["loss"].backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{pname} has an all-zero gradient"


@pytest.mark.parametrize("name,guide", PAIRS)
def test_iwelbo_finite_and_chunk_independent(name, guide, screen, batch):
    model = make_model(name, guide, screen)
    a = model.iwelbo(batch, particles=12, chunk=5, global_seed=7)
    b = model.iwelbo(batch, particles=12, chunk=12, global_seed=7)
    c = model.iwelbo(batch, particles=12, chunk=1, global_seed=7)
    assert a.shape == (screen.n_cells,) and torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-3)
    # the IWELBO is a tighter bound than the ELBO on average (K=12 vs 1 particle)
    elbo = model.loss(batch, particles=12, generator=torch.Generator().manual_seed(0))["elbo"]
    d = model.iwelbo(batch, particles=12, chunk=4, global_seed=8)
    assert a.mean() != d.mean()  # the seed matters
    if name == "cvae":  # no global terms: both bound log p(x) with the same guide
        assert float(a.mean()) > float(elbo.mean())


def test_counter_noise_keyed_by_particle_and_perturbation():
    """IWELBO globals: particle k's draw for perturbation t is the same whatever the other
    perturbations of the batch and however the particles are chunked."""
    from samsvae.models.counter_noise import BLOCK, global_noise
    small = torch.tensor([1, 3, BLOCK + 2])
    big = torch.tensor([0, 1, 2, 3, 4, BLOCK + 2])
    es, us = global_noise(5, 0, 4, small, L, dtype=torch.float32, masked=True)
    eb, ub = global_noise(5, 0, 4, big, L, dtype=torch.float32, masked=True)
    assert torch.equal(es, eb[:, [1, 3, 5]]) and torch.equal(us, ub[:, [1, 3, 5]])
    e2, u2 = global_noise(5, 2, 2, small, L, dtype=torch.float32, masked=True)
    assert torch.equal(e2, es[2:]) and torch.equal(u2, us[2:])
    other, _ = global_noise(6, 0, 4, small, L, dtype=torch.float32, masked=True)
    assert not torch.equal(other, es)
    assert ((us > 0) & (us < 1)).all()
    assert not torch.equal(es[0], es[1])  # particles differ


@pytest.mark.parametrize("name,guide", PAIRS)
def test_latent_and_prediction_shapes(name, guide, screen, batch):
    # effects start at the prior mean 0 by default: give them random starts to see them added
    start = ({"shift_init_std": 0.1} if name == "svae_plus" else
             {} if name == "cvae" else {"embedding_init_loc_std": 0.1})
    model = make_model(name, guide, screen, **start)
    basal = model.latent_representation(batch, "basal")
    full = model.latent_representation(batch, "full")
    assert basal.shape == full.shape == (screen.n_cells, L)
    assert torch.isfinite(basal).all() and torch.isfinite(full).all()
    if name == "cvae":
        torch.testing.assert_close(basal, full)
    else:  # perturbed cells get their perturbation latent added
        pert = torch.as_tensor(~screen.is_control)
        assert (full - basal)[pert].abs().sum() > 0
        torch.testing.assert_close(full[~pert], basal[~pert])
    with pytest.raises(ValueError, match="kind"):
        model.latent_representation(batch, "other")

    rows = screen.dosage[:6]
    p1 = model.predict_normalized_expression(rows, n_samples=7,
                                             generator=torch.Generator().manual_seed(2))
    p2 = model.predict_normalized_expression(rows, n_samples=7,
                                             generator=torch.Generator().manual_seed(2))
    assert p1.shape == (6, screen.n_genes) and torch.isfinite(p1).all() and (p1 >= 0).all()
    torch.testing.assert_close(p1, p2)

    masks = model.perturbation_masks()
    emb = model.perturbation_embeddings()
    assert emb.shape[0] == screen.n_perturbations
    if name in ("sams_vae", "svae_plus"):
        assert masks.shape == (screen.n_perturbations, L)
        ok = ~torch.isnan(masks)
        assert ((masks[ok] >= 0) & (masks[ok] <= 1)).all()
    else:
        assert masks is None


@pytest.mark.parametrize("name,guide", PAIRS)
def test_rebuild_from_config(name, guide, screen, batch):
    import json
    model = make_model(name, guide, screen)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    config = json.loads(json.dumps(model.config))
    clone = build_model(**config)
    clone.load_state_dict(model.state_dict())
    torch.testing.assert_close(model.iwelbo(batch, particles=4, chunk=2),
                               clone.iwelbo(batch, particles=4, chunk=2))
    torch.testing.assert_close(fixed_loss(model, batch)["loss"], fixed_loss(clone, batch)["loss"])


@pytest.mark.parametrize("guide", ["mean_field", "corr_both"])
def test_global_param_scale_changes_only_the_step_size(guide, screen, batch):
    """Stored per-perturbation parameters are divided by global_param_scale: the model
    computes the same function, and a plain SGD step moves the natural parameters k^2 times
    as far (Adam: k times)."""
    a = make_model("sams_vae", guide, screen, seed=4)
    b = make_model("sams_vae", guide, screen, seed=4, global_param_scale=10.0)
    torch.testing.assert_close(a.emb_loc, b.emb_loc)
    torch.testing.assert_close(a.mask_logits, b.mask_logits)
    la, lb = fixed_loss(a, batch)["loss"], fixed_loss(b, batch)["loss"]
    torch.testing.assert_close(la, lb)
    la.backward()
    lb.backward()
    torch.testing.assert_close(b.emb_loc_raw.grad, 10.0 * a.emb_loc_raw.grad)
    torch.testing.assert_close(b.encoder.gene_weight.grad, a.encoder.gene_weight.grad)


@pytest.mark.parametrize("name, guide", PAIRS)
def test_prediction_of_a_condition_ignores_the_other_conditions(name, guide, screen):
    """A condition's predicted expression depends on the seed and on that condition only
    (issue: predict(["A", "A+B"]) and predict(["A+B"]) differed for the double)."""
    from samsvae.infer.ate import label_dosage
    model = make_model(name, guide, screen).eval()
    labels = [l for l in np.unique(screen.labels) if "+" in l][:1]
    part = labels[0].split("+")[0]
    both = label_dosage(screen, [part, labels[0], "control"])
    alone = label_dosage(screen, [labels[0]])

    def predict(rows):
        return model.predict_normalized_expression(rows, n_samples=64, library=[300.0, 900.0],
                                                   generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(predict(both)[1], predict(alone)[0], rtol=0, atol=0)
    other_seed = model.predict_normalized_expression(
        alone, n_samples=64, library=[300.0, 900.0], generator=torch.Generator().manual_seed(8))
    assert not torch.equal(other_seed[0], predict(alone)[0])


def test_prediction_is_normalised_at_the_simulated_depth(screen):
    """log2(1 + 1e4 x / l): at library 1e4 that is log2(1 + x); cells simulated shallower
    lose detections, and the normalised mean of a gene changes accordingly."""
    model = make_model("sams_vae", "mean_field", screen).eval()
    from samsvae.infer.ate import label_dosage
    rows = label_dosage(screen, ["control"])
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    deep = model.predict_normalized_expression(rows, n_samples=400, library=1e4, generator=gen())
    same = model.predict_normalized_expression(rows, n_samples=400, library=[1e4],
                                               generator=gen())
    torch.testing.assert_close(deep, same)
    shallow = model.predict_normalized_expression(rows, n_samples=400, library=50.0,
                                                  generator=gen())
    assert not torch.allclose(deep, shallow, atol=0.05)
    with pytest.raises(ValueError, match="library"):
        model.predict_normalized_expression(rows, n_samples=4, library=[0.0])


@pytest.mark.parametrize("name", ["sams_vae", "cpa_vae"])
def test_mean_effects_ignore_the_guide_width(name, screen):
    """effects="mean" decodes the guide mean of the effects; "sample" draws them, so a wider
    guide changes its predictions and not the mean's."""
    from samsvae.infer.ate import label_dosage
    model = make_model(name, "mean_field", screen, embedding_init_loc_std=0.5).eval()
    rows = label_dosage(screen, [l for l in np.unique(screen.labels) if "+" in l][:1])

    def predict(effects):
        return model.predict_normalized_expression(rows, n_samples=64, library=800.0,
                                                   effects=effects,
                                                   generator=torch.Generator().manual_seed(4))
    before = {e: predict(e) for e in ("mean", "sample")}
    with torch.no_grad():
        model.emb_log_scale_raw.add_(2.0 / model.global_param_scale)  # guide sd x e^2
    torch.testing.assert_close(predict("mean"), before["mean"], rtol=0, atol=0)
    assert not torch.allclose(predict("sample"), before["sample"])
    with pytest.raises(ValueError, match="effects"):
        predict("median")
