"""`--batch-key` (issue 15, 10) and `samsvae predict` / sample_counts (issue 15, 11)."""
import json

import numpy as np
import pytest
import scipy.sparse as sp

import helpers
from samsvae.cli import main

TINY = ["--latent", "3", "--hidden", "16", "--batch-size", "64", "--no-progress",
        "--max-steps", "6"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "lines.h5ad"
    helpers.two_batch_screen(n_cells=240, n_genes=20).write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", str(data), "--out", str(out), "--batch-key", "line", *TINY]) == 0
    return out


def test_batch_key_run_and_evaluate(run, capsys):
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["batch_key"] == "line" and config["batches"] == ["L1", "L2"]
    assert config["model"]["config"]["n_batches"] == 2
    capsys.readouterr()
    assert main(["evaluate", str(run), "--iwelbo-particles", "4", "--ate-particles", "20",
                 "--min-cells", "0"]) == 0
    out = capsys.readouterr().out
    assert "ATE within each batch of 'line'" in out and "L1" in out and "L2" in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert "ate_pearson" in metrics and "baselines" in metrics      # existing keys kept
    assert set(metrics["ate_by_batch"]) == {"L1", "L2"}
    assert set(metrics["baselines_by_batch"]["L1"]) >= {"model", "train_mean", "split_half"}
    assert (run / "ate_per_batch.csv").read_text().startswith("batch,label,")


def test_unknown_batch_key_names_the_flag(data, tmp_path, capsys):
    rc = main(["train", str(data), "--out", str(tmp_path / "r"), "--batch-key", "lane", *TINY])
    err = capsys.readouterr().err
    assert rc == 2 and "--batch-key" in err and "'lane'" in err and "Traceback" not in err


def test_predict_counts_for_scanpy(run, tmp_path, capsys):
    import anndata
    out = tmp_path / "pred.h5ad"
    args = ["predict", str(run), "--perturbations", "P0,control", "--cells", "60",
            "--out", str(out), "--seed", "3", "--batch", "L1"]
    assert main(args) == 0
    pred = anndata.read_h5ad(out)
    assert pred.shape == (120, 20) and sp.issparse(pred.X)
    assert np.issubdtype(pred.X.dtype, np.integer)
    assert set(pred.obs["condition"]) == {"P0", "control"} and set(pred.obs["batch"]) == {"L1"}
    assert (pred.obs["library"] > 0).all()
    # per-condition determinism: P0 alone gives the same cells
    assert main(["predict", str(run), "--perturbations", "P0", "--cells", "60", "--out",
                 str(tmp_path / "p0.h5ad"), "--seed", "3", "--batch", "L1"]) == 0
    alone = anndata.read_h5ad(tmp_path / "p0.h5ad")
    p0 = pred[pred.obs["condition"] == "P0"]
    assert (alone.X != p0.X).nnz == 0
    _scanpy_de(pred)
    capsys.readouterr()
    assert main(["predict", str(run), "--perturbations", "P0", "--out", str(tmp_path / "x.h5ad"),
                 "--batch", "L9"]) == 2
    assert "unknown batch L9" in capsys.readouterr().err


def _scanpy_de(adata):
    """normalize_total / log1p / t-test P0 vs control, as scanpy does it (with scanpy when
    installed, else the same computations with numpy/scipy on the AnnData as written)."""
    from scipy import stats
    try:
        import scanpy as sc
    except ImportError:
        sc = None
    if sc is not None:
        sc.pp.normalize_total(adata, target_sum=1e4)
        sc.pp.log1p(adata)
        sc.tl.rank_genes_groups(adata, "condition", groups=["P0"], reference="control",
                                method="t-test")
        assert np.isfinite(np.asarray(adata.uns["rank_genes_groups"]["pvals"].tolist(),
                                      dtype=float)).any()
        return
    x = adata.X.astype(np.float64)
    total = np.asarray(x.sum(axis=1)).ravel()
    norm = sp.diags(1e4 / np.maximum(total, 1)) @ x
    norm.data = np.log1p(norm.data)
    dense = norm.toarray()
    g = adata.obs["condition"].to_numpy()
    t, p = stats.ttest_ind(dense[g == "P0"], dense[g == "control"], equal_var=False)
    assert np.isfinite(p).any() and (p[np.isfinite(p)] <= 1).all()


def test_api_sample_counts_library_number(run, data):
    import anndata
    import samsvae
    adata = anndata.read_h5ad(data)
    model = samsvae.SAMSVAE.load(run, adata)
    out = model.sample_counts(["P1"], n_cells=30, library=2000, seed=1)
    assert out.shape == (60, 20) and set(out.obs["batch"]) == {"L1", "L2"}
    assert np.allclose(out.obs["library"], 2000.0)
    pred = model.predict(["P1"], n_samples=40)
    assert list(pred.obs["batch"]) == ["L1", "L2"]
    assert np.abs(pred.X[0] - pred.X[1]).max() > 1e-3
