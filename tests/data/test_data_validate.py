"""Bad inputs to load_screen are rejected with errors naming the problem and the fix."""
import warnings

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from samsvae.data import gene_log1p_stats, load_screen, make_split
from samsvae.data.validate import check_count_values


def _adata(X=None, labels=None, n_cells=40, n_genes=12, seed=0, **obs_cols):
    rng = np.random.default_rng(seed)
    if X is None:
        X = sp.csr_matrix(rng.poisson(2.0, size=(n_cells, n_genes)).astype(np.float32))
    n_cells = X.shape[0]
    if labels is None:
        labels = np.array(["control", "A", "B", "A+B"])[np.arange(n_cells) % 4]
    obs = pd.DataFrame({"perturbation": labels, **obs_cols},
                       index=[f"c{i}" for i in range(n_cells)])
    return anndata.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(X.shape[1])]))


@pytest.fixture(params=[False, True], ids=["memory", "backed"])
def load(request, tmp_path):
    """load_screen on the AnnData itself, or on an .h5ad written from it and read backed."""
    def _load(adata, **kw):
        if not request.param:
            return load_screen(adata, **kw)
        path = tmp_path / f"a{len(list(tmp_path.iterdir()))}.h5ad"
        adata.write_h5ad(path)
        return load_screen(path, backed=True, **kw)
    return _load


def test_negative_counts_rejected(load):
    a = _adata()
    a.X.data[3] = -1.0
    with pytest.raises(ValueError, match="negative values.*raw counts"):
        load(a)


def test_log_normalised_counts_rejected(load):
    a = _adata()
    a.X.data = np.log1p(a.X.data)
    with pytest.raises(ValueError, match="non-integer.*log-normalised.*layer='counts'"):
        load(a)


def test_log_normalised_error_lists_layers_and_counts_layer_works():
    a = _adata()
    a.layers["counts"] = a.X.copy()
    a.X = a.X.copy()
    a.X.data = np.log1p(a.X.data)
    with pytest.raises(ValueError, match="available layers: 'counts'"):
        load_screen(a)
    screen = load_screen(a, layer="counts")
    np.testing.assert_array_equal(screen.counts.toarray(), a.layers["counts"].toarray())


def test_missing_layer_rejected():
    with pytest.raises(ValueError, match="layer 'counts' not found"):
        load_screen(_adata(), layer="counts")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_counts_rejected(load, bad):
    a = _adata()
    a.X.data[5] = bad
    with pytest.raises(ValueError, match="non-finite"):
        load(a)


def test_near_integer_counts_suggest_rounding():
    with pytest.raises(ValueError, match="round them"):
        check_count_values(np.array([1.0, 2.0000002, 3.0]), source="X", fix="")


def test_dense_counts_checked_and_converted_to_csr():
    a = _adata()
    dense = a.X.toarray()
    b = _adata(X=dense)
    screen = load_screen(b)
    assert sp.isspmatrix_csr(screen.counts) and screen.counts.dtype == np.float32
    np.testing.assert_array_equal(screen.counts.toarray(), dense)
    dense = dense.copy()
    dense[0, 0] = 0.5
    with pytest.raises(ValueError, match="non-integer"):
        load_screen(_adata(X=dense))


def test_missing_perturbation_column_lists_columns(load):
    a = _adata(batch=np.zeros(40, dtype=int))
    with pytest.raises(ValueError, match=r"no perturbation column 'guide'.*'perturbation', 'batch'"):
        load(a, perturbation_key="guide")


def test_no_control_label_rejected(load):
    a = _adata(labels=np.array(["A", "B"])[np.arange(40) % 2])
    with pytest.raises(ValueError, match="no control label found.*control_label="):
        load(a)


def test_ambiguous_control_label_rejected(load):
    a = _adata(labels=np.array(["control", "NT", "A"])[np.arange(40) % 3])
    with pytest.raises(ValueError, match="ambiguous control label"):
        load(a)
    screen = load(a, control_label="control", drop_labels=["NT"])
    assert screen.n_cells == 40 - 13 and screen.perturbations == ["A"]


def test_explicit_control_label_must_occur():
    with pytest.raises(ValueError, match="control label 'WT' does not occur"):
        load_screen(_adata(), control_label="WT")


