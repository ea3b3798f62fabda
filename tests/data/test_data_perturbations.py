"""Perturbation labels and dosage matrices -> CSR dosage, vocabulary, canonical labels."""
import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from samsvae.data import (design_from_dosage, load_screen, parse_labels,
                          perturbation_cell_counts)


def test_norman_style_labels():
    d = parse_labels(["control", "KLF1", "MAP2K6+KLF1", "KLF1+MAP2K6", "TBX3"])
    assert d.control_label == "control"
    assert d.perturbations == ["KLF1", "MAP2K6", "TBX3"]
    assert sp.isspmatrix_csr(d.dosage) and d.dosage.dtype == np.float32
    np.testing.assert_array_equal(d.dosage.toarray(), [[0, 0, 0], [1, 0, 0], [1, 1, 0],
                                                       [1, 1, 0], [0, 0, 1]])
    assert list(d.labels) == ["control", "KLF1", "KLF1+MAP2K6", "KLF1+MAP2K6", "TBX3"]
    assert list(d.is_control) == [True, False, False, False, False]


def test_gears_style_ctrl_components_are_ignored():
    d = parse_labels(["ctrl", "A+ctrl", "ctrl+B", "A+B", "ctrl+ctrl"])
    assert d.control_label == "ctrl" and d.perturbations == ["A", "B"]
    np.testing.assert_array_equal(d.dosage.toarray(), [[0, 0], [1, 0], [0, 1], [1, 1], [0, 0]])
    assert list(d.labels) == ["ctrl", "A", "B", "A+B", "ctrl"]
    assert list(d.is_control) == [True, False, False, False, True]


@pytest.mark.parametrize("control", ["non-targeting", "NT", "ctrl", "control"])
def test_control_detected(control):
    d = parse_labels(["A", control, "B"])
    assert d.control_label == control and d.is_control.tolist() == [False, True, False]


def test_custom_separator_and_whitespace():
    d = parse_labels(["WT", "A | B", "B"], separator="|", control_label="WT")
    assert d.perturbations == ["A", "B"] and list(d.labels) == ["WT", "A|B", "B"]


def test_repeated_component_is_dosage_two():
    d = parse_labels(["control", "A+A+B"])
    np.testing.assert_array_equal(d.dosage.toarray(), [[0, 0], [2, 1]])
    assert d.labels[1] == "A+A+B"


_names = st.sampled_from(["A", "B", "GENE1", "gene_2", "X-3", "Zfp", "MYC-A", "b"])


@settings(max_examples=60, deadline=None)
@given(cells=st.lists(st.lists(_names, min_size=0, max_size=4, unique=True), min_size=1,
                      max_size=30),
       ctrl_inserts=st.lists(st.booleans(), min_size=30, max_size=30),
       seed=st.integers(0, 1000))
def test_random_combinations_round_trip(cells, ctrl_inserts, seed):
    rng = np.random.default_rng(seed)
    labels = []
    for perts, add_ctrl in zip(cells, ctrl_inserts):
        parts = list(rng.permutation(perts)) if perts else ["ctrl"]
        if add_ctrl:  # GEARS style "A+ctrl"
            parts.insert(int(rng.integers(0, len(parts) + 1)), "ctrl")
        labels.append("+".join(parts))
    cells = cells + [[]]  # one plain control cell so the control label is always present
    d = parse_labels(labels + ["ctrl"])
    assert d.perturbations == sorted(set().union(*map(set, cells)))
    dense = d.dosage.toarray()
    for i, perts in enumerate(cells):
        got = {d.perturbations[j] for j in np.flatnonzero(dense[i])}
        assert got == set(perts)
        assert np.all(dense[i][dense[i] != 0] == 1)
        assert d.labels[i] == ("+".join(sorted(perts)) if perts else "ctrl")
        assert d.is_control[i] == (not perts)
    counts = perturbation_cell_counts(d.dosage)
    for j, name in enumerate(d.perturbations):
        assert counts[j] == sum(name in perts for perts in cells)


def test_perturbation_cell_counts_over_rows():
    d = parse_labels(["control", "A", "A+B", "B", "A"])
    np.testing.assert_array_equal(perturbation_cell_counts(d.dosage), [3, 2])
    np.testing.assert_array_equal(perturbation_cell_counts(d.dosage, np.array([0, 2, 3])), [1, 2])


def _adata_with_dosage(dosage, names_in_uns=None):
    rng = np.random.default_rng(0)
    n = dosage.shape[0]
    a = anndata.AnnData(X=sp.csr_matrix(rng.poisson(3.0, (n, 6)).astype(np.float32) + 1),
                        obs=pd.DataFrame(index=[f"c{i}" for i in range(n)]))
    a.obsm["dosage"] = dosage
    if names_in_uns is not None:
        a.uns["dosage_names"] = np.asarray(names_in_uns)
    return a


def test_dosage_from_obsm_with_names_is_reordered_to_sorted_vocabulary():
    dosage = sp.csr_matrix(np.array([[0, 0, 0], [0.5, 0, 0], [0, 2, 1.5], [0, 0, 1]]))
    screen = load_screen(_adata_with_dosage(dosage, ["MYC", "BRD4", "CDK9"]), dosage_key="dosage")
    assert screen.perturbations == ["BRD4", "CDK9", "MYC"]
    np.testing.assert_array_equal(screen.dosage.toarray(),
                                  [[0, 0, 0], [0, 0, 0.5], [2, 1.5, 0], [0, 1, 0]])
    assert list(screen.labels) == ["control", "MYC", "BRD4+CDK9", "CDK9"]
    np.testing.assert_array_equal(screen.perturbation_counts, [1, 2, 1])
    assert screen.is_control.tolist() == [True, False, False, False]


def test_dosage_from_obsm_dataframe_and_default_names():
    values = np.array([[0, 1.0], [1, 0], [0, 0]])
    df = pd.DataFrame(values, columns=["tB", "tA"], index=[f"c{i}" for i in range(3)])
    screen = load_screen(_adata_with_dosage(df), dosage_key="dosage")
    assert screen.perturbations == ["tA", "tB"] and list(screen.labels) == ["tA", "tB", "control"]
    screen = load_screen(_adata_with_dosage(sp.csr_matrix(values)), dosage_key="dosage")
    assert screen.perturbations == ["P0", "P1"] and list(screen.labels) == ["P1", "P0", "control"]


def test_dosage_nan_rejected():
    with pytest.raises(ValueError, match="NaN/inf dosages"):
        design_from_dosage(np.array([[np.nan, 1.0], [0, 1]]))


def test_dosage_names_must_match_columns():
    with pytest.raises(ValueError, match="3 columns but 2 perturbation names"):
        design_from_dosage(np.eye(3), ["a", "b"])
