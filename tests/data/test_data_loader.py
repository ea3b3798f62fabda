"""MinibatchLoader and BackedCSR: sparse batches, order, coverage, backed == in memory."""
import pickle

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from samsvae.data import (BackedCSR, MinibatchLoader, gene_log1p_stats, library_sizes,
                          load_screen, simulate_screen)


@pytest.fixture(scope="module")
def adata():
    a = simulate_screen(1100, 40, 6, n_combinations=3, seed=7)
    X = a.X.tolil()
    X[[3, 500], :] = 0  # zero-count cells: dropped, so backed rows map through a row index
    a.X = X.tocsr()
    return a


@pytest.fixture(scope="module")
def screens(adata, tmp_path_factory):
    path = tmp_path_factory.mktemp("loader") / "sim.h5ad"
    adata.write_h5ad(path)
    with pytest.warns(UserWarning, match="dropping 2 cells"):
        mem = load_screen(adata)
    with pytest.warns(UserWarning, match="dropping 2 cells"):
        backed = load_screen(path, backed=True)
    return mem, backed


def test_backed_and_in_memory_batches_identical(screens):
    mem, backed = screens
    assert isinstance(backed.counts, BackedCSR) and sp.isspmatrix_csr(mem.counts)
    # one index dtype: scipy's row indexing is very slow on mixed int32/int64 index arrays
    with pytest.warns(UserWarning, match="dropping 2 cells"):
        from_file = load_screen(backed.counts.path)
    for m in (mem.counts, mem.dosage, from_file.counts, from_file.dosage):
        assert m.indices.dtype == m.indptr.dtype == np.int32
    idx = np.arange(mem.n_cells)
    for epoch in (0, 1):
        lm = MinibatchLoader(mem, idx, 128, seed=3)
        lb = MinibatchLoader(backed, idx, 128, seed=3)
        lm.set_epoch(epoch)
        lb.set_epoch(epoch)
        for bm, bb in zip(lm, lb, strict=True):
            for a, b in ((bm.counts, bb.counts), (bm.dosage, bb.dosage)):
                assert torch.equal(a.crow_indices(), b.crow_indices())
                assert torch.equal(a.col_indices(), b.col_indices())
                assert torch.equal(a.values(), b.values())
            assert torch.equal(bm.library, bb.library) and torch.equal(bm.index, bb.index)


def test_batch_types_are_sparse(screens):
    mem = screens[0]
    batch = next(iter(MinibatchLoader(mem, np.arange(mem.n_cells), 64)))
    assert batch.counts.layout == torch.sparse_csr and batch.counts.dtype == torch.float32
    assert batch.dosage.layout == torch.sparse_csr and batch.dosage.dtype == torch.float32
    assert batch.counts.shape == (64, mem.n_genes) and batch.dosage.shape == (64, mem.n_perturbations)
    assert batch.library.dtype == torch.float32 and batch.index.dtype == torch.int64
    assert batch.counts.crow_indices().dtype == torch.int64
    rows = batch.index.numpy()
    np.testing.assert_array_equal(batch.counts.to_dense().numpy(), mem.counts[rows].toarray())
    np.testing.assert_array_equal(batch.dosage.to_dense().numpy(), mem.dosage[rows].toarray())
    np.testing.assert_array_equal(batch.library.numpy(), mem.library[rows].astype(np.float32))
    assert len(batch) == 64 and batch.to("cpu").counts.layout == torch.sparse_csr


@pytest.mark.parametrize("which", [0, 1], ids=["memory", "backed"])
def test_no_shuffle_keeps_order_exactly(screens, which):
    screen = screens[which]
    rng = np.random.default_rng(0)
    idx = rng.permutation(screen.n_cells)[:300]
    loader = MinibatchLoader(screen, idx, 70, shuffle=False)
    got = np.concatenate([b.index.numpy() for b in loader])
    np.testing.assert_array_equal(got, idx)
    assert len(loader) == 5


@pytest.mark.parametrize("drop_last", [False, True])
def test_epoch_covers_every_index_once(screens, drop_last):
    screen = screens[0]
    idx = np.arange(0, screen.n_cells, 2)
    loader = MinibatchLoader(screen, idx, 100, seed=1, drop_last=drop_last)
    seen = np.concatenate([b.index.numpy() for b in loader])
    if drop_last:
        assert len(loader) == idx.size // 100 and seen.size == len(loader) * 100
        assert np.unique(seen).size == seen.size and np.isin(seen, idx).all()
    else:
        np.testing.assert_array_equal(np.sort(seen), idx)
        assert not np.array_equal(seen, idx)  # shuffled


