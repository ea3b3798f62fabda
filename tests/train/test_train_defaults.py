"""The training defaults of issue 12: per-perturbation learning rates, early stopping on
validation, initialisation at the prior, and each perturbation's depth shift."""
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from samsvae.data import load_screen, log_depth_shifts, make_split, simulate_screen
from samsvae.models import MODEL_GUIDES, build_model
from samsvae.train import Trainer, TrainConfig
from samsvae.train.prepare import build_model_for_screen, make_loaders, split_indices
from samsvae.train.trainer import parameter_groups


@pytest.fixture(scope="module")
def screen_split():
    screen = load_screen(simulate_screen(n_cells=400, n_genes=40, n_perturbations=6,
                                         n_combinations=2, n_latent=4, seed=3))
    return screen, make_split(screen, "random", seed=0)


def _model(screen_split, name="sams_vae", guide="mean_field"):
    screen, split = screen_split
    torch.manual_seed(0)
    return build_model_for_screen(screen, split_indices(split, "train"), model=name,
                                  guide=guide, n_latent=4, n_hidden=16)


@pytest.mark.parametrize("name, guide", [(m, g) for m, gs in MODEL_GUIDES.items() for g in gs])
def test_per_perturbation_parameters_learn_faster(screen_split, name, guide):
    model = _model(screen_split, name, guide)
    fast = model.perturbation_parameters()
    assert fast, "every model row has per-perturbation parameters"
    groups = parameter_groups(model, TrainConfig(lr=1e-3, perturbation_lr_scale=10.0))
    assert [len(g["params"]) for g in groups] == [len(list(model.parameters())) - len(fast),
                                                 len(fast)]
    assert groups[1]["lr"] == pytest.approx(1e-2)
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in fast}
    one = parameter_groups(model, TrainConfig(perturbation_lr_scale=1.0))
    assert len(one) == 1


@pytest.mark.parametrize("name", ["sams_vae", "cpa_vae", "svae_plus", "cvae"])
def test_perturbations_start_at_the_prior_mean(screen_split, name):
    """No perturbation has an effect before its cells taught it one: the guide means of the
    effects start at 0 (random starts made an untrained model report large effects)."""
    model = _model(screen_split, name)
    if name in ("sams_vae", "cpa_vae"):
        effects = model._shift_mean(torch.arange(model.n_perturbations))
    elif name == "svae_plus":
        effects = model.shift
    else:
        effects = model.decoder.dosage_weight
    assert float(effects.detach().abs().max()) == 0.0


def test_training_stops_when_validation_stalls(screen_split):
    screen, split = screen_split
    model = _model(screen_split)
    config = TrainConfig(max_steps=400, batch_size=64, val_every=2, early_stopping_patience=3,
                         global_kl_warmup=0.0, progress=False)
    train, val = make_loaders(screen, split, batch_size=64)
    trainer = Trainer(model, train, val, config, log=None)
    trainer.validate = lambda: -1.0 - 1e-3 * trainer.step  # never improves after the first
    trainer.fit()
    assert trainer.best_step == 2
    assert trainer.history["stopped_early"] == trainer.step == 8
    assert trainer.history["val"]["step"] == [2, 4, 6, 8]
    free = Trainer(_model(screen_split), train, val,
                   TrainConfig(max_steps=12, batch_size=64, val_every=2,
                               early_stopping_patience=None, progress=False), log=None)
    free.validate = lambda: -1.0 - 1e-3 * free.step
    free.fit()
    assert free.step == 12 and "stopped_early" not in free.history


def test_global_term_warms_up_and_early_stopping_waits_for_it(screen_split):
    """The global term's weight rises linearly over the warm-up; validations inside it are
    neither "best" nor counted by the patience; the loss is the ELBO with the weighted global
    term while "elbo" stays the ELBO itself."""
    screen, split = screen_split
    train, val = make_loaders(screen, split, batch_size=64)
    config = TrainConfig(max_steps=40, batch_size=64, val_every=2, early_stopping_patience=3,
                         global_kl_warmup=0.25, progress=False)
    trainer = Trainer(_model(screen_split), train, val, config, log=None)
    assert trainer.warmup_steps == 10
    assert [trainer.global_weight(s) for s in (1, 5, 10, 11, 40)] == [0.1, 0.5, 1.0, 1.0, 1.0]
    trainer.validate = lambda: -1.0 + 1e-3 * (trainer.step <= 4)  # best inside the warm-up
    trainer.fit()
    assert trainer.best_step == 10  # the first validation after the warm-up
    assert trainer.history["stopped_early"] == 16 == trainer.step
    off = Trainer(_model(screen_split), train, val,
                  TrainConfig(max_steps=40, batch_size=64, global_kl_warmup=0.0, progress=False),
                  log=None)
    assert off.warmup_steps == 0 and off.global_weight(1) == 1.0
    with pytest.raises(ValueError, match="global_kl_warmup"):
        TrainConfig(global_kl_warmup=1.0)

    model = _model(screen_split)
    batch = next(iter(train))
    outs = {}
    for w in (1.0, 0.25):
        gen = torch.Generator().manual_seed(3)
        model.zero_grad()
        out = model.loss(batch, particles=2, generator=gen, global_weight=w)
        out["loss"].backward()
        outs[w] = (out, model.emb_loc_raw.grad.clone(), model.decoder.out.weight.grad.clone())
    (full, g_emb1, g_dec1), (part, g_emb, g_dec) = outs[1.0], outs[0.25]
    torch.testing.assert_close(part["elbo"], full["elbo"])  # the ELBO itself, whatever w
    t = full["terms"]
    want = -(t["log_lik"] - t["kl_local"] + 0.25 * t["global"])
    assert float(part["loss"].detach()) == pytest.approx(want, rel=1e-5, abs=1e-4)
    assert float(full["loss"].detach()) == pytest.approx(-float(full["elbo"].mean()), rel=1e-6)
    assert not torch.allclose(g_emb, g_emb1)  # the embeddings' prior pull is weighted
    torch.testing.assert_close(g_dec, g_dec1)  # the decoder gets no global-term gradient


