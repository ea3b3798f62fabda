"""The simulator: shapes, ground truth, integer counts, determinism, h5ad round trip."""
import anndata
import numpy as np
import pytest
import scipy.sparse as sp

from samsvae.cli import main as cli_main
from samsvae.data import load_screen, simulate_screen, write_simulated_screen
from samsvae.data.simulate import BLOCK_CELLS

ARGS = dict(n_cells=BLOCK_CELLS + 700, n_genes=60, n_perturbations=12)
OPTS = dict(n_combinations=5, mask_prob=0.2, n_latent=6, seed=11, control_fraction=0.2)


@pytest.fixture(scope="module")
def sim():
    return simulate_screen(**ARGS, **OPTS)


def test_shapes_and_integer_counts(sim):
    assert sim.shape == (ARGS["n_cells"], ARGS["n_genes"])
    assert sp.isspmatrix_csr(sim.X) and sim.X.dtype == np.float32
    assert np.all(sim.X.data == np.rint(sim.X.data)) and sim.X.data.min() > 0
    lib = np.asarray(sim.X.sum(1)).ravel()
    assert 300 < np.median(lib) < 30_000


def test_labels_and_conditions(sim):
    labels = sim.obs["perturbation"].astype(str)
    assert (labels == "control").sum() == round(0.2 * ARGS["n_cells"])
    combos = sorted({lab for lab in labels if "+" in lab})
    assert len(combos) == 5
    singles = set(labels) - {"control"} - set(combos)
    assert singles == {f"P{t}" for t in range(12)}
    for combo in combos:
        a, b = combo.split("+")
        assert a != b and a in singles and b in singles and [a, b] == sorted([a, b])
    np.testing.assert_array_equal(sim.obs["n_perturbations"],
                                  [0 if lab == "control" else lab.count("+") + 1 for lab in labels])


def test_ground_truth_present_and_consistent(sim):
    truth = sim.uns["samsvae_simulation"]
    T, L = 12, 6
    assert truth["masks"].shape == (T, L) and truth["masks"].dtype == np.uint8
    assert truth["embeddings"].shape == (T, L) and truth["embeddings"].dtype == np.float32
    assert set(np.unique(truth["masks"])) <= {0, 1} and truth["masks"].sum(1).min() >= 1
    assert list(truth["perturbations"]) == [f"P{t}" for t in range(T)]
    assert truth["n_latent"] == L and truth["seed"] == 11 and truth["mask_prob"] == 0.2
    assert truth["theta"].shape == (ARGS["n_genes"],) and (truth["theta"] > 0).all()


def test_perturbation_effects_visible(sim):
    """Perturbed cells differ from controls more than controls differ among themselves."""
    x = sim.X.toarray()
    norm = np.log1p(1e4 * x / x.sum(1, keepdims=True))
    labels = sim.obs["perturbation"].astype(str).to_numpy()
    ctrl = norm[labels == "control"]
    noise = np.abs(ctrl[::2].mean(0) - ctrl[1::2].mean(0)).mean()
    effects = [np.abs(norm[labels == f"P{t}"].mean(0) - ctrl.mean(0)).mean() for t in range(12)]
    assert np.median(effects) > 2 * noise


def test_deterministic_under_seed(sim):
    again = simulate_screen(**ARGS, **OPTS)
    assert (again.X != sim.X).nnz == 0
    assert np.array_equal(again.obs["perturbation"], sim.obs["perturbation"])
    other = simulate_screen(**ARGS, **{**OPTS, "seed": 12})
    assert (other.X != sim.X).nnz > 0


@pytest.mark.parametrize("chunk_cells", [300, 100_000])
def test_write_read_round_trip(sim, tmp_path, chunk_cells):
    path = tmp_path / "sim.h5ad"
    summary = write_simulated_screen(path, **ARGS, chunk_cells=chunk_cells, **OPTS)
    assert summary["nnz"] == sim.X.nnz and summary["n_combinations"] == 5
    back = anndata.read_h5ad(path)
    assert sp.isspmatrix_csr(back.X) and back.X.dtype == np.float32
    assert (back.X != sim.X).nnz == 0  # identical to the in-memory simulation, any chunking
    assert np.array_equal(back.obs_names, sim.obs_names)
    assert np.array_equal(back.obs["perturbation"].astype(str), sim.obs["perturbation"].astype(str))
    np.testing.assert_array_equal(back.uns["samsvae_simulation"]["masks"],
                                  sim.uns["samsvae_simulation"]["masks"])
    backed = anndata.read_h5ad(path, backed="r")
    rows = [0, 17, ARGS["n_cells"] - 1]
    np.testing.assert_array_equal(backed.X[rows].toarray(), sim.X[rows].toarray())
    backed.file.close()
    screen = load_screen(path, backed=True)
    np.testing.assert_array_equal(screen.rows(np.array(rows)).toarray(), sim.X[rows].toarray())


def test_screen_ground_truth_follows_vocabulary(sim):
    screen = load_screen(sim)
    truth = sim.uns["samsvae_simulation"]
    assert screen.perturbations == sorted(f"P{t}" for t in range(12))  # P0, P1, P10, P11, P2...
    for j, name in enumerate(screen.perturbations):
        t = int(name[1:])
        np.testing.assert_array_equal(screen.ground_truth["masks"][j], truth["masks"][t])
        np.testing.assert_array_equal(screen.ground_truth["embeddings"][j], truth["embeddings"][t])


def test_bad_arguments_rejected():
    with pytest.raises(ValueError, match="n_combinations must be an integer in \\[0, 3\\]"):
        simulate_screen(50, 10, 3, n_combinations=4)
    with pytest.raises(ValueError, match="mask_prob"):
        simulate_screen(50, 10, 3, mask_prob=0)
    with pytest.raises(TypeError, match="unknown argument"):
        write_simulated_screen("unused.h5ad", 10, 10, 2, n_latents=3)


def test_simulate_command(tmp_path, capsys):
    out = tmp_path / "cli.h5ad"
    rc = cli_main(["simulate", str(out), "--cells", "500", "--genes", "30", "--perturbations", "5",
                   "--combinations", "2", "--latent", "4", "--seed", "3", "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "500 cells x 30 genes" in printed
    back = anndata.read_h5ad(out)
    ref = simulate_screen(500, 30, 5, n_combinations=2, n_latent=4, seed=3)
    assert (back.X != ref.X).nnz == 0
