"""The baselines that need no model (control, train_mean, additive, linear) against hand
computations on a tiny hand-made screen: 3 genes, control + A + B + A+B + C cells."""
import anndata
import numpy as np
import pandas as pd
import pytest

from samsvae.data import load_screen
from samsvae.infer import baseline_anndata, baseline_ate, perturbed_shift
from samsvae.infer.baselines import ridge_fit

# (label, counts over 3 genes, split)
CELLS = [
    ("control", [10, 10, 0], "train"), ("control", [20, 20, 0], "train"),
    ("control", [10, 30, 0], "train"), ("control", [30, 10, 0], "train"),
    ("A", [30, 10, 0], "train"), ("A", [60, 20, 20], "train"), ("A", [40, 0, 10], "test"),
    ("B", [5, 15, 20], "train"), ("B", [10, 10, 20], "train"), ("B", [0, 20, 20], "test"),
    ("A+B", [20, 5, 15], "test"), ("A+B", [40, 20, 20], "test"),
    ("C", [1, 1, 8], "test"), ("C", [2, 2, 6], "test"),
]


def tiny_screen():
    x = np.array([c for _, c, _ in CELLS], dtype=np.float32)
    obs = pd.DataFrame({"perturbation": [l for l, _, _ in CELLS]},
                       index=[f"c{i}" for i in range(len(CELLS))])
    adata = anndata.AnnData(X=x, obs=obs, var=pd.DataFrame(index=["g1", "g2", "g3"]))
    screen = load_screen(adata)
    split = np.array([s for _, _, s in CELLS])
    return screen, split


def hand_y(label, split_part="train"):
    """Mean of log2(1 + 1e4 x / library) over the cells of ``label`` in ``split_part``,
    written out without the package."""
    rows = [np.asarray(c, float) for l, c, s in CELLS if l == label and s == split_part]
    return np.mean([np.log2(1 + 1e4 * r / r.sum()) for r in rows], axis=0)


def hand_shift(label):
    return hand_y(label) - hand_y("control")


@pytest.fixture(scope="module")
def screen_split():
    return tiny_screen()


def test_control_train_mean_additive_by_hand(screen_split):
    screen, split = screen_split
    train = np.flatnonzero(split == "train")
    res = baseline_ate(screen, train, ["A", "B", "A+B", "C"])
    np.testing.assert_array_equal(res.ate["control"], 0.0)
    tm = res.ate["train_mean"]
    np.testing.assert_allclose(tm[0], hand_shift("A"), rtol=1e-12)
    np.testing.assert_allclose(tm[1], hand_shift("B"), rtol=1e-12)
    assert np.isnan(tm[2]).all() and np.isnan(tm[3]).all()
    assert res.reasons["train_mean"][2] == "no training cell carries A+B"
    add = res.ate["additive"]
    np.testing.assert_allclose(add[0], hand_shift("A"), rtol=1e-12)  # a single: its train_mean
    np.testing.assert_allclose(add[2], hand_shift("A") + hand_shift("B"), rtol=1e-12)
    assert np.isnan(add[3]).all() and "never seen alone in training: C" in res.reasons["additive"][3]
    assert list(res.n_cells_train) == [2, 2, 0, 0]


def test_linear_by_hand(screen_split):
    """Two singles A, B in training: the centred features are +-(1/2, -1/2), so with the
    unpenalised intercept wA = -wB = (yA - yB) / (2 (1 + lam)), b = (yA + yB) / 2: the double
    is predicted at the mean of the singles and each single shrunk towards it. Leaving either
    label out predicts it by the other whatever the penalty: a tie, the smallest alpha wins."""
    screen, split = screen_split
    train = np.flatnonzero(split == "train")
    res = baseline_ate(screen, train, ["A", "A+B", "C"], baselines=("linear",))
    ya, yb = hand_shift("A"), hand_shift("B")
    mean = (ya + yb) / 2
    assert res.linear_alpha == 1e-3
    lam = 1e-3 * (0.5 + 0.5 + 0.0) / 3  # alpha * mean diag of the centred Gram over A, B, C
    np.testing.assert_allclose(res.ate["linear"][0], mean + (ya - mean) / (1 + lam), rtol=1e-9)
    np.testing.assert_allclose(res.ate["linear"][1], mean, rtol=1e-9)
    assert np.isnan(res.ate["linear"][2]).all()
    assert res.reasons["linear"][2] == "no training cell carries C"


def test_ridge_leave_one_out_matches_refitting():
    rng = np.random.default_rng(0)
    x = (rng.random((9, 4)) < 0.4).astype(float)
    y = rng.normal(size=(9, 5))
    for alpha in (0.01, 1.0):
        _, _, _, loo = ridge_fit(x, y, alphas=(alpha,))
        errs = []
        for i in range(9):
            keep = np.arange(9) != i
            xm, ym = x[keep].mean(0), y[keep].mean(0)
            xc = x - xm
            # the penalty scale is the full data's (as ridge_fit fixes it before leaving out)
            full = x - x.mean(0)
            lam = alpha * np.mean(np.diag(full.T @ full))
            w = np.linalg.solve(xc[keep].T @ xc[keep] + lam * np.eye(4), xc[keep].T @ (y[keep] - ym))
            errs.append(np.mean((y[i] - (ym + xc[i] @ w)) ** 2))
        assert loo[alpha] == pytest.approx(np.mean(errs), rel=0.05)


def test_perturbed_shift_by_hand(screen_split):
    screen, split = screen_split
    train = np.flatnonzero(split == "train")
    rows = [np.asarray(c, float) for l, c, s in CELLS if l != "control" and s == "train"]
    pert = np.mean([np.log2(1 + 1e4 * r / r.sum()) for r in rows], axis=0)
    np.testing.assert_allclose(perturbed_shift(screen, train), pert - hand_y("control"),
                               rtol=1e-12)


def test_baseline_anndata_shape(screen_split):
    screen, split = screen_split
    ad = baseline_anndata(screen, split == "train", ["A+B", "C"], "additive")
    assert list(ad.obs_names) == ["A+B", "C"] and list(ad.var_names) == ["g1", "g2", "g3"]
    np.testing.assert_allclose(ad.X[0], hand_shift("A") + hand_shift("B"), rtol=1e-6)
    assert ad.obs["undefined_because"].tolist()[0] == ""
    assert "C" in ad.obs["undefined_because"].tolist()[1]
    with pytest.raises(ValueError, match="unknown baseline"):
        baseline_ate(screen, split == "train", ["A"], baselines=("mean",))


def test_weighted_ridge_is_the_fit_on_repeated_rows():
    """Label weights (training cells) fit what repeating each label's row that many times
    fits: a 1-cell label counts once, a 5-cell one five times."""
    rng = np.random.default_rng(1)
    x = (rng.random((7, 3)) < 0.5).astype(float)
    y = rng.normal(size=(7, 4))
    k = np.array([1, 5, 2, 1, 3, 1, 4])
    w, b, _, _ = ridge_fit(x, y, alphas=(0.1,), weights=k)
    wr, br, _, _ = ridge_fit(np.repeat(x, k, axis=0), np.repeat(y, k, axis=0), alphas=(0.1,))
    np.testing.assert_allclose(w, wr, atol=1e-10)
    np.testing.assert_allclose(b, br, atol=1e-10)
    with pytest.raises(ValueError, match="weights must be"):
        ridge_fit(x, y, weights=np.zeros(7))
