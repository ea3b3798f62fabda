"""Options for recovering the masks: the sparsest rotation of the latent axes
(``sparse_rotation_every``), its effect on a model, and how the options reach build_model and
the command line."""
import json

import numpy as np
import pytest
import torch

from samsvae.cli import main
from samsvae.data import load_screen, make_batch, simulate_screen
from samsvae.infer import mask_recovery
from samsvae.models import build_model
from samsvae.models.rotation import sparse_rotation
from samsvae.train.callbacks import SparseRotation, callbacks_for


def _random_rotation(L, gen):
    q, r = torch.linalg.qr(torch.randn(L, L, dtype=torch.float64, generator=gen))
    return q * torch.sign(torch.diagonal(r))


def _sparse_effects(T, L, gen):
    """(T, L): one or two non-zero entries per row, magnitudes 0.5 .. 2.5."""
    x = torch.zeros(T, L, dtype=torch.float64)
    for t in range(T):
        k = torch.randperm(L, generator=gen)[: 1 + (t % 2)]
        sign = torch.where(torch.rand(len(k), generator=gen) < 0.5, -1.0, 1.0).double()
        x[t, k] = sign * (0.5 + 2 * torch.rand(len(k), generator=gen, dtype=torch.float64))
    return x


def test_sparse_rotation_undoes_a_random_rotation():
    gen = torch.Generator().manual_seed(0)
    T, L = 40, 6
    x = _sparse_effects(T, L, gen)
    rotated = x @ _random_rotation(L, gen).T          # dense: every entry non-zero
    assert (rotated.abs() > 0.05).float().mean() > 0.9
    rot = sparse_rotation(rotated)
    torch.testing.assert_close(rot @ rot.T, torch.eye(L, dtype=torch.float64), atol=1e-10,
                               rtol=0)
    back = rotated @ rot
    # the same support as x up to a permutation of the axes
    rec = mask_recovery((back.abs() > 0.1).double(), (x != 0).double())
    assert rec["f1"] == 1.0
    # an already sparse matrix keeps its axes (identity start)
    keep = sparse_rotation(x)
    assert (x @ keep - x).abs().max() < 1e-3
    with pytest.raises(ValueError, match="non-empty"):
        sparse_rotation(torch.zeros(0, 3))


@pytest.fixture(scope="module")
def screen():
    return load_screen(simulate_screen(n_cells=160, n_genes=20, n_perturbations=6,
                                       n_combinations=1, n_latent=4, seed=5))


def _model(screen, guide="mean_field", **kw):
    torch.manual_seed(0)
    return build_model("sams_vae", guide, n_genes=screen.n_genes,
                       n_perturbations=screen.n_perturbations, n_latent=4, n_hidden=8,
                       perturbation_counts=screen.perturbation_counts,
                       basal_covariance="full", **kw).double()


@pytest.mark.parametrize("guide", ["mean_field", "corr_both"])
def test_rotation_keeps_the_perturbation_effects(screen, guide):
    """All masks on: the rotation changes the basis, not the effects the decoder sees."""
    model = _model(screen, guide, sparse_rotation_every=1000)
    gen = torch.Generator().manual_seed(1)
    sparse = _sparse_effects(screen.n_perturbations, 4, gen)
    k = model.global_param_scale
    with torch.no_grad():
        model.emb_loc_raw.copy_(sparse @ _random_rotation(4, gen).T / k)
        model.mask_logits_raw.fill_(30.0 / k)
    index = torch.arange(screen.n_perturbations)
    with torch.no_grad():
        before = model._internal(model._shift_mean(index))
        rot = model.rotate_to_sparse_basis()
        after_effects = model._shift_mean(index)
        after = model._internal(after_effects)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)
    basis = model.latent_basis
    torch.testing.assert_close(basis @ basis.T, torch.eye(4, dtype=basis.dtype), atol=1e-10,
                               rtol=0)
    assert not torch.allclose(rot, torch.eye(4, dtype=rot.dtype), atol=1e-2)
    rec = mask_recovery((after_effects.abs() > 0.1).double(), (sparse != 0).double())
    assert rec["f1"] == 1.0
    # the latent representation is reported in the mask basis: full = basal + shift
    batch = make_batch(screen, np.arange(screen.n_cells))
    basal = model.latent_representation(batch, "basal")
    full = model.latent_representation(batch, "full")
    shift = full - basal
    control = torch.as_tensor(screen.is_control)
    assert shift[control].abs().max() < 1e-9 and shift[~control].abs().max() > 0.1


class _StepLoop:
    """The trainer's side of the callback protocol: ``raw_model`` and the step numbers."""

    def __init__(self, model):
        self.raw_model = model


def _train_steps(model, batch, callbacks, steps, gen, after_step=None):
    loop = _StepLoop(model)
    for step in range(1, steps + 1):
        for cb in callbacks:
            cb.on_step_start(loop, step)
        out = model.loss(batch, particles=2, generator=gen)
        out["loss"].backward()
        if after_step is not None:
            after_step(step, out)


