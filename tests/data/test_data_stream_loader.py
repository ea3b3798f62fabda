"""StreamingLoader: coverage, shards, chunked shuffling, prefetch thread, equality with MinibatchLoader."""
import threading

import numpy as np
import pytest
import torch

from samsvae.data import MinibatchLoader, load_screen, simulate_screen
from samsvae.data.streaming import StreamingLoader, batch_sizes


@pytest.fixture(scope="module")
def screens(tmp_path_factory):
    adata = simulate_screen(1500, 30, 6, n_combinations=2, seed=11)
    path = tmp_path_factory.mktemp("stream") / "sim.h5ad"
    adata.write_h5ad(path)
    return load_screen(adata), load_screen(path, backed=True)


@pytest.fixture(scope="module")
def train_idx(screens):
    rng = np.random.default_rng(3)
    return np.sort(rng.choice(screens[0].n_cells, 1203, replace=False))


def _dense(t):
    return t.to_dense().numpy()


def _assert_batches_equal(a, b):
    for x, y in ((a.counts, b.counts), (a.dosage, b.dosage)):
        assert torch.equal(x.crow_indices(), y.crow_indices())
        assert torch.equal(x.col_indices(), y.col_indices())
        assert torch.equal(x.values(), y.values())
    assert torch.equal(a.library, b.library) and torch.equal(a.index, b.index)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_training_cell_once_per_epoch(screens, train_idx, world_size):
    mem, backed = screens
    for epoch in (0, 1):
        seen, lengths = [], set()
        for rank in range(world_size):
            loader = StreamingLoader(backed, train_idx, 100, seed=4, chunk_rows=16,
                                     buffer_chunks=3, rank=rank, world_size=world_size)
            loader.set_epoch(epoch)
            batches = list(loader)
            lengths.add(len(batches))
            assert len(batches) == len(loader) == -(-train_idx.size // 100)
            for b in batches:
                assert len(b) >= 1
                rows = b.index.numpy()
                # the counts are those rows' counts, read from the file
                np.testing.assert_array_equal(_dense(b.counts), mem.counts[rows].toarray())
                np.testing.assert_array_equal(_dense(b.dosage), mem.dosage[rows].toarray())
                np.testing.assert_array_equal(b.library.numpy(),
                                              mem.library[rows].astype(np.float32))
                seen.append(rows)
        seen = np.concatenate(seen)
        assert seen.size == train_idx.size  # disjoint shards ...
        np.testing.assert_array_equal(np.sort(seen), train_idx)  # ... covering the epoch
        assert lengths == {-(-train_idx.size // 100)}  # ranks step together


def test_global_batch_is_split_over_ranks(screens, train_idx):
    backed = screens[1]
    sizes = [[len(b) for b in StreamingLoader(backed, train_idx, 101, seed=0, rank=r,
                                              world_size=2, chunk_rows=16)] for r in range(2)]
    totals = np.add(*sizes)
    assert (totals[:-1] == 101).all() and totals.sum() == train_idx.size


def test_no_shuffle_equals_minibatch_loader(screens, train_idx):
    mem, backed = screens
    order = np.random.default_rng(1).permutation(train_idx)  # any order is kept
    for screen in (backed, mem):
        stream = StreamingLoader(screen, order, 97, shuffle=False, chunk_rows=10, buffer_chunks=4)
        ref = MinibatchLoader(mem, order, 97, shuffle=False)
        for a, b in zip(stream, ref, strict=True):
            _assert_batches_equal(a, b)


def test_shuffle_is_chunked_random_and_reproducible(screens, train_idx):
    backed = screens[1]

    def order(epoch, seed=4):
        loader = StreamingLoader(backed, train_idx, 64, seed=seed, chunk_rows=32, buffer_chunks=4)
        loader.set_epoch(epoch)
        return np.concatenate([b.index.numpy() for b in loader])

    e0, e1 = order(0), order(1)
    np.testing.assert_array_equal(e0, order(0))  # same (seed, epoch), same order
    assert not np.array_equal(e0, e1) and not np.array_equal(e0, order(0, seed=5))
    # a batch mixes several chunks (regions of the file), not one run of neighbouring rows
    chunk_of = {r: i // 32 for i, r in enumerate(train_idx)}
    first = [chunk_of[r] for r in e0[:64]]
    assert len(set(first)) >= 3
    # ... but only chunks of the first two fills (at most 2 x buffer_chunks chunks)
    assert len(set(first)) <= 8


def test_resume_mid_epoch_skips_without_changing_the_rest(screens, train_idx):
    backed = screens[1]
    loader = StreamingLoader(backed, train_idx, 50, seed=2, chunk_rows=20, buffer_chunks=2)
    loader.set_epoch(3)
    full = list(loader)
    tail = list(loader.iter_from(7))
    assert len(tail) == len(full) - 7
    for a, b in zip(full[7:], tail, strict=True):
        _assert_batches_equal(a, b)
    with pytest.raises(ValueError, match="outside the epoch"):
        next(loader.iter_from(len(full) + 1))


def test_reads_each_stored_value_about_once(screens, train_idx):
    backed = screens[1]
    loader = StreamingLoader(backed, train_idx, 64, seed=0, chunk_rows=64, buffer_chunks=2,
                             max_gap=0)
    for _ in loader:
        pass
    needed = backed.counts.reopen().read_rows(train_idx).nnz * 8  # float32 data + int32 indices
    assert needed <= loader.stats["bytes_read"] <= 1.05 * needed
    assert loader.stats["batches"] == len(loader)


def test_prefetch_thread_stops_on_early_exit(screens, train_idx):
    backed = screens[1]
    before = {t.ident for t in threading.enumerate()}
    loader = StreamingLoader(backed, train_idx, 16, seed=0, chunk_rows=8, prefetch_batches=2)
    it = iter(loader)
    next(it)
    it.close()  # what happens when the trainer stops mid-epoch
    alive = [t for t in threading.enumerate()
             if t.ident not in before and t.name == "samsvae-prefetch"]
    assert not alive


def test_reader_errors_reach_the_consumer(screens, train_idx, monkeypatch):
    backed = screens[1]
    loader = StreamingLoader(backed, train_idx, 64, seed=0, chunk_rows=8)

    def broken(self, reader, rows):
        raise OSError("disk on fire")

    monkeypatch.setattr(StreamingLoader, "_read_fill", broken)
    with pytest.raises(OSError, match="disk on fire"):
        list(loader)


def test_batch_sizes_never_empty():
    assert batch_sizes(1000, 10, 100, False).tolist() == [100] * 10
    assert batch_sizes(1001, 11, 100, False).tolist() == [100] * 10 + [1]
    s = batch_sizes(1000, 11, 100, False)  # one cell short of the other ranks: spread evenly
    assert s.sum() == 1000 and s.min() >= 1 and s.size == 11
    assert batch_sizes(1050, 10, 100, True).tolist() == [100] * 10
    with pytest.raises(ValueError, match="cannot fill"):
        batch_sizes(3, 5, 1, False)


def test_bad_arguments_are_explained(screens, train_idx):
    backed = screens[1]
    with pytest.raises(ValueError, match="at least one cell per process"):
        StreamingLoader(backed, train_idx, 2, rank=0, world_size=4)
    with pytest.raises(ValueError, match="rank < world_size"):
        StreamingLoader(backed, train_idx, 64, rank=2, world_size=2)
    with pytest.raises(ValueError, match="non-empty batches"):
        StreamingLoader(backed, train_idx[:5], 2, rank=0, world_size=2)
    with pytest.raises(IndexError, match="rows of the ScreenData"):
        StreamingLoader(backed, [backed.n_cells], 64)
