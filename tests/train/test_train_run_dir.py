"""Run directories: load_run rebuilds model, screen and split, and checks the data against them."""
import numpy as np
import pytest
import torch

from samsvae.cli import main
from samsvae.data import load_screen, simulate_screen
from samsvae.models import MODEL_GUIDES
from samsvae.train import align_screen, load_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("rundir")
    data = root / "tiny.h5ad"
    simulate_screen(n_cells=240, n_genes=25, n_perturbations=4, n_latent=3, seed=5).write_h5ad(data)
    out = root / "run"
    assert main(["train", str(data), "--out", str(out), "--max-steps", "6", "--latent", "3",
                 "--hidden", "16", "--batch-size", "64", "--no-progress"]) == 0
    return data, out


def test_load_run_rebuilds_the_trained_model(run):
    data, out = run
    loaded = load_run(out)
    saved = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, saved[k])
    assert loaded.screen.n_cells == 240 and not loaded.model.training
    assert set(np.unique(loaded.split)) == {"train", "val", "test"}
    assert loaded.indices("test").size == int((loaded.split == "test").sum())
    assert loaded.history["train"]["step"][-1] == 6


def test_split_follows_cell_names_on_other_data(run):
    data, out = run
    import anndata
    adata = anndata.read_h5ad(data)
    reference = load_run(out).split
    subset = adata[::-1][:100].copy()  # other cells order, a subset
    subset.obs_names = list(subset.obs_names[:50]) + [f"new{i}" for i in range(50)]
    loaded = load_run(out, data=subset)
    np.testing.assert_array_equal(loaded.split[:50], reference[::-1][:50])
    assert (loaded.split[50:] == "none").all()
    with pytest.raises(ValueError, match="no cell of the data is in split 'train'"):
        load_run(out, data=subset[50:].copy()).indices("train")


def test_permuted_vocabulary_is_realigned_and_unknown_perturbations_raise(run):
    data, out = run
    screen = load_screen(data)
    vocab = list(screen.perturbations)
    perm = screen.dosage[:, ::-1].tocsr()
    shuffled = type(screen)(**{**screen.__dict__, "dosage": perm, "perturbations": vocab[::-1],
                               "perturbation_counts": screen.perturbation_counts[::-1]})
    aligned = align_screen(shuffled, screen.gene_names, vocab)
    assert aligned.perturbations == vocab
    assert (aligned.dosage != screen.dosage).nnz == 0
    np.testing.assert_array_equal(aligned.labels, screen.labels)
    with pytest.raises(ValueError, match=r"1 perturbation\(s\) the model was not trained on: "
                                         r"P0.*drop_labels"):
        align_screen(screen, screen.gene_names, vocab[1:])


def test_missing_pieces_are_explained(run, tmp_path):
    data, out = run
    with pytest.raises(FileNotFoundError, match="not a samsvae run directory"):
        load_run(tmp_path)
    with pytest.raises(FileNotFoundError, match="data file .* does not exist"):
        load_run(out, data=tmp_path / "gone.h5ad")


@pytest.mark.parametrize("model, guide", [(m, g) for m, gs in MODEL_GUIDES.items() for g in gs])
def test_every_model_guide_pair_trains_and_reloads(run, tmp_path, model, guide):
    data, _ = run
    out = tmp_path / f"{model}-{guide}"
    assert main(["train", str(data), "--out", str(out), "--model", model, "--guide", guide,
                 "--max-steps", "3", "--latent", "3", "--hidden", "16", "--batch-size", "64",
                 "--no-progress"]) == 0
    loaded = load_run(out)
    assert (loaded.model.config["model"], loaded.model.config["guide"]) == (model, guide)
    saved = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(v, saved[k]) for k, v in loaded.model.state_dict().items())
