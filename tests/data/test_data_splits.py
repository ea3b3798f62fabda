"""Splits: every cell in exactly one part, deterministic, held-out combinations only in test."""
import numpy as np
import pytest

from samsvae.data import (load_screen, make_split, ood_candidates, simulate_screen,
                          split_indices, write_split)


@pytest.fixture(scope="module")
def screen():
    return load_screen(simulate_screen(1500, 30, 8, n_combinations=6, seed=2))


def _check_partition(split, n):
    assert split.shape == (n,) and set(np.unique(split)) <= {"train", "val", "test"}
    parts = split_indices(split)
    allidx = np.concatenate(list(parts.values()))
    assert np.array_equal(np.sort(allidx), np.arange(n))  # each cell exactly once
    return parts


def test_random_split_partitions_with_fractions(screen):
    split = make_split(screen, "random", fractions=(0.7, 0.2, 0.1), seed=5)
    parts = _check_partition(split, screen.n_cells)
    for name, frac in zip(("train", "val", "test"), (0.7, 0.2, 0.1)):
        assert abs(parts[name].size / screen.n_cells - frac) < 0.02
    # stratified: every label has training cells
    assert set(screen.labels[parts["train"]]) == set(screen.labels)


def test_random_split_deterministic_and_seeded(screen):
    a = make_split(screen, seed=1)
    assert np.array_equal(a, make_split(screen, seed=1))
    assert not np.array_equal(a, make_split(screen, seed=2))


def test_bad_fractions_rejected(screen):
    with pytest.raises(ValueError, match="fractions must be three"):
        make_split(screen, fractions=(0.5, 0.2, 0.2))


@pytest.mark.parametrize("ood_fraction", [1.0, 0.5, 1e-9])
def test_ood_split_holds_out_combinations_only_in_test(screen, ood_fraction):
    cands = ood_candidates(screen)
    assert len(cands) == 6  # every simulated double is built from simulated singles
    split = make_split(screen, "ood_combinations", ood_fraction=ood_fraction, seed=3)
    parts = _check_partition(split, screen.n_cells)
    is_control = np.asarray(screen.is_control, dtype=bool)
    held = set(screen.labels[parts["test"][~is_control[parts["test"]]]])
    assert len(held) == max(1, round(ood_fraction * len(cands))) and held <= set(cands)
    train_val = np.concatenate([parts["train"], parts["val"]])
    assert not held & set(screen.labels[train_val])  # no leakage of held-out combinations
    # the test split is the held-out combinations plus its own share of the control cells
    test_controls = int(is_control[parts["test"]].sum())
    assert np.isin(screen.labels, list(held)).sum() + test_controls == parts["test"].size
    assert test_controls == round(0.3 * is_control.sum())
    assert is_control[parts["train"]].sum() > 0
    train_labels = set(screen.labels[parts["train"]])
    for combo in held:  # every component seen alone in training
        assert all(part in train_labels for part in combo.split("+"))
    assert parts["val"].size > 0


def test_ood_split_control_reference_is_a_choice(screen):
    is_control = np.asarray(screen.is_control, dtype=bool)
    none = split_indices(make_split(screen, "ood_combinations", control_test_fraction=0.0))
    assert not is_control[none["test"]].any()
    half = split_indices(make_split(screen, "ood_combinations", control_test_fraction=0.5))
    assert is_control[half["test"]].sum() == round(0.5 * is_control.sum())
    with pytest.raises(ValueError, match="control_test_fraction"):
        make_split(screen, "ood_combinations", control_test_fraction=1.0)


def test_ood_split_without_candidates_is_an_error():
    singles_only = load_screen(simulate_screen(300, 20, 4, seed=0))
    with pytest.raises(ValueError, match="no combination can be held out"):
        make_split(singles_only, "ood_combinations")


def test_ood_candidates_need_both_singles():
    from samsvae.data.perturbations import parse_labels
    d = parse_labels(["control", "A", "B", "A+B", "A+C", "C+D"])

    class _S:  # the fields ood_candidates reads
        labels, separator = d.labels, "+"
        n_components = staticmethod(lambda: np.diff(d.dosage.indptr))

    assert ood_candidates(_S) == ["A+B"]


def test_user_split_column_and_write_split(screen):
    split = make_split(screen, seed=4)
    write_split(screen, split, column="my_split")
    assert list(screen.obs["my_split"].cat.categories) == ["train", "val", "test"]
    assert np.array_equal(make_split(screen, "my_split"), split)
    assert np.array_equal(make_split(screen, "column", column="my_split"), split)
    with pytest.raises(ValueError, match="values for"):
        write_split(screen, split[:-1])
