"""The SAMSVAE user class: registration, training, inference outputs, save/load."""
import numpy as np
import pandas as pd
import pytest

import samsvae
from samsvae.data import simulate_screen


def _adata(seed=4):
    adata = simulate_screen(n_cells=300, n_genes=30, n_perturbations=5, n_combinations=2,
                            n_latent=4, seed=seed)
    adata.obs["perturbation"] = adata.obs["perturbation"].astype(str)
    adata.obs.loc[adata.obs_names[:6], "perturbation"] = "unassigned"
    return adata


@pytest.fixture(scope="module")
def trained():
    adata = _adata()
    samsvae.SAMSVAE.setup_anndata(adata, drop_labels=["unassigned"])
    model = samsvae.SAMSVAE(adata, n_latent=4, n_hidden=32, guide="corr_both", seed=1)
    model.train(max_steps=30, batch_size=64, lr=3e-3, progress=False, log=None)
    return adata, model


def test_setup_anndata_registers_and_validates():
    adata = _adata()
    samsvae.SAMSVAE.setup_anndata(adata, drop_labels=["unassigned"])
    assert adata.uns["_samsvae"]["perturbation_key"] == "perturbation"
    assert adata.uns["_samsvae"]["drop_labels"] == ["unassigned"]
    with pytest.raises(ValueError, match="no perturbation column 'guide'"):
        samsvae.SAMSVAE.setup_anndata(adata, perturbation_key="guide")
    with pytest.raises(ValueError, match="layer 'counts' not found"):
        samsvae.SAMSVAE.setup_anndata(adata, layer="counts")
    with pytest.raises(ValueError, match="setup_anndata"):
        samsvae.SAMSVAE(_adata())


def test_training_records_history_and_learns(trained):
    _, model = trained
    loss = np.array(model.history["train"]["loss"])
    assert len(loss) == 30 and loss[-5:].mean() < loss[:5].mean()
    assert model.is_trained and "sams_vae" in repr(model)


def test_latent_representation_shapes_and_store(trained):
    adata, model = trained
    z = model.get_latent_representation()
    assert z.shape == (adata.n_obs - 6, 4) and np.isfinite(z).all()
    full = model.get_latent_representation(kind="full", store=True)
    stored = adata.obsm["X_samsvae_full"]
    assert stored.shape == (adata.n_obs, 4)
    assert np.isnan(stored[:6]).all()  # the dropped "unassigned" cells
    np.testing.assert_array_equal(stored[6:], full)
    assert not np.allclose(full, z)


def test_marginal_ll_per_cell_and_mean(trained):
    _, model = trained
    per_cell = model.get_marginal_ll(n_particles=8, return_mean=False, indices=np.arange(20))
    assert per_cell.shape == (20,) and np.all(per_cell < 0)
    assert model.get_marginal_ll(n_particles=8, indices=np.arange(20)) == pytest.approx(
        per_cell.mean())


def test_predict_seen_and_composed_labels(trained):
    adata, model = trained
    pred = model.predict(["P1", "P3+P0", "control"], n_samples=50)
    assert pred.shape == (3, adata.n_vars)
    assert list(pred.obs_names) == ["P1", "P3+P0", "control"]
    assert list(pred.obs["label"]) == ["P1", "P0+P3", "control"]
    assert list(pred.var_names) == list(adata.var_names)
    assert np.isfinite(pred.X).all() and (pred.X >= 0).all()
    np.testing.assert_array_equal(model.predict(["P1"], n_samples=50, seed=3).X,
                                  model.predict(["P1"], n_samples=50, seed=3).X)


def test_predict_unseen_label_names_it(trained):
    _, model = trained
    with pytest.raises(ValueError, match=r"unknown perturbation 'KLF1' in 'P0\+KLF1'.*"
                                         r"model.perturbations"):
        model.predict(["P0+KLF1"])


def test_average_treatment_effects_has_model_and_data(trained):
    adata, model = trained
    ate = model.average_treatment_effects(n_samples=100, split="all")
    assert ate.n_vars == adata.n_vars and "P0" in ate.obs_names
    assert ate.layers["data_ate"].shape == ate.X.shape
    assert np.isfinite(ate.layers["data_ate"]).all() and (ate.obs["n_cells"] > 0).all()
    chosen = model.average_treatment_effects(["P2", "P0+P4"], n_samples=100)
    assert list(chosen.obs_names) == ["P2", "P0+P4"] and chosen.shape == (2, adata.n_vars)


