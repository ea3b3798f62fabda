"""The training loop: learning, exact resume, atomic checkpoints, option checks."""
import math
import os
import random

import numpy as np
import pytest
import torch

from helpers import CrashAt
from samsvae.data import load_screen, make_split, simulate_screen
from samsvae.train import Trainer, TrainConfig, load_checkpoint
from samsvae.train import checkpoint as ckpt_mod
from samsvae.train.prepare import build_model_for_screen, make_loaders, split_indices


@pytest.fixture(scope="module")
def screen_split():
    adata = simulate_screen(n_cells=400, n_genes=40, n_perturbations=6, n_combinations=2,
                            n_latent=4, seed=3)
    screen = load_screen(adata)
    return screen, make_split(screen, "random", seed=0)


def _trainer(screen_split, run_dir=None, guide="mean_field", log=None, **cfg):
    screen, split = screen_split
    torch.manual_seed(0)
    model = build_model_for_screen(screen, split_indices(split, "train"), model="sams_vae",
                                   guide=guide, n_latent=4, n_hidden=32)
    options = dict(batch_size=64, lr=3e-3, checkpoint_every=10, progress=False)
    options.update(cfg)
    config = TrainConfig(**options)
    train, val = make_loaders(screen, split, batch_size=config.batch_size, seed=config.seed)
    return Trainer(model, train, val, config, run_dir=run_dir, log=log)


def _max_weight_diff(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa)


def test_loss_decreases_and_validation_improves(screen_split):
    trainer = _trainer(screen_split, max_steps=100)
    hist = trainer.fit()
    loss = np.array(hist["train"]["loss"])
    assert len(loss) == 100 and hist["train"]["step"] == list(range(1, 101))
    assert loss[-20:].mean() < loss[:20].mean() - 5
    val = hist["val"]["elbo"]
    assert len(val) == math.ceil(100 / trainer.batches_per_epoch)  # once per epoch (+ the end)
    assert val[-1] > val[0]
    assert trainer.best_val == max(val)


def test_max_epochs_sets_the_number_of_steps(screen_split):
    trainer = _trainer(screen_split, max_epochs=2)
    assert trainer.total_steps == 2 * trainer.batches_per_epoch
    trainer.fit()
    assert trainer.step == trainer.total_steps and trainer.epoch == 2 and trainer.position == 0


def test_val_every_and_log_lines(screen_split):
    lines = []
    trainer = _trainer(screen_split, max_steps=12, val_every=4, log=lines.append)
    hist = trainer.fit()
    assert hist["val"]["step"] == [4, 8, 12]
    assert sum("val elbo" in line and "cells/s" in line for line in lines) == 3


@pytest.mark.parametrize("stop_at", [13, 15])  # mid-epoch and at an epoch boundary (5 per epoch)
def test_resume_equals_uninterrupted(screen_split, tmp_path, stop_at):
    full = _trainer(screen_split, max_steps=30, guide="corr_both")
    full.fit()
    # run 1, with the same budget (so the same global-term warm-up), is interrupted after
    # step `stop_at` (its last.pt, written every step); run 2 continues from it to 30
    cut = _trainer(screen_split, tmp_path, guide="corr_both", max_steps=30, checkpoint_every=1)
    assert cut.warmup_steps == 9  # the default warm-up spans the interruption
    cut.callbacks.append(CrashAt(stop_at))
    with pytest.raises(KeyboardInterrupt):
        cut.fit()
    resumed = _trainer(screen_split, tmp_path, guide="corr_both", max_steps=30)
    resumed.fit(resume=True)
    assert resumed.step == 30
    assert _max_weight_diff(full.raw_model, resumed.raw_model) == 0.0
    assert resumed.history["train"]["loss"] == full.history["train"]["loss"]
    state_full, state_res = full.optimizer.state_dict(), resumed.optimizer.state_dict()
    for k in state_full["state"]:
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state_full["state"][k][name], state_res["state"][k][name])


def test_resume_without_checkpoint_starts_fresh(screen_split, tmp_path):
    lines = []
    trainer = _trainer(screen_split, tmp_path, max_steps=3, log=lines.append)
    trainer.fit(resume=True)
    assert trainer.step == 3
    assert any("starting from scratch" in line for line in lines)


def test_resume_rejects_changed_training_options(screen_split, tmp_path):
    _trainer(screen_split, tmp_path, max_steps=5).fit()
    with pytest.raises(ValueError, match=r"particles: checkpoint 5 vs now 2"):
        _trainer(screen_split, tmp_path, max_steps=10, particles=2).fit(resume=True)