def test_set_epoch_reshuffles_deterministically(screens):
    screen = screens[0]
    a = MinibatchLoader(screen, np.arange(screen.n_cells), 50, seed=9)
    b = MinibatchLoader(screen, np.arange(screen.n_cells), 50, seed=9)
    first = a.epoch_order().copy()
    np.testing.assert_array_equal(first, b.epoch_order())
    a.set_epoch(1)
    assert not np.array_equal(first, a.epoch_order())
    b.set_epoch(1)
    np.testing.assert_array_equal(a.epoch_order(), b.epoch_order())


def test_bad_indices_rejected(screens):
    screen = screens[0]
    with pytest.raises(IndexError, match="must lie in"):
        MinibatchLoader(screen, np.array([0, screen.n_cells]))
    with pytest.raises(ValueError, match="batch_size"):
        MinibatchLoader(screen, np.arange(3), 0)
    mask = np.zeros(screen.n_cells, bool)
    mask[[1, 4]] = True
    assert MinibatchLoader(screen, mask).indices.tolist() == [1, 4]


@pytest.mark.parametrize("direct", [True, False], ids=["file", "hdf5"])
@pytest.mark.parametrize("max_gap", [0, 50, 10 ** 9])
def test_backed_read_rows_any_gap(screens, max_gap, direct):
    mem, backed = screens
    view = BackedCSR(backed.counts.path, rows=backed.counts._rows, max_gap=max_gap, direct=direct)
    rng = np.random.default_rng(max_gap % 97)
    idx = np.sort(rng.choice(mem.n_cells, 200, replace=False))
    np.testing.assert_array_equal(view.read_rows(idx).toarray(), mem.counts[idx].toarray())
    idx = np.array([5, 5, 0, 900, 6, 7, 8, 2])  # any order with repeats
    got = view.rows(idx)
    assert sp.isspmatrix_csr(got) and got.dtype == np.float32
    np.testing.assert_array_equal(got.toarray(), mem.counts[idx].toarray())
    assert view.rows(np.array([], dtype=np.int64)).shape == (0, mem.n_genes)
    with pytest.raises(ValueError, match="sorted"):
        view.read_rows(np.array([3, 1]))


def test_backed_csr_pickles_and_reopens(screens):
    backed = screens[1].counts
    clone = pickle.loads(pickle.dumps(backed))
    np.testing.assert_array_equal(clone.rows(np.arange(10)).toarray(),
                                  backed.rows(np.arange(10)).toarray())
    assert clone.shape == backed.shape and clone.nnz == backed.nnz
    clone.close()


@pytest.mark.parametrize("which", [0, 1], ids=["memory", "backed"])
def test_gene_log1p_stats_match_dense_float64(screens, which):
    screen = screens[which]
    idx = np.arange(1, screen.n_cells, 3)
    mean, std = gene_log1p_stats(screen, idx, chunk_rows=97)
    dense = np.log1p(screens[0].counts[idx].toarray().astype(np.float64))
    np.testing.assert_allclose(mean, dense.mean(0), rtol=1e-12, atol=1e-12)
    ref_std = dense.std(0)
    ref_std[ref_std < 1e-6] = 1.0
    np.testing.assert_allclose(std, ref_std, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layout, kind", [
    (dict(), "file"),                                   # contiguous
    (dict(chunks=(7,), maxshape=(None,)), "file"),      # tiny chunks: ranges cross chunk edges
    (dict(chunks=(64,), compression="gzip"), "hdf5"),   # compressed: HDF5 must decompress
])
def test_backed_readers_per_storage_layout(tmp_path, layout, kind):
    import h5py
    rng = np.random.default_rng(0)
    m = sp.random(300, 50, density=0.2, format="csr", random_state=1, dtype=np.float64)
    m.data = np.ceil(m.data * 10).astype(np.float32)
    m.indices = m.indices.astype(np.int64)  # a non-default index dtype as stored
    path = tmp_path / "m.h5"
    with h5py.File(path, "w") as f:
        g = f.create_group("X")
        g.attrs["encoding-type"], g.attrs["encoding-version"] = "csr_matrix", "0.1.0"
        g.attrs["shape"] = np.array(m.shape)
        g.create_dataset("data", data=m.data, **layout)
        g.create_dataset("indices", data=m.indices, **layout)
        g.create_dataset("indptr", data=m.indptr)
    backed = BackedCSR(path)
    assert backed.reader_kind == kind
    for _ in range(3):
        idx = rng.choice(300, 77, replace=True)
        np.testing.assert_array_equal(backed.rows(idx).toarray(), m[idx].toarray())
    np.testing.assert_array_equal(backed.read_rows(np.arange(300)).toarray(), m.toarray())
    assert BackedCSR(path, direct=False).reader_kind == "hdf5"
    backed.close()


def test_library_sizes_backed_and_in_memory(screens):
    mem, backed = screens
    np.testing.assert_array_equal(library_sizes(mem.counts), mem.library)
    np.testing.assert_array_equal(library_sizes(backed.counts, chunk_rows=100), mem.library)
