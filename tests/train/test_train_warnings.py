"""The warnings of training: a validation ELBO still improving at the end, and labels with
fewer than 10 training cells."""
import anndata
import numpy as np
import pandas as pd
import pytest

from samsvae.data import load_screen
from samsvae.train import TrainConfig, fit
from samsvae.train.fit import few_cell_labels, still_improving
from samsvae.train.prepare import build_model_for_screen


def _history(elbo):
    return {"val": {"step": [10 * (i + 1) for i in range(len(elbo))], "elbo": list(elbo)}}


def test_still_improving_says_by_how_much():
    rising = np.linspace(-80, -60, 20)  # the last 2 of 20 validations gain ~1.05 nats
    msg = still_improving(_history(rising))
    assert msg is not None
    assert "last 2 of 20 validations (steps 190-200)" in msg
    assert f"{rising[-1] - rising[-3]:.3f} nats/cell" in msg and "train longer" in msg
    flat = np.r_[np.linspace(-80, -60, 15), np.full(5, -60.0) + [0.01, -0.02, 0.0, 0.05, -0.01]]
    assert still_improving(_history(flat)) is None
    assert still_improving(_history([-50.0])) is None
    assert still_improving({}) is None


def _screen():
    rng = np.random.default_rng(0)
    labels = ["control"] * 30 + ["A"] * 30 + ["B"] * 4 + ["A+B"] * 2
    x = rng.poisson(3.0, size=(len(labels), 6)).astype(np.float32)
    obs = pd.DataFrame({"perturbation": labels}, index=[f"c{i}" for i in range(len(labels))])
    return load_screen(anndata.AnnData(X=x, obs=obs,
                                       var=pd.DataFrame(index=[f"g{i}" for i in range(6)])))


def test_few_cell_labels_are_listed():
    screen = _screen()
    split = np.where(np.arange(screen.n_cells) % 6 == 0, "val", "train")
    few = few_cell_labels(screen, split)
    assert [lab for lab, _ in few] == ["A+B", "B"] and all(n < 10 for _, n in few)


def test_fit_warns_for_few_cell_labels_and_unfinished_training():
    screen = _screen()
    split = np.where(np.arange(screen.n_cells) % 6 == 0, "val", "train")
    model = build_model_for_screen(screen, np.flatnonzero(split == "train"), n_latent=2,
                                   n_hidden=8)
    config = TrainConfig(max_steps=12, batch_size=16, lr=3e-3, val_every=2, progress=False)
    with pytest.warns(UserWarning) as caught:
        fit(model, screen, split, config, log=None)
    text = [str(w.message) for w in caught]
    assert any("fewer than 10 training cells: A+B (" in t and "B (" in t for t in text), text
    assert any("validation ELBO was still improving" in t for t in text), text
