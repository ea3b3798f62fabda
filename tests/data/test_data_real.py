"""Smoke tests on the real screens in ../shared/data (skipped when absent)."""
import numpy as np
import pytest
import scipy.sparse as sp

from samsvae.data import (BackedCSR, MinibatchLoader, gene_log1p_stats, load_screen, make_split,
                          ood_candidates, split_indices)



def shared_file(shared_data, name):
    path = shared_data / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path


CASES = {
    # file: (load_screen kwargs, cells, perturbations, multi-perturbation cells)
    "norman2019_k562_crispra.h5ad": ({}, 3375, 31, 1480),
    "schraivogel2020_k562_tapseq.h5ad": ({"drop_labels": ["unassigned"]}, 21315, 26, 733),
    "mcfaline2023_gbm_crispri.h5ad": ({}, 2586, 9, 0),
}


@pytest.mark.parametrize("backed", [False, True], ids=["memory", "backed"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_real_screen_counts(name, backed, shared_data):
    kwargs, n_cells, n_pert, n_multi = CASES[name]
    screen = load_screen(shared_file(shared_data, name), backed=backed, **kwargs)
    assert screen.n_cells == n_cells
    assert screen.n_perturbations == n_pert
    assert int((screen.n_components() >= 2).sum()) == n_multi
    assert screen.control_label == "control"
    assert isinstance(screen.counts, BackedCSR) == backed
    assert screen.perturbation_counts.sum() == screen.dosage.nnz and screen.perturbation_counts.min() > 0
    mean, std = gene_log1p_stats(screen, np.arange(screen.n_cells))
    assert np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()
    batch = next(iter(MinibatchLoader(screen, np.arange(screen.n_cells), 256, seed=0)))
    assert batch.counts.shape == (256, screen.n_genes)
    rows = batch.index.numpy()
    np.testing.assert_array_equal(batch.library.numpy(),
                                  np.asarray(screen.rows(rows).sum(1)).ravel().astype(np.float32))


def test_norman_ood_candidates_are_the_five_doubles(shared_data):
    screen = load_screen(shared_file(shared_data, "norman2019_k562_crispra.h5ad"))
    assert ood_candidates(screen) == ["KLF1+MAP2K6", "KLF1+TGFBR2", "MAP2K3+MAP2K6",
                                      "MAP2K3+SLC38A2", "MAPK1+TGFBR2"]
    parts = split_indices(make_split(screen, "ood_combinations"))
    # the five doubles (100 cells each) and 30 of the 100 control cells as their reference
    assert parts["test"].size == 530
    assert set(screen.labels[parts["test"]]) == set(ood_candidates(screen)) | {"control"}
    # 250 genes have no counts at all (more in the training cells alone): finite statistics
    mean, std = gene_log1p_stats(screen, parts["train"])
    zero = np.asarray(screen.counts[parts["train"]].sum(0)).ravel() == 0
    assert zero.sum() >= 250 and np.all(mean[zero] == 0) and np.all(std[zero] == 1)


def test_schraivogel_guides_as_dosage_matrix(shared_data):
    screen = load_screen(shared_file(shared_data, "schraivogel2020_k562_tapseq.h5ad"), dosage_key="grna_counts",
                         drop_labels=["unassigned"])
    assert screen.n_cells == 21315 and screen.n_perturbations == 86
    assert sp.isspmatrix_csr(screen.dosage) and screen.dosage.data.max() > 1  # UMI dosages
