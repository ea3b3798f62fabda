"""mask_recovery: Hungarian matching of latent dimensions, then precision / recall / F1."""
import numpy as np
import pytest
import torch

from samsvae.infer import mask_recovery


def _true(seed=0, T=12, L=5, p=0.3):
    rng = np.random.default_rng(seed)
    m = (rng.random((T, L)) < p).astype(np.uint8)
    m[np.arange(T), rng.integers(0, L, T)] = 1
    return m


def test_permuted_masks_are_recovered_exactly():
    true = _true()
    perm = np.array([3, 0, 4, 1, 2])
    learned = np.where(true[:, perm] == 1, 0.93, 0.04)       # probabilities, dims permuted
    r = mask_recovery(torch.tensor(learned), true)
    assert r["f1"] == r["precision"] == r["recall"] == 1.0
    assert r["fp"] == 0 and r["fn"] == 0 and r["tp"] == int(true.sum())
    # learned dim j holds true dim perm[j]
    assert sorted(r["matching"]) == sorted((j, int(perm[j])) for j in range(5))


def test_noisy_masks_count_errors_on_matched_dims():
    true = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 0, 0]])
    learned = true[:, [2, 0, 1]].astype(float)              # permuted copy...
    learned[4, 0] = 1.0                                       # ...one false positive
    learned[3, 1] = 0.0                                       # ...one miss (true dim 0, row 3)
    r = mask_recovery(learned, true)
    assert (r["tp"], r["fp"], r["fn"]) == (4, 1, 1)
    assert r["precision"] == pytest.approx(0.8) and r["recall"] == pytest.approx(0.8)
    assert r["f1"] == pytest.approx(0.8)


def test_threshold_is_one_half():
    true = np.array([[1], [0]])
    assert mask_recovery(np.array([[0.51], [0.49]]), true)["f1"] == 1.0
    assert mask_recovery(np.array([[0.5], [0.2]]), true)["f1"] == 0.0


def test_different_numbers_of_dimensions():
    true = _true(1, T=10, L=3)
    extra = np.concatenate([true, np.zeros((10, 2))], axis=1)[:, [3, 0, 4, 1, 2]]
    r = mask_recovery(extra, true)                             # unused extra learned dims
    assert r["f1"] == 1.0
    fewer = true[:, :2]                                        # true dim 2 cannot be matched
    r = mask_recovery(fewer, true)
    assert r["precision"] == 1.0 and r["fn"] == int(true[:, 2].sum())
    assert r["recall"] == pytest.approx(true[:, :2].sum() / true.sum())


def test_nan_rows_are_left_out_and_shapes_checked():
    true = _true(2, T=6, L=3)
    learned = true.astype(float)
    learned[2] = np.nan                                        # e.g. SVAE+ combination-only
    learned[2, 0] = np.nan
    r = mask_recovery(learned, true)
    assert r["n_perturbations"] == 5 and r["f1"] == 1.0
    with pytest.raises(ValueError, match="same number of rows"):
        mask_recovery(np.zeros((4, 3)), np.zeros((5, 3)))
    empty = mask_recovery(np.zeros((3, 2)), np.zeros((3, 2)))
    assert empty["f1"] == 0.0 and empty["precision"] == 0.0
