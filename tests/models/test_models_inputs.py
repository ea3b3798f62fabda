"""Bad or awkward inputs: all-zero genes, wrong shapes, missing counts, unknown labels."""
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from samsvae.data import gene_log1p_stats, load_screen, make_batch, simulate_screen
from samsvae.models import MODEL_GUIDES, build_model, svae_plus_labels


@pytest.fixture(scope="module")
def screen():
    return load_screen(simulate_screen(n_cells=100, n_genes=25, n_perturbations=4,
                                       n_combinations=1, n_latent=3, seed=11))


def _build(name, guide, screen, **kw):
    if name == "svae_plus":
        kw.update(svae_plus_labels(screen.dosage))
    return build_model(name, guide, n_genes=screen.n_genes,
                       n_perturbations=screen.n_perturbations, n_latent=3, n_hidden=8,
                       perturbation_counts=screen.perturbation_counts, **kw)


@pytest.mark.parametrize("name,guide", [(m, g) for m, gs in MODEL_GUIDES.items() for g in gs])
def test_genes_all_zero_in_training_give_no_nan(name, guide, screen):
    rows = np.arange(screen.n_cells)
    mean, std = gene_log1p_stats(screen, rows)
    # pretend genes 0 and 1 were all-zero in the training split: mean 0, std 0 (unguarded)
    mean = mean.copy()
    std = std.copy()
    mean[:2], std[:2] = 0.0, 0.0
    model = _build(name, guide, screen, gene_log1p_mean=mean, gene_log1p_std=std)
    batch = make_batch(screen, rows[:40])
    assert batch.counts.to_dense()[:, :2].sum() > 0  # the evaluated cells do express them
    out = model.loss(batch, particles=2, generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert torch.isfinite(model.iwelbo(batch, particles=4, chunk=2)).all()


def test_cells_without_counts_in_a_gene_subset(screen):
    """A batch whose counts are all zero (e.g. a gene subset with no expression) stays finite."""
    model = _build("sams_vae", "mean_field", screen)
    batch = make_batch(screen, np.arange(8))
    empty = torch.sparse_csr_tensor(torch.zeros(9, dtype=torch.int64),
                                    torch.zeros(0, dtype=torch.int64), torch.zeros(0),
                                    size=(8, screen.n_genes), check_invariants=False)
    batch.counts = empty
    batch.library = torch.zeros(8)
    out = model.loss(batch, particles=2)
    assert torch.isfinite(out["loss"])


def test_unknown_pair_lists_valid_ones():
    with pytest.raises(ValueError, match="sams_vae/corr_both"):
        build_model("cpa_vae", "corr_embedding", n_genes=5, n_perturbations=2)
    with pytest.raises(ValueError, match="valid pairs"):
        build_model("scvi", n_genes=5, n_perturbations=2)


def test_bad_sizes_and_options():
    with pytest.raises(ValueError, match="n_latent"):
        build_model("sams_vae", n_genes=5, n_perturbations=2, n_latent=0)
    with pytest.raises(ValueError, match="mask_prior_prob"):
        build_model("sams_vae", n_genes=5, n_perturbations=2, mask_prior_prob=1.5)
    with pytest.raises(ValueError, match="one value per gene"):
        build_model("sams_vae", n_genes=5, n_perturbations=2, gene_log1p_mean=np.zeros(4))
    with pytest.raises(ValueError, match="non-finite"):
        build_model("cvae", n_genes=2, n_perturbations=2, gene_log1p_std=[1.0, np.nan])


def test_batch_shape_mismatch_is_explained(screen):
    model = build_model("sams_vae", n_genes=screen.n_genes + 1,
                        n_perturbations=screen.n_perturbations, n_latent=3, n_hidden=8,
                        perturbation_counts=screen.perturbation_counts)
    batch = make_batch(screen, np.arange(5))
    with pytest.raises(ValueError, match="genes differ"):
        model.loss(batch)
    other = build_model("sams_vae", n_genes=screen.n_genes, n_perturbations=7, n_latent=3)
    with pytest.raises(ValueError, match="perturbation vocabulary"):
        other.iwelbo(batch, particles=2)
    with pytest.raises(ValueError, match="one entry per perturbation"):
        other.set_perturbation_counts([1, 2])


def test_counts_must_be_set_for_spread_globals(screen):
    batch = make_batch(screen, np.arange(10))
    sams = build_model("sams_vae", n_genes=screen.n_genes,
                       n_perturbations=screen.n_perturbations, n_latent=3, n_hidden=8)
    with pytest.raises(RuntimeError, match="set_perturbation_counts"):
        sams.loss(batch)
    sams.set_perturbation_counts(screen.perturbation_counts)
    assert torch.isfinite(sams.loss(batch)["loss"])
    # the IWELBO (predictive form) needs no counts; the CVAE has no global terms at all
    fresh = build_model("sams_vae", n_genes=screen.n_genes,
                        n_perturbations=screen.n_perturbations, n_latent=3, n_hidden=8)
    assert torch.isfinite(fresh.iwelbo(batch, particles=3)).all()
    cvae = build_model("cvae", n_genes=screen.n_genes, n_perturbations=screen.n_perturbations,
                       n_latent=3, n_hidden=8)
    assert torch.isfinite(cvae.loss(batch)["loss"])


def test_svae_plus_labels_and_unknown_combination(screen):
    voc = svae_plus_labels(screen.dosage)
    labels = [tuple(l) for l in voc["labels"]]
    # singletons first, one per perturbation, then the simulated combination
    assert labels[:4] == [(0,), (1,), (2,), (3,)] and len(labels) == 5 and len(labels[4]) == 2
    assert sum(voc["label_counts"]) == int((~screen.is_control).sum())
    assert len(set(np.asarray(screen.labels)[~screen.is_control])) == len(labels)
    # singles-only vocabulary: a combination cell cannot be mapped
    singles = build_model("svae_plus", n_genes=screen.n_genes,
                          n_perturbations=screen.n_perturbations, n_latent=3, n_hidden=8,
                          perturbation_counts=screen.perturbation_counts)
    combo_rows = np.flatnonzero(np.diff(screen.dosage.indptr) == 2)[:3]
    with pytest.raises(ValueError, match="not an SVAE\\+ label"):
        singles.loss(make_batch(screen, combo_rows))
    # a combination vocabulary without label counts asks for them
    no_counts = build_model("svae_plus", n_genes=screen.n_genes,
                            n_perturbations=screen.n_perturbations, n_latent=3, n_hidden=8,
                            labels=voc["labels"], perturbation_counts=screen.perturbation_counts)
    with pytest.raises(RuntimeError, match="label counts"):
        no_counts.loss(make_batch(screen, np.arange(10)))
    no_counts.set_perturbation_counts(screen.perturbation_counts, label_counts=voc["label_counts"])
    assert torch.isfinite(no_counts.loss(make_batch(screen, np.arange(10)))["loss"])


def test_predict_accepts_scipy_numpy_and_torch(screen):
    model = _build("sams_vae", "mean_field", screen)
    rows = sp.csr_matrix(np.array([[0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 1, 0]], dtype=np.float32))
    outs = [model.predict_normalized_expression(r, n_samples=3,
                                                generator=torch.Generator().manual_seed(0))
            for r in (rows, rows.toarray(), torch.tensor(rows.toarray()).to_sparse_csr())]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0])
    with pytest.raises(ValueError, match="one column per perturbation"):
        model.predict_normalized_expression(np.zeros((2, 3)), n_samples=2)
