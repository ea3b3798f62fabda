"""evaluate_model and test_iwelbo end to end on a tiny simulated screen."""
import json

import numpy as np
import pytest
import torch

from samsvae.data import MinibatchLoader, load_screen, make_batch, simulate_screen
from samsvae.infer import evaluate_model, test_iwelbo as iwelbo_over_loader
from samsvae.models import build_model


@pytest.fixture(scope="module")
def screen():
    return load_screen(simulate_screen(n_cells=150, n_genes=20, n_perturbations=4,
                                       n_combinations=1, n_latent=3, seed=2))


def _model(name, screen):
    """An untrained model whose perturbations already have (random) effects: effects start at
    the prior mean 0 by default, which would give every ATE exactly 0."""
    torch.manual_seed(0)
    start = {"embedding_init_loc_std": 0.3} if name == "sams_vae" else {}
    model = build_model(name, n_genes=screen.n_genes, n_perturbations=screen.n_perturbations,
                        n_latent=3, n_hidden=8, perturbation_counts=screen.perturbation_counts,
                        **start)
    if name == "cvae":
        with torch.no_grad():
            model.decoder.dosage_weight.normal_(0.0, 0.3)
    return model


def test_test_iwelbo_in_loader_order(screen):
    model = _model("sams_vae", screen)
    rows = np.arange(10, 100)[::-1].copy()
    loader = MinibatchLoader(screen, rows, batch_size=32, shuffle=False)
    values = iwelbo_over_loader(model, loader, particles=6, chunk=4, global_seed=3)
    assert values.shape == (rows.size,) and values.dtype == np.float64
    first = model.iwelbo(make_batch(screen, rows[:32]), particles=6, chunk=6, global_seed=3)
    np.testing.assert_allclose(values[:32], first.numpy(), rtol=1e-5, atol=1e-3)
    assert model.training  # the train/eval mode is restored


@pytest.mark.parametrize("name", ["sams_vae", "cvae"])
def test_evaluate_model_keys(name, screen):
    model = _model(name, screen)
    test = np.arange(0, 150, 2)
    out = evaluate_model(model, screen, test, iwelbo_particles=8, ate_particles=50,
                         batch_size=40)
    assert out["n_cells"] == test.size and np.isfinite(out["test_iwelbo"])
    assert -1 <= out["ate_pearson"] <= 1 and -1 <= out["ate_pearson_top20"] <= 1
    assert out["n_ate_labels"] == 5 and len(out["ate_labels"]) == 5
    assert out["model_ate"].shape == out["data_ate"].shape == (5, screen.n_genes)
    if name == "sams_vae":
        for k in ("mask_f1", "mask_precision", "mask_recall"):
            assert 0.0 <= out[k] <= 1.0
    else:  # the CVAE has no masks: reported as None
        assert out["mask_f1"] is None and out["mask_precision"] is None
    scalars = {k: v for k, v in out.items() if not isinstance(v, (np.ndarray, list))}
    json.dumps(scalars)  # the scalar metrics are plain JSON values


def test_evaluate_model_rejects_empty_indices(screen):
    with pytest.raises(ValueError, match="no cells"):
        evaluate_model(_model("cvae", screen), screen, np.array([], dtype=np.int64))


def test_svae_plus_skips_conditions_it_cannot_represent(screen):
    """SVAE+ built with single-perturbation labels only cannot predict the double: its cells
    and its ATE are left out (and reported) instead of failing the evaluation."""
    model = build_model("svae_plus", n_genes=screen.n_genes,
                        n_perturbations=screen.n_perturbations, n_latent=3, n_hidden=8,
                        perturbation_counts=screen.perturbation_counts)
    out = evaluate_model(model, screen, np.arange(150), iwelbo_particles=4, ate_particles=20)
    doubles = int((np.diff(screen.dosage.indptr) == 2).sum())
    assert doubles > 0 and out["n_cells_unpredictable"] == doubles
    assert out["n_cells"] == 150 - doubles and np.isfinite(out["test_iwelbo"])
    assert len(out["ate_labels_unpredictable"]) == 1 and "+" in out["ate_labels_unpredictable"][0]
    assert out["n_ate_labels"] == 4 and 0.0 <= out["mask_f1"] <= 1.0