def test_training_steps_trigger_the_rotation(screen):
    """The model does not rotate itself (loss() in any mode leaves the basis alone); the
    trainer callback built from its options rotates before every 2nd step."""
    model = _model(screen, "corr_both", sparse_rotation_every=2, embedding_init_loc_std=0.1)
    batch = make_batch(screen, np.arange(64))
    gen = torch.Generator().manual_seed(0)
    eye = torch.eye(4, dtype=model.latent_basis.dtype)
    with torch.no_grad():
        model.loss(batch, particles=2, generator=gen)
    for _ in range(3):
        model.loss(batch, particles=2, generator=gen)["loss"].backward()
    assert torch.equal(model.latent_basis, eye)
    callbacks = callbacks_for(model)
    assert [type(cb) for cb in callbacks] == [SparseRotation]
    assert callbacks_for(_model(screen)) == []
    seen = []
    _train_steps(model, batch, callbacks, 2, gen,
                 lambda step, out: seen.append((torch.equal(model.latent_basis, eye),
                                                bool(torch.isfinite(out["loss"])))))
    assert seen == [(True, True), (False, True)]    # rotated before step 2
    a = model.iwelbo(batch, particles=6, chunk=4)
    b = model.iwelbo(batch, particles=6, chunk=6)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # the basis travels with the weights; a state dict of an earlier version (which counted
    # the steps in a train_steps buffer) still loads
    clone = build_model(**model.config).double()
    state = dict(model.state_dict(), train_steps=torch.tensor(2))
    clone.load_state_dict(state)
    assert torch.equal(clone.latent_basis, model.latent_basis)
    torch.testing.assert_close(clone.iwelbo(batch, particles=6, chunk=6), b)


def test_rotation_schedule_and_reopening(screen):
    """Rotations every step up to sparse_rotation_until; after each, every mask probability
    is at least sparse_rotation_reopen."""
    model = _model(screen, "mean_field", sparse_rotation_every=1, sparse_rotation_until=2,
                   sparse_rotation_reopen=0.3)
    with torch.no_grad():
        model.mask_logits_raw.fill_(-8.0 / model.global_param_scale)
    batch = make_batch(screen, np.arange(64))
    gen = torch.Generator().manual_seed(0)
    bases = []

    def record(step, out):
        if step <= 2:
            assert float(model.perturbation_masks().min()) >= 0.3 - 1e-6
        bases.append(model.latent_basis.clone())

    callbacks = callbacks_for(model)
    _train_steps(model, batch, callbacks, 4, gen, record)
    torch.testing.assert_close(bases[3], bases[2])    # no rotation after step 2
    # "best" checkpoints only once the masks had one period to settle after the last rotation
    rotation = callbacks[0]
    assert rotation.allows_best(4) and not rotation.allows_best(3)
    assert not callbacks_for(_model(screen, sparse_rotation_every=5))[0].allows_best(10 ** 6)


def test_option_errors_name_the_problem():
    with pytest.raises(ValueError, match="sparse_rotation_every must be a non-negative"):
        build_model("sams_vae", n_genes=5, n_perturbations=2, sparse_rotation_every=-1)
    with pytest.raises(ValueError, match="needs sams_vae"):
        build_model("cpa_vae", n_genes=5, n_perturbations=2, sparse_rotation_every=10)
    with pytest.raises(ValueError, match="cvae has no option 'global_param_scale'"):
        build_model("cvae", n_genes=5, n_perturbations=2, global_param_scale=10.0)
    with pytest.raises(ValueError, match="need sparse_rotation_every > 0"):
        build_model("sams_vae", n_genes=5, n_perturbations=2, sparse_rotation_until=10)
    with pytest.raises(ValueError, match="sparse_rotation_reopen must be in"):
        build_model("sams_vae", n_genes=5, n_perturbations=2, sparse_rotation_every=5,
                    sparse_rotation_reopen=1.0)
    plain = build_model("sams_vae", n_genes=5, n_perturbations=2)
    assert plain.latent_basis is None and "latent_basis" not in plain.state_dict()
    with pytest.raises(RuntimeError, match="sparse_rotation_every"):
        plain.rotate_to_sparse_basis()


def test_cli_passes_model_options(tmp_path, capsys):
    data = tmp_path / "tiny.h5ad"
    simulate_screen(n_cells=200, n_genes=20, n_perturbations=4, n_latent=3,
                    seed=1).write_h5ad(data)
    out = tmp_path / "run"
    common = ["--latent", "3", "--hidden", "16", "--batch-size", "64", "--lr", "3e-3",
              "--no-progress", "--max-steps", "4"]
    options = ["--global-param-scale", "10", "--basal-covariance", "full",
               "--mask-prior-weight", "0.01", "--sparse-rotation-every", "2"]
    assert main(["train", str(data), "--out", str(out), "--guide", "corr_both", *common,
                 *options]) == 0
    config = json.loads((out / "config.json").read_text())["model"]["config"]
    assert config["global_param_scale"] == 10 and config["basal_covariance"] == "full"
    assert config["mask_prior_weight"] == 0.01 and config["sparse_rotation_every"] == 2
    # resuming with other model options is refused
    rc = main(["train", str(data), "--out", str(out), "--guide", "corr_both", "--resume",
               *common])
    assert rc == 2 and "model-options" in capsys.readouterr().err
    # an option the model lacks is a user error, not a traceback
    rc = main(["train", str(data), "--out", str(tmp_path / "cvae"), "--model", "cvae",
               *common, "--global-param-scale", "10"])
    assert rc == 2 and "cvae has no option 'global_param_scale'" in capsys.readouterr().err


def test_api_passes_model_options():
    from samsvae import SAMSVAE
    adata = simulate_screen(n_cells=120, n_genes=15, n_perturbations=3, n_latent=3, seed=4)
    SAMSVAE.setup_anndata(adata)
    model = SAMSVAE(adata, guide="corr_both", n_latent=3, n_hidden=8, global_param_scale=10.0,
                    basal_covariance="full", mask_prior_weight=0.02, sparse_rotation_every=300,
                    sparse_rotation_until=3000, sparse_rotation_reopen=0.5)
    config = model.module.config
    assert config["sparse_rotation_every"] == 300 and config["sparse_rotation_until"] == 3000
    assert config["sparse_rotation_reopen"] == 0.5 and config["mask_prior_weight"] == 0.02
    assert model.module.latent_basis.shape == (3, 3)
