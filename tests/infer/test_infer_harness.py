"""The evaluation harness: metrics on known vectors, evaluate_predictions on AnnData (label and
gene matching, --min-cells), the split-half ceiling, and the warnings of the infer layer
(untrained masks in the heatmap, predictions for perturbations no training cell carried)."""
import warnings

import anndata
import numpy as np
import pandas as pd
import pytest

import samsvae
from samsvae.data import load_screen
from samsvae.infer import (data_ate, data_ate_anndata, label_metrics, masks_untrained,
                           model_ate, paired_difference, paired_differences, split_half_ate)
from samsvae.infer.plots import plot_mask_heatmap
from samsvae.models import build_model

CELLS = [("control", [10, 10, 0, 5]), ("control", [20, 20, 0, 5]), ("control", [10, 30, 2, 5]),
         ("control", [30, 10, 0, 1]), ("A", [30, 10, 0, 4]), ("A", [60, 20, 20, 0]),
         ("A", [40, 0, 10, 2]), ("A", [50, 5, 10, 2]), ("B", [5, 15, 20, 2]),
         ("B", [10, 10, 20, 0]), ("A+B", [20, 5, 15, 3]), ("A+B", [40, 20, 20, 1])]


def tiny_screen():
    x = np.array([c for _, c in CELLS], dtype=np.float32)
    obs = pd.DataFrame({"perturbation": [l for l, _ in CELLS]},
                       index=[f"c{i}" for i in range(len(CELLS))])
    return load_screen(anndata.AnnData(X=x, obs=obs,
                                       var=pd.DataFrame(index=["g1", "g2", "g3", "g4"])))


def test_metrics_on_known_vectors():
    rng = np.random.default_rng(0)
    true = rng.normal(size=(3, 50))
    perfect = label_metrics(true, true, shift=np.zeros(50))
    for m, want in (("ate_pearson", 1), ("ate_pearson_top20", 1), ("mse_top20", 0),
                    ("sign_top20", 1), ("systema_pearson", 1)):
        np.testing.assert_allclose(perfect[m], want, atol=1e-12)
    neg = label_metrics(-true, true)
    np.testing.assert_allclose(neg["ate_pearson"], -1, atol=1e-12)
    np.testing.assert_allclose(neg["sign_top20"], 0)
    top = np.argsort(-np.abs(true[0]))[:20]
    np.testing.assert_allclose(neg["mse_top20"][0], np.mean((2 * true[0, top]) ** 2))
    assert np.isnan(neg["systema_pearson"]).all()  # no shift given
    perm = rng.permutation(50)
    shuffled = label_metrics(true[:, perm], true)
    want = np.corrcoef(true[0, perm], true[0])[0, 1]
    assert shuffled["ate_pearson"][0] == pytest.approx(want)
    # Systema: a prediction that is only the common shift scores ~0 once it is removed
    shift = rng.normal(size=50)
    only_shift = label_metrics(np.tile(shift + 1e-9 * rng.normal(size=50), (3, 1)),
                               true + shift, shift=shift)
    assert np.all(np.abs(only_shift["systema_pearson"]) < 0.5)
    assert np.all(only_shift["ate_pearson"] > 0.3)
    nan_row = label_metrics(np.full((1, 50), np.nan), true[:1])
    assert all(np.isnan(v[0]) for v in nan_row.values())


def test_paired_difference_by_hand():
    model = np.array([0.5, 0.6, 0.7, np.nan, 0.9])
    base = np.array([0.4, 0.65, 0.5, 0.3, np.nan])
    d = paired_difference(model, base)
    diffs = np.array([0.1, -0.05, 0.2])  # labels 4 and 5 undefined on one side
    assert d["n"] == 3 and d["ahead"] == 2
    assert d["diff"] == pytest.approx(diffs.mean())
    assert d["se"] == pytest.approx(diffs.std(ddof=1) / np.sqrt(3))
    assert d["verdict"] == "within noise"  # 0.083 +- 0.073
    clear = paired_difference(np.full(8, 0.6) + 0.01 * np.arange(8), np.full(8, 0.5))
    assert clear["verdict"] == "ahead" and clear["ahead"] == 8
    assert paired_difference(np.zeros(8), np.full(8, 0.3) - 0.01 * np.arange(8))["verdict"] == "behind"
    one = paired_difference([0.5], [0.2])
    assert one["n"] == 1 and np.isnan(one["se"]) and one["verdict"] == "within noise"
    with pytest.raises(ValueError, match="shapes"):
        paired_difference([0.1, 0.2], [0.1])
    table = pd.DataFrame({"ate_pearson_model": model, "ate_pearson_top20_model": model,
                          "ate_pearson_train_mean": base, "ate_pearson_top20_train_mean": base,
                          "ate_pearson_control": np.nan, "ate_pearson_top20_control": np.nan})
    both = paired_differences(table, ["control", "train_mean", "linear"])
    assert list(both) == ["train_mean"]  # control undefined everywhere, linear not in the table
    assert both["train_mean"]["ate_pearson_top20"]["diff"] == pytest.approx(diffs.mean())