@pytest.mark.parametrize("name, guide", [("sams_vae", "corr_basal"), ("sams_vae", "corr_both"),
                                         ("cpa_vae", "corr_basal")])
def test_correlated_basal_guide_reads_z_p_only_after_the_warm_up(screen_split, name, guide):
    """During the warm-up (global weight < 1) the correlated basal guide is the mean-field one:
    its loss is that of the same model with zero z_p weights, which get no gradient and stay
    at zero through the warm-up's steps; from the first step after it they learn."""
    screen, split = screen_split
    train, val = make_loaders(screen, split, batch_size=64)
    model = _model(screen_split, name, guide)
    batch = next(iter(train))
    with torch.no_grad():
        model.encoder.conditioning.weight.normal_()
    unread = _model(screen_split, name, guide)
    unread.load_state_dict(model.state_dict())
    with torch.no_grad():
        unread.encoder.conditioning.weight.zero_()

    def loss(m, w):
        m.zero_grad()
        out = m.loss(batch, particles=2, generator=torch.Generator().manual_seed(5),
                     global_weight=w)
        out["loss"].backward()
        return float(out["loss"].detach()), m.encoder.conditioning.weight.grad
    warm, grad = loss(model, 0.5)
    assert warm == pytest.approx(loss(unread, 0.5)[0], rel=1e-6)
    assert float(grad.abs().max()) == 0.0
    full, grad = loss(model, 1.0)
    assert full != pytest.approx(loss(unread, 1.0)[0], rel=1e-6)
    assert float(grad.abs().max()) > 0.0

    trainer = Trainer(_model(screen_split, name, guide), train, val,
                      TrainConfig(max_steps=12, batch_size=64, global_kl_warmup=0.5,
                                  progress=False), log=None)
    weight = trainer.raw_model.encoder.conditioning.weight
    seen = []
    trainer.callbacks.append(type("Watch", (), {
        "on_step_start": lambda self, tr, step: seen.append(float(weight.abs().max())),
        "allows_best": lambda self, step: True})())
    trainer.fit()
    assert trainer.warmup_steps == 6
    # seen[k]: before step k + 1; step 6, the warm-up's last, already has weight 1
    assert seen[:6] == [0.0] * 6 and seen[6] > 0.0


def test_log_depth_shifts_are_fitted_additively():
    rng = np.random.default_rng(0)
    group = rng.integers(0, 4, 4000)             # control, A, B, A+B
    d = np.zeros((group.size, 3))
    d[(group == 1) | (group == 3), 0] = 1
    d[(group == 2) | (group == 3), 1] = 1
    lib = np.exp(5.0 + 0.5 * d[:, 0] - 0.2 * d[:, 1] + rng.normal(0, 0.1, group.size))
    shifts = log_depth_shifts(sp.csr_matrix(d), lib, np.arange(group.size))
    np.testing.assert_allclose(shifts, [0.5, -0.2, 0.0], atol=0.01)  # C: no cell, no shift
    model = build_model("sams_vae", n_genes=5, n_perturbations=3, n_latent=2, n_hidden=4)
    model.set_perturbation_log_depth(shifts)
    scale = model.library_scale(sp.csr_matrix(np.array([[1, 1, 0], [0, 0, 0]], float)))
    np.testing.assert_allclose(scale, [np.exp(shifts[0] + shifts[1]), 1.0])
    state = {k: v for k, v in model.state_dict().items() if k != "perturbation_log_depth"}
    fresh = build_model("sams_vae", n_genes=5, n_perturbations=3, n_latent=2, n_hidden=4)
    fresh.load_state_dict(state)  # a model saved before the depth shifts existed
    assert float(fresh.perturbation_log_depth.abs().sum()) == 0.0
