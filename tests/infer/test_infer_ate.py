"""Average treatment effects: data side by hand, Pearson summary, and a model whose ATE is known
because the data were simulated from it."""
import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from samsvae.data import load_screen
from samsvae.infer import ate_pearson, data_ate, label_dosage, model_ate
from samsvae.models import build_model

LABELS = ["control", "control", "A", "A", "B", "A+B", "control", "B"]
COUNTS = np.array([[5, 0, 1], [2, 2, 0], [0, 7, 3], [1, 9, 0], [4, 0, 8], [0, 3, 3],
                   [3, 1, 0], [6, 0, 6]], dtype=np.float32)


def _screen(labels=LABELS, counts=COUNTS):
    ad = anndata.AnnData(X=sp.csr_matrix(counts),
                         obs=pd.DataFrame({"perturbation": labels},
                                          index=[f"c{i}" for i in range(len(labels))]))
    return load_screen(ad)


def _normalised(rows):
    x = COUNTS[rows].astype(np.float64)
    return np.log2(1.0 + 1e4 * x / x.sum(1, keepdims=True))


def test_data_ate_by_hand():
    screen = _screen()
    labels, ate = data_ate(screen, np.arange(8))
    assert labels == ["A", "A+B", "B"]
    ctrl = _normalised([0, 1, 6]).mean(0)
    expect = np.stack([_normalised([2, 3]).mean(0) - ctrl, _normalised([5]).mean(0) - ctrl,
                       _normalised([4, 7]).mean(0) - ctrl])
    np.testing.assert_allclose(ate, expect, rtol=1e-12, atol=1e-12)


def test_data_ate_controls_within_indices_else_all():
    screen = _screen()
    labels, ate = data_ate(screen, np.array([2, 3, 0]))          # one control evaluated
    assert labels == ["A"]
    np.testing.assert_allclose(ate[0], _normalised([2, 3]).mean(0) - _normalised([0]).mean(0))
    mask = np.zeros(8, dtype=bool)
    mask[[4, 7]] = True                                          # no control evaluated
    labels, ate = data_ate(screen, mask)
    assert labels == ["B"]
    np.testing.assert_allclose(ate[0],
                               _normalised([4, 7]).mean(0) - _normalised([0, 1, 6]).mean(0))
    labels, ate = data_ate(screen, np.array([0, 1]))             # only controls
    assert labels == [] and ate.shape == (0, 3)


def test_label_dosage_rows():
    screen = _screen()
    d = label_dosage(screen, ["A+B", "B", "A"]).toarray()
    a, b = screen.perturbations.index("A"), screen.perturbations.index("B")
    assert d[0, a] == d[0, b] == 1 and d[1, b] == 1 and d[1].sum() == 1 and d[2, a] == 1
    with pytest.raises(ValueError, match="unknown perturbation .C."):
        label_dosage(screen, ["C"])


def test_ate_pearson_known_values():
    rng = np.random.default_rng(0)
    data = rng.normal(size=(3, 50))
    r = ate_pearson(2.0 * data + 1.0, data)
    assert r["ate_pearson"] == pytest.approx(1.0) and r["ate_pearson_top20"] == pytest.approx(1.0)
    assert ate_pearson(-data, data)["ate_pearson"] == pytest.approx(-1.0)
    # agreement on the 20 largest |data ATE| genes only
    model = rng.normal(size=(3, 50))
    for i in range(3):
        top = np.argsort(-np.abs(data[i]))[:20]
        model[i, top] = data[i, top]
    r = ate_pearson(model, data)
    assert r["ate_pearson_top20"] == pytest.approx(1.0) and r["ate_pearson"] < 0.95
    assert len(r["ate_pearson_per_label"]) == 3 and len(r["ate_pearson_top20_per_label"]) == 3
    const = ate_pearson(np.ones((1, 5)), np.arange(5.0)[None], top_k=3)   # undefined -> NaN
    assert np.isnan(const["ate_pearson"]) and "ate_pearson_top3" in const
    with pytest.raises(ValueError, match="same shape"):
        ate_pearson(np.zeros((2, 3)), np.zeros((3, 3)))


def _toy_model(G=40):
    """SAMS-VAE with hand-set globals: P0 shifts latent 0 by +2.5, P1 latent 1 by -2.5."""
    torch.manual_seed(0)
    model = build_model("sams_vae", n_genes=G, n_perturbations=2, n_latent=2, n_hidden=16)
    with torch.no_grad():
        model.emb_loc.copy_(torch.tensor([[2.5, 0.0], [0.0, -2.5]]))
        model.emb_log_scale.fill_(-6.0)
        model.mask_logits.copy_(torch.tensor([[30.0, -30.0], [-30.0, 30.0]]))
        model.decoder.out.weight.mul_(4.0)
        model.likelihood.log_theta.fill_(np.log(20.0))
    return model


def _simulate_from(model, labels, library=5000.0, seed=1):
    """Counts drawn from the model's generative process for cells with the given labels."""
    g = torch.Generator().manual_seed(seed)
    shift = {"control": [0.0, 0.0], "P0": [2.5, 0.0], "P1": [0.0, -2.5], "P0+P1": [2.5, -2.5]}
    z = torch.randn(len(labels), 2, generator=g) + torch.tensor([shift[l] for l in labels])
    with torch.no_grad():
        mu = library * torch.softmax(model.decoder.logits(model.decoder.hidden(z)), -1)
        theta = model.likelihood.log_theta.exp()
        torch.manual_seed(seed)
        x = torch.poisson(torch.distributions.Gamma(theta, theta / mu).sample())
    return x.numpy()


def test_model_ate_matches_data_simulated_from_the_model():
    model = _toy_model()
    labels = ["control"] * 1500 + ["P0"] * 1500 + ["P1"] * 1500 + ["P0+P1"] * 1500
    counts = _simulate_from(model, labels)
    keep = counts.sum(1) > 0
    screen = _screen([l for l, k in zip(labels, keep) if k], counts[keep])
    assert screen.perturbations == ["P0", "P1"]
    names, d_ate = data_ate(screen, np.arange(screen.n_cells))
    m_ate = model_ate(model, screen, names, n_samples=1500, seed=0)
    assert names == ["P0", "P0+P1", "P1"] and m_ate.shape == d_ate.shape == (3, 40)
    r = ate_pearson(m_ate, d_ate)
    assert r["ate_pearson"] > 0.95 and r["ate_pearson_top20"] > 0.9, r
    assert np.abs(d_ate).max() > 1.0                                  # the effects are large
    np.testing.assert_allclose(m_ate, d_ate, atol=0.35)                # same scale, not only r


def test_model_ate_groups_of_labels_agree(monkeypatch):
    """Processing labels in several groups (memory bound) estimates the same ATE."""
    import samsvae.infer.ate as ate_mod
    model = _toy_model()
    labels = ["control"] * 3 + ["P0"] * 3 + ["P1"] * 3 + ["P0+P1"] * 3
    counts = _simulate_from(model, labels, seed=2)
    screen = _screen(labels, counts + 1)
    names = ["P0", "P1", "P0+P1"]
    one = model_ate(model, screen, names, n_samples=3000, seed=4)
    monkeypatch.setattr(ate_mod, "_MODEL_ATE_VALUES", 2 * screen.n_genes)   # 1 label per group
    split = model_ate(model, screen, names, n_samples=3000, seed=4)
    np.testing.assert_allclose(one, split, rtol=0.05, atol=0.15)
    assert not np.array_equal(one, split)
