"""The basal shift: what the basal encoder absorbed of each perturbation's effect, fitted after
training by least squares on the dosage, stored with the model and added to its predictions."""
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from samsvae.data import (additive_gram, additive_shifts, load_screen, make_batch, make_split,
                          simulate_screen)
from samsvae.infer import model_ate
from samsvae.models import build_model
from samsvae.train.basal_shift import fit_basal_shift
from samsvae.train.prepare import build_model_for_screen


@pytest.fixture(scope="module")
def screen():
    return load_screen(simulate_screen(400, 24, 4, seed=5))


def _model(screen, guide="mean_field", model="sams_vae"):
    torch.manual_seed(0)
    return build_model_for_screen(screen, np.arange(screen.n_cells), model=model, guide=guide,
                                  n_latent=3, n_hidden=8)


def test_additive_shifts_solve_the_least_squares_of_the_dosage():
    rng = np.random.default_rng(0)
    d = sp.random(60, 5, density=0.3, random_state=1, format="csr")
    d.data[:] = 1.0
    d = (d @ sp.diags([1.0, 1.0, 1.0, 1.0, 0.0])).tocsr()  # perturbation 4: no cell carries it
    d.eliminate_zeros()
    y = rng.normal(size=(60, 2))
    x = np.hstack([np.ones((60, 1)), d.toarray()])
    xty = x.T @ y
    got = additive_shifts(additive_gram(d, np.arange(60)), xty, ridge=0.0 + 1e-12)
    want = np.linalg.lstsq(x[:, :5], y, rcond=None)[0][1:]
    np.testing.assert_allclose(got[:4], want, atol=1e-8)
    np.testing.assert_array_equal(got[4], 0.0)


@pytest.mark.parametrize("guide", ["mean_field", "corr_both"])
def test_fit_basal_shift_is_the_dosage_regression_of_the_basal_means(screen, guide):
    model = _model(screen, guide)
    rows = np.flatnonzero(np.asarray(make_split(screen, seed=0)) == "train")
    shift = fit_basal_shift(model, screen, rows, chunk_cells=37)  # several chunks
    z = model.latent_representation(make_batch(screen, rows), "basal").double().numpy()
    x = np.hstack([np.ones((rows.size, 1)), screen.dosage[rows].toarray()])
    want = np.linalg.lstsq(x, z, rcond=None)[0][1:]
    np.testing.assert_allclose(shift, want, atol=1e-4)
    np.testing.assert_allclose(model.perturbation_basal_shift.double().numpy(), shift, atol=1e-6)
    assert model.training  # left in the mode it was found in


def test_predictions_add_the_shift_of_their_own_perturbations_only(screen):
    model = _model(screen)
    model.eval()
    labels = [str(p) for p in screen.perturbations[:2]]
    before = model_ate(model, screen, labels, n_samples=300, seed=1)
    shift = np.zeros((screen.n_perturbations, model.n_latent))
    shift[0] = 2.0
    model.set_perturbation_basal_shift(shift)
    after = model_ate(model, screen, labels, n_samples=300, seed=1)
    assert np.abs(after[0] - before[0]).max() > 0.05  # the shifted perturbation moved
    np.testing.assert_allclose(after[1], before[1], atol=1e-5)  # the other one did not
    with pytest.raises(ValueError, match="basal shift must be"):
        model.set_perturbation_basal_shift(np.zeros((1, 2)))


def test_runs_saved_without_the_shift_still_load(screen):
    model = _model(screen)
    state = {k: v for k, v in model.state_dict().items() if k != "perturbation_basal_shift"}
    again = build_model(**model.config)
    again.load_state_dict(state)
    assert torch.count_nonzero(again.perturbation_basal_shift) == 0


def test_models_without_the_shift_are_left_alone(screen):
    cvae = _model(screen, guide="mean_field", model="cvae")
    assert fit_basal_shift(cvae, screen, np.arange(screen.n_cells)) is None
