"""Training from a backed file through StreamingLoader gives the in-memory result (shuffling off),
and a streamed run resumed mid-epoch equals the uninterrupted one."""
import numpy as np
import pytest
import torch

from helpers import CrashAt
from samsvae.data import MinibatchLoader, load_screen, make_split, simulate_screen
from samsvae.data.stream_stats import load_backed_screen
from samsvae.data.streaming import StreamingLoader
from samsvae.train import Trainer, TrainConfig
from samsvae.train.prepare import build_model_for_screen, split_indices


def _split(screen):
    return np.asarray(make_split(screen, seed=1)).astype(str)


@pytest.fixture(scope="module")
def screens(tmp_path_factory):
    adata = simulate_screen(700, 35, 5, n_combinations=2, n_latent=4, seed=8)
    path = tmp_path_factory.mktemp("stream_train") / "sim.h5ad"
    adata.write_h5ad(path)
    mem = load_screen(adata)
    backed, split, stats = load_backed_screen(path, _split)
    return mem, backed, split, stats


def _fit(screen, loader, gene_stats, run_dir=None, steps=25, resume=False, model=None,
         crash_at=None, checkpoint_every=10):
    train = split_indices(_split(screen), "train")
    torch.manual_seed(0)
    model = model or build_model_for_screen(screen, train, model="sams_vae", n_latent=4,
                                            n_hidden=16, gene_stats=gene_stats)
    config = TrainConfig(max_steps=steps, batch_size=loader.batch_size, lr=3e-3, seed=2,
                         progress=False, checkpoint_every=checkpoint_every)
    trainer = Trainer(model, loader, None, config, run_dir=run_dir, n_train_cells=train.size,
                      log=None)
    if crash_at is not None:
        trainer.callbacks.append(CrashAt(crash_at))
        with pytest.raises(KeyboardInterrupt):
            trainer.fit(resume=resume)
        return trainer
    trainer.fit(resume=resume)
    return trainer


def test_backed_streaming_equals_in_memory_without_shuffling(screens):
    mem, backed, split, stats = screens
    train = split_indices(split, "train")
    np.testing.assert_array_equal(split, _split(mem))
    ref = _fit(mem, MinibatchLoader(mem, train, 64, shuffle=False), None)
    got = _fit(backed, StreamingLoader(backed, train, 64, shuffle=False, chunk_rows=16,
                                       buffer_chunks=2),
               (stats.gene_log1p_mean, stats.gene_log1p_std))
    # 25 steps of 64 = more than one epoch of 560 cells: the epoch boundary is crossed too
    assert got.history["train"]["loss"] == pytest.approx(ref.history["train"]["loss"],
                                                         rel=1e-6)
    for (name, a), b in zip(got.raw_model.state_dict().items(),
                            ref.raw_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_streamed_resume_mid_epoch_equals_uninterrupted(screens, tmp_path):
    _, backed, split, stats = screens
    train = split_indices(split, "train")
    gene_stats = (stats.gene_log1p_mean, stats.gene_log1p_std)

    def loader():
        return StreamingLoader(backed, train, 48, seed=3, chunk_rows=8, buffer_chunks=3)

    full = _fit(backed, loader(), gene_stats, run_dir=tmp_path / "full", steps=16)
    _fit(backed, loader(), gene_stats, run_dir=tmp_path / "cut", steps=16, crash_at=10,
         checkpoint_every=5)  # interrupted after step 10 (last.pt at 10)
    resumed = _fit(backed, loader(), gene_stats, run_dir=tmp_path / "cut", steps=16, resume=True)
    assert resumed.step == 16 and 10 % resumed.batches_per_epoch != 0  # stopped mid-epoch
    assert resumed.history["train"]["loss"] == full.history["train"]["loss"]
    for (name, a), b in zip(resumed.raw_model.state_dict().items(),
                            full.raw_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