def test_baselines_and_model_scored_by_evaluate_predictions(trained):
    _, model = trained
    ate = model.average_treatment_effects(n_samples=50, split="all")
    add = model.baseline_effects("additive", split="all")
    assert list(add.obs_names) == list(ate.obs_names) and add.shape == ate.shape
    for pred in (ate, add):
        df = samsvae.evaluate_predictions(pred)
        assert len(df) == ate.n_obs and {"ate_pearson", "sign_top20"} <= set(df.columns)
    # on every cell, train_mean of a label seen in training is close to its data ATE
    tm = samsvae.evaluate_predictions(model.baseline_effects("train_mean", split="all"))
    assert tm["ate_pearson"].mean() > 0.5


def test_mask_and_embedding_tables(trained):
    _, model = trained
    masks = model.get_perturbation_masks()
    emb = model.get_perturbation_embeddings()
    for table in (masks, emb):
        assert isinstance(table, pd.DataFrame) and table.shape == (5, 4)
        assert list(table.index) == [f"P{i}" for i in range(5)]
    assert ((masks.values >= 0) & (masks.values <= 1)).all()


def test_save_load_round_trip(trained, tmp_path):
    adata, model = trained
    model.save(tmp_path / "m")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.save(tmp_path / "m")
    model.save(tmp_path / "m", overwrite=True)
    fresh = adata.copy()
    del fresh.uns["_samsvae"]  # load registers it again from the saved options
    loaded = samsvae.SAMSVAE.load(tmp_path / "m", fresh)
    np.testing.assert_array_equal(loaded.get_latent_representation(),
                                  model.get_latent_representation())
    idx = np.arange(15)
    assert loaded.get_marginal_ll(n_particles=6, indices=idx, return_mean=False).tolist() == \
        model.get_marginal_ll(n_particles=6, indices=idx, return_mean=False).tolist()
    np.testing.assert_array_equal(loaded.split, model.split)
    assert loaded.history == model.history


def test_load_with_other_genes_raises(trained, tmp_path):
    adata, model = trained
    model.save(tmp_path / "m")
    swapped = adata[:, list(adata.var_names[::-1])].copy()
    with pytest.raises(ValueError, match=r"checkpoint trained on 30 genes .*first differing "
                                         r"name at position 0.*pass the same gene set"):
        samsvae.SAMSVAE.load(tmp_path / "m", swapped)
    fewer = adata[:, :20].copy()
    with pytest.raises(ValueError, match="trained on 30 genes but the data has 20"):
        samsvae.SAMSVAE.load(tmp_path / "m", fewer)


def test_embed_new_data_with_a_subset_of_perturbations(trained):
    adata, model = trained
    sub = adata[adata.obs["perturbation"].isin(["control", "P3"])].copy()
    z = model.get_latent_representation(sub)
    assert z.shape == (sub.n_obs, 4) and np.isfinite(z).all()


def test_saved_model_is_a_run_directory_for_the_cli(trained, tmp_path):
    from samsvae.cli import main
    adata, model = trained
    model.save(tmp_path / "m")
    adata.write_h5ad(tmp_path / "data.h5ad")  # the registration travels in uns
    assert main(["evaluate", str(tmp_path / "m")]) == 2  # no recorded data file: asks for it
    assert main(["evaluate", str(tmp_path / "m"), "--data", str(tmp_path / "data.h5ad"),
                 "--iwelbo-particles", "4", "--ate-particles", "20"]) == 0
    assert (tmp_path / "m" / "metrics.json").is_file()


def test_train_with_checkpoint_dir_then_resume(tmp_path):
    adata = _adata(seed=6)
    samsvae.SAMSVAE.setup_anndata(adata, drop_labels=["unassigned"])

    # a run extended from 6 to 12 steps keeps the warm-up it started with (2 steps), which a
    # straight 12-step run would not: compare without one (resume under a warm-up: the
    # Trainer and SIGKILL tests)
    def fit(steps, resume):
        model = samsvae.SAMSVAE(adata, n_latent=3, n_hidden=16, seed=2)
        return model.train(max_steps=steps, batch_size=64, progress=False, log=None,
                           checkpoint_dir=tmp_path / "ck", checkpoint_every=4, resume=resume,
                           global_kl_warmup=0.0)

    fit(6, resume=False)
    resumed = fit(12, resume=True)
    straight = samsvae.SAMSVAE(adata, n_latent=3, n_hidden=16, seed=2)
    straight.train(max_steps=12, batch_size=64, progress=False, log=None, global_kl_warmup=0.0)
    assert resumed.history["train"]["loss"] == straight.history["train"]["loss"]
    assert (tmp_path / "ck" / "model.pt").is_file()