def test_checkpoint_contents(screen_split, tmp_path):
    trainer = _trainer(screen_split, tmp_path, max_steps=12)
    trainer.fit()
    last = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert (last["step"], last["epoch"], last["position"]) == (12, 2, 2)
    assert set(last["rng"]) == {"torch", "cuda", "numpy", "python", "generators"}
    assert "noise" in last["rng"]["generators"]
    assert last["train_config"]["max_steps"] == 12
    assert len(last["history"]["train"]["loss"]) == 12
    assert best["step"] == trainer.best_step
    for k, v in best["model_state"].items():
        assert torch.equal(v, last["best_model_state"][k])


def test_checkpoint_write_is_atomic(screen_split, tmp_path, monkeypatch):
    trainer = _trainer(screen_split, tmp_path, max_steps=10)
    trainer.fit()
    path = tmp_path / "checkpoints" / "last.pt"
    before = path.read_bytes()

    real_save = torch.save

    def crash_midway(obj, fh, *args, **kwargs):
        real_save(obj, fh, *args, **kwargs)
        fh.truncate(100)  # a torn file ...
        raise OSError("disk full")  # ... and the process dies before the rename

    monkeypatch.setattr(ckpt_mod.torch, "save", crash_midway)
    trainer.step = 11
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint("last")
    assert path.read_bytes() == before
    assert load_checkpoint(path)["step"] == 10
    # no temp file left (last.prev.pt: the checkpoint before, kept as the fallback)
    assert sorted(os.listdir(path.parent)) == sorted(["best.pt", "last.pt", "last.prev.pt"])


def test_rng_state_round_trip():
    gen = torch.Generator().manual_seed(5)
    state = ckpt_mod.capture_rng_state({"g": gen})
    expected = (torch.rand(3), np.random.rand(3), random.random(),
                torch.rand(3, generator=gen))
    torch.manual_seed(99), np.random.seed(99), random.seed(99), gen.manual_seed(99)
    ckpt_mod.restore_rng_state(state, {"g": gen})
    again = (torch.rand(3), np.random.rand(3), random.random(),
             torch.rand(3, generator=gen))
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2] == again[2] and torch.equal(expected[3], again[3])


def test_non_finite_loss_names_the_step_and_the_fix(screen_split):
    trainer = _trainer(screen_split, max_steps=20)
    real_loss = trainer.raw_model.loss

    def loss(batch, **kw):
        out = real_loss(batch, **kw)
        if trainer.step == 6:
            out["loss"] = out["loss"] * float("nan")
        return out

    trainer.raw_model.loss = loss
    with pytest.raises(FloatingPointError, match=r"step 7 .*lower the learning rate"):
        trainer.fit()


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_steps=10, max_epochs=2), "not both"),
    (dict(batch_size=0), "batch_size must be a positive integer"),
    (dict(lr=0.0), "lr must be > 0"),
    (dict(grad_clip=-1.0), "grad_clip must be > 0"),
])
def test_config_rejects_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_grad_clip_runs_and_default_epochs(screen_split):
    from samsvae.train import default_max_epochs
    assert default_max_epochs(20000) == 400 and default_max_epochs(100000) == 80
    trainer = _trainer(screen_split, max_steps=3, grad_clip=1.0)
    trainer.fit()
    assert trainer.step == 3 and all(map(math.isfinite, trainer.history["train"]["loss"]))


def test_best_checkpoint_only_where_the_callbacks_allow_it(screen_split):
    # during SAMS-VAE's rotation phase the SparseRotation callback allows no "best" weights:
    # validations there are recorded but never kept
    screen, split = screen_split
    torch.manual_seed(0)
    model = build_model_for_screen(screen, split_indices(split, "train"), model="sams_vae",
                                   guide="mean_field", n_latent=4, n_hidden=32,
                                   sparse_rotation_every=10, sparse_rotation_until=30)
    config = TrainConfig(batch_size=64, lr=3e-3, max_steps=60, val_every=10, progress=False)
    train, val = make_loaders(screen, split, batch_size=config.batch_size, seed=config.seed)
    trainer = Trainer(model, train, val, config)
    hist = trainer.fit()
    assert hist["val"]["step"] == [10, 20, 30, 40, 50, 60]
    # selectable only after step 30 + one rotation period
    assert trainer.best_step in (50, 60)
    assert trainer.best_val == max(hist["val"]["elbo"][4:])
