"""Batch covariate (issue 15, 10): every model row conditions its encoder and decoder on the
batch one-hot carried by Batch.batch_index; predictions differ by batch; config round trip."""
import numpy as np
import pytest
import scipy.sparse as sp
import torch

import helpers
from samsvae.data import load_screen, make_batch
from samsvae.models import MODEL_GUIDES, build_model, svae_plus_labels

PAIRS = [(m, g) for m, gs in MODEL_GUIDES.items() for g in gs]


@pytest.fixture(scope="module")
def screen():
    return load_screen(helpers.two_batch_screen(n_cells=120, n_genes=16), batch_key="line")


def _model(screen, m, g, n_batches=2):
    kw = svae_plus_labels(screen.dosage) if m == "svae_plus" else {}
    torch.manual_seed(0)
    return build_model(m, g, n_genes=screen.n_genes, n_perturbations=screen.n_perturbations,
                       n_latent=3, n_hidden=8, perturbation_counts=screen.perturbation_counts,
                       n_batches=n_batches, **kw)


def test_screen_and_batch_carry_the_batch(screen):
    assert screen.batch_categories == ["L1", "L2"] and screen.n_batches == 2
    batch = make_batch(screen, np.arange(6))
    assert batch.batch_index.tolist() == [0, 1, 0, 1, 0, 1]


@pytest.mark.parametrize("m,g", PAIRS)
def test_every_model_uses_the_batch(screen, m, g):
    model = _model(screen, m, g)
    assert model.config["n_batches"] == 2
    batch = make_batch(screen, np.arange(40))
    out = model.loss(batch, particles=2, generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert model.decoder.batch_weight.grad.abs().sum() > 0
    assert model.encoder.batch_weight.grad.abs().sum() > 0
    flipped = make_batch(screen, np.arange(40))
    flipped.batch_index = 1 - flipped.batch_index
    assert not torch.allclose(model.iwelbo(batch, particles=2), model.iwelbo(flipped, particles=2))
    d = sp.csr_matrix((1, screen.n_perturbations), dtype=np.float32)
    pred = [model.predict_normalized_expression(d, n_samples=30, library=500.0, batch=b,
                                                generator=torch.Generator().manual_seed(1))
            for b in (0, 1)]
    assert (pred[0] - pred[1]).abs().max() > 1e-3
    # config round trip: build_model(**config) rebuilds the same network shapes
    again = build_model(**model.config)
    again.load_state_dict(model.state_dict())
    with pytest.raises(ValueError, match="batch"):
        model.predict_normalized_expression(d, n_samples=2, library=500.0)


def test_without_covariate_config_unchanged(screen):
    model = _model(screen, "sams_vae", "mean_field", n_batches=0)
    assert "n_batches" not in model.config and model.decoder.batch_weight is None
    assert not any("batch_weight" in k for k in model.state_dict())
