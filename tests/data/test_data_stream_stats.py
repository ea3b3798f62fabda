"""One-pass statistics of a backed screen: equal to the in-memory ones, cached, validated."""
import os

import anndata
import numpy as np
import pytest
import scipy.sparse as sp

from samsvae.data import (gene_log1p_stats, load_screen, make_split, perturbation_cell_counts,
                          simulate_screen)
from samsvae.data.stream_stats import load_backed_screen, merge_scans, scan_counts


def _split(screen):
    return make_split(screen, "random", seed=5)


@pytest.fixture()
def h5ad(tmp_path):
    adata = simulate_screen(900, 25, 5, n_combinations=2, seed=2)
    X = adata.X.tolil()
    X[[4, 300], :] = 0  # empty cells are dropped
    adata.X = X.tocsr()
    path = tmp_path / "screen.h5ad"
    adata.write_h5ad(path)
    return path, adata


def _check_against_memory(screen, split, stats, adata):
    with pytest.warns(UserWarning, match="dropping"):
        mem = load_screen(adata)
    ref_split = _split(mem)
    np.testing.assert_array_equal(split, ref_split)
    np.testing.assert_array_equal(screen.cell_index, mem.cell_index)
    np.testing.assert_array_equal(screen.library, mem.library)
    train = np.flatnonzero(ref_split == "train")
    mean, std = gene_log1p_stats(mem, train)
    np.testing.assert_allclose(stats.gene_log1p_mean, mean, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(stats.gene_log1p_std, std, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(stats.perturbation_counts,
                                  perturbation_cell_counts(mem.dosage, train))
    assert stats.n_train == train.size


def test_one_pass_equals_in_memory_statistics(h5ad, tmp_path):
    path, adata = h5ad
    cache = tmp_path / "run" / "data_stats.npz"
    lines = []
    with pytest.warns(UserWarning, match="dropping 2 cells"):
        screen, split, stats = load_backed_screen(path, _split, cache_path=cache,
                                                  log=lines.append)
    assert screen.is_backed and not stats.from_cache and cache.is_file()
    assert "one pass" in lines[0]
    _check_against_memory(screen, split, stats, adata)
    # the whole matrix was read once: data (float32) + indices (int32)
    assert stats.bytes_read == adata.X.nnz * 8


def test_cache_is_reused_and_invalidated_when_the_file_changes(h5ad, tmp_path, monkeypatch):
    path, adata = h5ad
    cache = tmp_path / "data_stats.npz"
    with pytest.warns(UserWarning):
        load_backed_screen(path, _split, cache_path=cache)
    import samsvae.data.stream_stats as ss
    calls = []
    real = ss.scan_counts
    monkeypatch.setattr(ss, "scan_counts", lambda *a, **k: calls.append(1) or real(*a, **k))
    with pytest.warns(UserWarning):
        screen, split, stats = load_backed_screen(path, _split, cache_path=cache)
    assert stats.from_cache and not calls  # no pass over the counts
    _check_against_memory(screen, split, stats, adata)
    # another split (e.g. a different seed) needs other gene statistics: recomputed
    with pytest.warns(UserWarning):
        _, _, other = load_backed_screen(path, lambda s: make_split(s, seed=9), cache_path=cache)
    assert not other.from_cache and calls
    # a rewritten file (new mtime) is not trusted
    calls.clear()
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.warns(UserWarning):
        _, _, fresh = load_backed_screen(path, _split, cache_path=cache)
    assert not fresh.from_cache and calls


def test_rows_of_stored_zeros_are_dropped_like_load_screen(tmp_path):
    adata = simulate_screen(400, 20, 4, seed=1)
    X = adata.X.tocsr().astype(np.float32)
    # cell 7 keeps its sparsity pattern but all its stored values become 0
    X.data[X.indptr[7]:X.indptr[8]] = 0
    adata.X = X
    path = tmp_path / "zeros.h5ad"
    adata.write_h5ad(path)
    with pytest.warns(UserWarning, match="dropping 1 cells"):
        screen, split, stats = load_backed_screen(path, _split)
    assert 7 not in set(screen.cell_index.tolist())
    _check_against_memory(screen, split, stats, anndata.read_h5ad(path))


def test_non_integer_counts_are_refused_with_the_fix(tmp_path):
    adata = simulate_screen(200, 10, 3, seed=0)
    adata.X = sp.csr_matrix(np.log1p(adata.X.toarray()).astype(np.float32))
    path = tmp_path / "lognorm.h5ad"
    adata.write_h5ad(path)
    with pytest.raises(ValueError, match="non-integer values.*raw"):
        load_backed_screen(path, _split)


def test_partial_scans_merge_to_the_full_scan(h5ad):
    path, adata = h5ad
    n = adata.n_obs
    train = np.zeros(n, dtype=bool)
    train[::3] = True
    full = merge_scans([scan_counts(path, "X", train)], n)
    parts = [scan_counts(path, "X", train, row_range=(a, b), chunk_entries=500)
             for a, b in ((0, 100), (100, 101), (101, n))]
    split = merge_scans(parts, n)
    np.testing.assert_array_equal(split[0], full[0])
    assert split[1] == full[1] == train.sum()
    np.testing.assert_allclose(split[2], full[2], rtol=1e-12)
    np.testing.assert_allclose(split[3], full[3], rtol=1e-12)
    with pytest.raises(RuntimeError, match="cover"):
        merge_scans(parts[:1], n)


def test_backed_run_reloads_with_the_cached_library(h5ad, tmp_path, monkeypatch, capsys):
    import samsvae.data.screen as screen_module
    from samsvae.cli import main
    from samsvae.train.run_dir import load_run
    path, adata = h5ad
    out = tmp_path / "run"
    assert main(["train", str(path), "--out", str(out), "--backed", "--max-steps", "3",
                 "--latent", "3", "--hidden", "8", "--batch-size", "64",
                 "--no-progress"]) == 0
    assert "dropped 2 cells (zero counts)" in capsys.readouterr().out  # logged, not warned
    assert (out / "data_stats.npz").is_file()

    def no_pass(*args, **kwargs):
        raise AssertionError("the counts were scanned again")

    monkeypatch.setattr(screen_module, "_backed_counts", no_pass)
    with pytest.warns(UserWarning, match="dropping"):
        run = load_run(out)  # what `samsvae evaluate` and --resume do
    assert run.screen.is_backed
    with pytest.warns(UserWarning, match="dropping"):
        mem = load_screen(adata)
    np.testing.assert_array_equal(run.screen.library, mem.library)