def test_nan_labels_rejected(load):
    labels = np.array(["control", "A", "B", "A+B"], dtype=object)[np.arange(40) % 4]
    labels[7] = np.nan
    a = _adata(labels=pd.Categorical(labels))
    with pytest.raises(ValueError, match="1 missing \\(NaN\\) labels.*'c7'"):
        load(a)


def test_empty_label_component_rejected():
    labels = np.array(["control", "A", "A++B", "B"])[np.arange(40) % 4]
    with pytest.raises(ValueError, match="empty component"):
        load_screen(_adata(labels=labels))


def test_missing_dosage_key_rejected():
    with pytest.raises(ValueError, match="obsm has no dosage matrix 'guides'"):
        load_screen(_adata(), dosage_key="guides")


def test_zero_count_cells_warned_and_dropped(load):
    a = _adata()
    X = a.X.tolil()
    X[[2, 9, 30], :] = 0
    a.X = X.tocsr()
    with pytest.warns(UserWarning, match="dropping 3 cells with zero counts"):
        screen = load(a)
    assert screen.n_cells == 37
    assert not np.isin([2, 9, 30], screen.cell_index).any()
    assert (screen.library > 0).all()
    np.testing.assert_array_equal(screen.cell_names, a.obs_names[screen.cell_index])


def test_dropped_labels_removed(load):
    labels = np.array(["control", "A", "unassigned", "A+B"])[np.arange(40) % 4]
    screen = load(_adata(labels=labels), drop_labels=["unassigned"])
    assert screen.n_cells == 30 and "unassigned" not in set(screen.labels)
    # a misspelt drop label: warned about, and the non-cell label left in is refused
    with pytest.warns(UserWarning, match="do not occur"), pytest.raises(ValueError,
                                                                      match="'unassigned'"):
        load(_adata(labels=labels), drop_labels=["unasigned"])


def test_all_zero_genes_give_finite_stats(load):
    a = _adata()
    X = a.X.tolil()
    X[:, [0, 5]] = 0
    a.X = X.tocsr()
    screen = load(a)
    mean, std = gene_log1p_stats(screen, np.arange(screen.n_cells))
    assert np.isfinite(mean).all() and np.isfinite(std).all()
    assert mean[0] == 0 and std[0] == 1 and std[5] == 1
    assert np.isfinite((np.log1p(screen.rows(np.arange(5)).toarray()) - mean) / std).all()


@pytest.mark.parametrize("values, problem", [
    (["train", "val", "bogus"], "besides"),
    (["train", "val", None], "missing values"),
    (["val", "test", "val"], "no cell to 'train'"),
])
def test_bad_split_column_rejected(values, problem):
    labels = np.array(["control", "A", "B", "A+B"])[np.arange(40) % 4]
    split = np.array(values, dtype=object)[np.arange(40) % 3]
    screen = load_screen(_adata(labels=labels, my_split=split))
    with pytest.raises(ValueError, match=problem):
        make_split(screen, "my_split")


def test_unknown_split_kind_rejected():
    screen = load_screen(_adata())
    with pytest.raises(ValueError, match="unknown split 'rnadom'"):
        make_split(screen, "rnadom")


def test_library_is_row_sum(load):
    a = _adata()
    screen = load(a)
    np.testing.assert_array_equal(screen.library, np.asarray(a.X.sum(1)).ravel())
    assert screen.library.dtype == np.float64


def test_no_warning_on_clean_input(load):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load(_adata())


def test_backed_counts_layer_and_dense_x(tmp_path):
    a = _adata()
    a.layers["counts"] = a.X.copy()
    a.X = a.X.copy()
    a.X.data = np.log1p(a.X.data)
    a.write_h5ad(tmp_path / "layer.h5ad")
    screen = load_screen(tmp_path / "layer.h5ad", backed=True, layer="counts")
    np.testing.assert_array_equal(screen.rows(np.arange(screen.n_cells)).toarray(),
                                  a.layers["counts"].toarray())
    with pytest.raises(ValueError, match="non-integer"):
        load_screen(tmp_path / "layer.h5ad", backed=True)
    dense = _adata(X=a.layers["counts"].toarray())
    dense.write_h5ad(tmp_path / "dense.h5ad")
    with pytest.raises(ValueError, match="stored dense; backed reading needs a CSR"):
        load_screen(tmp_path / "dense.h5ad", backed=True)
    assert load_screen(tmp_path / "dense.h5ad").n_cells == 40  # in memory it is fine