def test_evaluate_predictions_matches_labels_and_genes():
    rng = np.random.default_rng(1)
    true = rng.normal(size=(3, 30))
    genes = [f"g{i}" for i in range(30)]
    truth = anndata.AnnData(X=true, obs=pd.DataFrame({"n_cells": [50, 5, 40]},
                                                     index=["A", "B", "A+B"]),
                            var=pd.DataFrame(index=genes))
    order = rng.permutation(30)
    pred = anndata.AnnData(X=true[[2, 0]][:, order],  # "B+A" spelt the other way round
                           obs=pd.DataFrame(index=["B+A", "A"]),
                           var=pd.DataFrame(index=[genes[i] for i in order]))
    with pytest.warns(UserWarning, match="no prediction for 1 data label"):
        df = samsvae.evaluate_predictions(pred, truth)
    assert list(df.index) == ["A", "A+B"] and df.attrs["unmatched"] == ["B"]
    np.testing.assert_allclose(df["ate_pearson"], 1.0)
    df = samsvae.evaluate_predictions(pred, truth, min_cells=20)
    assert df.attrs["left_out"] == ["B"] and list(df.index) == ["A", "A+B"]


def test_split_half_and_data_anndata():
    screen = tiny_screen()
    rows = np.arange(screen.n_cells)
    labels, full = data_ate(screen, rows)
    a, b = split_half_ate(screen, rows, labels, seed=3)
    # even label and control sizes: the halves' means average to the full means
    np.testing.assert_allclose((a + b) / 2, full, atol=1e-12)
    a2, _ = split_half_ate(screen, rows, labels, seed=3)
    np.testing.assert_array_equal(a, a2)
    train = np.array([l in ("control", "A", "B") for l in screen.labels])
    ad = data_ate_anndata(screen, rows, train_indices=train)
    assert ad.obs["n_cells"].tolist() == [4, 2, 2] and ad.obs["n_cells_train"].tolist() == [4, 0, 2]
    assert "perturbed_shift" in ad.var and "split_half_a" in ad.layers
    df = samsvae.evaluate_predictions(ad, ad)  # the data against itself
    np.testing.assert_allclose(df["ate_pearson"], 1.0)
    assert "split_half" in df and "systema_pearson" in df


def test_mask_heatmap_says_what_it_counts_and_flags_untrained_masks():
    rng = np.random.default_rng(0)
    q = 0.5 + 0.03 * rng.standard_normal((4, 6))
    assert masks_untrained(q)
    title = plot_mask_heatmap(q, ["A", "B", "C", "D"]).axes[0].get_title()
    assert "q(m) > 0.5" in title and "masks untrained" in title
    trained = np.where(rng.random((4, 6)) < 0.3, 0.97, 0.02)
    assert not masks_untrained(trained)
    title = plot_mask_heatmap(trained, ["A", "B", "C", "D"]).axes[0].get_title()
    assert "q(m) > 0.5" in title and "untrained" not in title


def test_model_ate_warns_for_perturbations_no_training_cell_carried():
    screen = tiny_screen()  # perturbations A, B
    model = build_model("sams_vae", n_genes=4, n_perturbations=2, n_latent=2, n_hidden=8,
                        perturbation_counts=np.array([3, 0]))
    with pytest.warns(UserWarning, match=r"no training cell carried B: the predictions for "
                                         r"B, A\+B"):
        model_ate(model, screen, ["A", "B", "A+B"], n_samples=4)
    model.set_perturbation_counts(np.array([3, 2]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model_ate(model, screen, ["A+B"], n_samples=4)


def test_reference_controls_shared_with_the_baselines_are_counted():
    from samsvae.infer import compare_with_baselines
    from samsvae.infer.harness import shared_reference_controls
    screen = tiny_screen()
    labels = np.asarray(screen.labels).astype(str)
    train = np.flatnonzero(np.isin(labels, ["control", "A", "B"]))[[0, 1, 2, 4, 5, 6, 7, 8, 9]]
    doubles = np.flatnonzero(labels == "A+B")
    # the doubles alone: their data ATE falls back on all 4 controls, 3 of them training cells
    assert shared_reference_controls(screen, doubles, train) == 3
    *_, info = compare_with_baselines(screen, doubles, train, ["A+B"])
    assert info["shared_reference_controls"] == 3
    # with a held-out control of their own the reference is independent of the baselines'
    own = np.concatenate([doubles, [3]])
    assert shared_reference_controls(screen, own, train) == 0
    *_, info = compare_with_baselines(screen, own, train, ["A+B"])
    assert info["shared_reference_controls"] == 0
