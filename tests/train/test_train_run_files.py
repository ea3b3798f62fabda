"""Run files a user can rely on (issue 15, points 2-4): checkpoints at each validation and by
wall time with the previous one kept as a fallback, a clean error for every damaged file, and
file modes that honour the umask."""
import json
import os
import stat

import pytest
import torch

from samsvae.data import load_screen, make_split, simulate_screen
from samsvae.train import Trainer, TrainConfig
from samsvae.train import checkpoint as ckpt_mod
from samsvae.train.checkpoint import UnreadableRunFile, load_checkpoint
from samsvae.train.prepare import build_model_for_screen, make_loaders, split_indices
from samsvae.train.run_dir import load_model, read_config, read_split, save_run


@pytest.fixture(scope="module")
def screen_split():
    adata = simulate_screen(n_cells=200, n_genes=20, n_perturbations=4, n_latent=3, seed=5)
    screen = load_screen(adata)
    return screen, make_split(screen, "random", seed=0)


def _trainer(screen_split, run_dir, log=None, **cfg):
    screen, split = screen_split
    torch.manual_seed(0)
    model = build_model_for_screen(screen, split_indices(split, "train"), n_latent=3,
                                   n_hidden=16)
    options = dict(batch_size=64, lr=3e-3, checkpoint_every=1000, progress=False)
    options.update(cfg)
    config = TrainConfig(**options)
    train, val = make_loaders(screen, split, batch_size=config.batch_size, seed=config.seed)
    return Trainer(model, train, val, config, run_dir=run_dir, log=log)


def test_last_checkpoint_at_each_validation_and_previous_kept(screen_split, tmp_path):
    trainer = _trainer(screen_split, tmp_path, max_steps=7, val_every=3)
    saved = []
    real = ckpt_mod.rotate_checkpoint

    def spy(obj, path):
        saved.append(obj["step"])
        return real(obj, path)
    import samsvae.train.trainer as trainer_mod
    trainer_mod.rotate_checkpoint, old = spy, trainer_mod.rotate_checkpoint
    try:
        trainer.fit()
    finally:
        trainer_mod.rotate_checkpoint = old
    assert saved == [3, 6, 7]  # each validation (checkpoint_every 1000) and the end
    ckpt = tmp_path / "checkpoints"
    assert load_checkpoint(ckpt / "last.pt")["step"] == 7
    assert load_checkpoint(ckpt / "last.prev.pt")["step"] == 6


def test_checkpoint_by_wall_time(screen_split, tmp_path, monkeypatch):
    trainer = _trainer(screen_split, tmp_path, max_steps=5, val_every=100,
                       checkpoint_minutes=1.0)
    clock = iter(range(0, 10_000, 31))  # 31 s per call: due every second step
    monkeypatch.setattr("samsvae.train.trainer.time.monotonic", lambda: float(next(clock)))
    trainer.fit()
    assert load_checkpoint(tmp_path / "checkpoints" / "last.prev.pt")["step"] in (3, 4)
    with pytest.raises(ValueError, match="checkpoint_minutes must be >= 0"):
        TrainConfig(checkpoint_minutes=-1)


def test_resume_falls_back_to_the_previous_checkpoint(screen_split, tmp_path):
    _trainer(screen_split, tmp_path, max_steps=6, val_every=3).fit()
    last = tmp_path / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])  # torn by a full disk, say
    lines = []
    trainer = _trainer(screen_split, tmp_path, log=lines.append, max_steps=8, val_every=3)
    trainer.fit(resume=True)
    text = "\n".join(lines)
    assert "falling back to the previous checkpoint" in text and "last.prev.pt" in text
    assert "resumed from" in text and "at step 3" in text
    assert trainer.start_step == 3 and trainer.step == 8


def test_fit_summary_says_steps_of_this_process(screen_split, tmp_path):
    from samsvae.train import fit
    screen, split = screen_split

    def run(steps, resume):
        torch.manual_seed(0)
        model = build_model_for_screen(screen, split_indices(split, "train"), n_latent=3,
                                       n_hidden=16)
        lines = []
        config = TrainConfig(max_steps=steps, batch_size=64, val_every=2, progress=False)
        cfg = {"format": "x"}
        fit(model, screen, split, config, run_dir=tmp_path, run_config=cfg, resume=resume,
            log=lines.append)
        return "\n".join(lines)
    run(4, False)
    assert "resumed at step 4: 2 steps ran in this process" in run(6, True)


@pytest.mark.parametrize("name", ["model.pt", "last.pt"])
@pytest.mark.parametrize("damage", ["truncate", "junk", "pickle"])
def test_damaged_weights_give_one_clean_error(screen_split, tmp_path, name, damage):
    trainer = _trainer(screen_split, tmp_path, max_steps=2)
    trainer.fit()
    path = tmp_path / "checkpoints" / "last.pt"
    if name == "model.pt":
        from samsvae.train.run_dir import write_model
        path = write_model(tmp_path, trainer.raw_model)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:500])
    elif damage == "junk":
        path.write_text("not a checkpoint at all\n")
    else:
        torch.save({"f": os.path.join}, path)  # a pickled global: refused by safe loading
    with pytest.raises(UnreadableRunFile) as exc:
        load_checkpoint(path)
    msg = str(exc.value)
    assert str(path) in msg and "delete it and train again" in msg
    assert "weights_only" not in msg and "\n" not in msg
    if name == "model.pt":
        config = {"model": {"name": "sams_vae", "guide": "mean_field", "config": {}}}
        with pytest.raises(UnreadableRunFile, match="model.pt"):
            load_model(tmp_path, config)


def test_bad_config_and_split_are_named(screen_split, tmp_path):
    screen, split = screen_split
    (tmp_path / "config.json").write_text('{"format": "samsvae-run-v1", ')
    with pytest.raises(UnreadableRunFile, match="config.json: not valid JSON"):
        read_config(tmp_path)
    (tmp_path / "split.csv").write_bytes(b"\x00\xff\xfe junk")
    with pytest.raises(UnreadableRunFile, match="split.csv"):
        read_split(tmp_path, screen.cell_names)


def test_run_files_honour_the_umask(screen_split, tmp_path):
    screen, split = screen_split
    old = os.umask(0o022)
    try:
        trainer = _trainer(screen_split, tmp_path, max_steps=2)
        trainer.fit()
        save_run(tmp_path, config={"format": "x"}, screen=screen, split=split,
                 model=trainer.raw_model, history=trainer.history)
    finally:
        os.umask(old)
    files = ["config.json", "split.csv", "model.pt", "history.json", "checkpoints/last.pt",
             "checkpoints/best.pt"]
    for name in files:
        mode = stat.S_IMODE((tmp_path / name).stat().st_mode)
        assert mode == 0o644, (name, oct(mode))
    old = os.umask(0o077)
    try:
        ckpt_mod.atomic_write_text(tmp_path / "private.json", json.dumps({}))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "private.json").stat().st_mode) == 0o600
