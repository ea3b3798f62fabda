"""The encoder-input ops: log1p_standardize (the encoder's dense standardised log1p input) and
log1p_standardize_linear (the encoder's first layer on raw counts), on every tier.
"""
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from helpers import CPU_ISAS as ISAS
from helpers import needs_cpp

from samsvae.ops import cpp_extension, log1p_standardize, log1p_standardize_linear
from samsvae.ops.encoder import cpp as encoder_cpp
from samsvae.ops.encoder import log1p_standardize_reference




# ------------------------------------------------------------ ops_log1p_standardize


def _batch(cells=30, genes=57, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.poisson(torch.rand(cells, genes, generator=g, dtype=torch.float64) * 2.0)
    x[3] = 0.0                                            # an empty row
    x[5, :4] = torch.tensor([1e5, 63.0, 64.0, 2.5])       # past the table, non-integer
    mean = torch.rand(genes, generator=g, dtype=torch.float64)
    inv_std = 1.0 / (0.1 + torch.rand(genes, generator=g, dtype=torch.float64))
    return x, mean.to(dtype), inv_std.to(dtype)


def _definition(x, mean, inv_std):
    return (torch.log1p(x.double()) - mean.double()) * inv_std.double()


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["csr", "dense"])
def test_matches_the_definition(backend, dtype, layout):
    if backend == "cpp" and not cpp_extension.ext_available():
        pytest.skip("C++ extension not built")
    x, mean, inv_std = _batch(dtype=dtype)
    counts = x.to(dtype).to_sparse_csr() if layout == "csr" else x.to(dtype)
    got = log1p_standardize(counts, mean, inv_std, backend=backend)
    assert got.dtype == dtype and got.shape == x.shape
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    want = _definition(x, mean, inv_std)
    assert (got.double() - want).abs().max().item() <= tol * want.abs().max().item()


@pytest.mark.skipif(not cpp_extension.ext_available(), reason="C++ extension not built")
def test_cpp_equals_reference_on_a_training_batch_shape():
    from samsvae.data import synth_batch
    b = synth_batch(64, 500, 10, seed=3)
    mean = torch.rand(500)
    inv_std = 1.0 / (0.5 + torch.rand(500))
    got = log1p_standardize(b.counts, mean, inv_std, backend="cpp")
    want = log1p_standardize_reference(b.counts, mean, inv_std)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not cpp_extension.ext_available(), reason="C++ extension not built")
def test_bad_column_index_is_refused():
    crow = torch.tensor([0, 1, 2])
    col = torch.tensor([0, 7])
    val = torch.tensor([1.0, 2.0])
    with pytest.raises(RuntimeError, match="col_indices must lie in"):
        torch.ops.samsvae.log1p_standardize_csr(crow, col, val, torch.zeros(5), torch.ones(5))


def test_shape_mismatch_is_refused():
    x, mean, inv_std = _batch()
    with pytest.raises(ValueError, match="mean / inv_std"):
        log1p_standardize(x, mean[:-1], inv_std)


def test_triton_kernel_matches_the_definition():
    """Under TRITON_INTERPRET=1 (conftest) on CPU tensors, or on the GPU when present."""
    pytest.importorskip("triton")
    from samsvae.ops.encoder.triton import log1p_standardize_triton
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, mean, inv_std = _batch(cells=9, genes=21, dtype=torch.float32)
    x[0, 0] = 1e-9  # below half an ulp of 1: the log1p guard
    counts = x.float().to_sparse_csr().to(device)
    got = log1p_standardize_triton(counts, mean.to(device), inv_std.to(device), block=16)
    want = _definition(x, mean, inv_std)
    assert (got.cpu().double() - want).abs().max().item() <= 2e-6 * want.abs().max().item()


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_invalid_counts_are_refused(backend, bad):
    if backend == "cpp" and not cpp_extension.ext_available():
        pytest.skip("C++ extension not built")
    x, mean, inv_std = _batch(dtype=torch.float32)
    x[2, 3] = bad
    with pytest.raises((ValueError, RuntimeError), match="finite and non-negative"):
        log1p_standardize(x.float().to_sparse_csr(), mean, inv_std, backend=backend)


# ------------------------------------------------------------ ops_log1p_standardize_linear





def _inputs(cells, genes, hidden, *, density=0.3, seed=0, dtype=torch.float64, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.poisson(torch.rand(cells, genes, generator=g, dtype=torch.float64) * 3.0, generator=g)
    x *= torch.rand(cells, genes, generator=g, dtype=torch.float64) < density
    if cells > 3:
        x[1] = 0.0                                         # an empty cell
        x[2] = 1.0 + torch.arange(genes, dtype=torch.float64) % 7  # every gene stored
    if cells > 5 and genes > 4:
        x[5, :4] = torch.tensor([1e5, 63.0, 64.0, 2.5])    # past the table, non-integer
    mean = torch.rand(genes, generator=g, dtype=torch.float64)
    inv_std = 1.0 / (0.2 + torch.rand(genes, generator=g, dtype=torch.float64))
    w = torch.randn(hidden, genes, generator=g, dtype=torch.float64) * 0.1
    b = torch.randn(hidden, generator=g, dtype=torch.float64) if bias else None
    return x, w.to(dtype), None if b is None else b.to(dtype), mean.to(dtype), inv_std.to(dtype)


def _lin_definition(x, w, b, mean, inv_std):
    """Value and (d W, d b) of sum(out * go) in float64, straight from the formula."""
    w = w.double().detach().requires_grad_(True)
    b = None if b is None else b.double().detach().requires_grad_(True)
    feats = (torch.log1p(x.double()) - mean.double()) * inv_std.double()
    out = feats @ w.T + (0.0 if b is None else b)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (out * go).sum().backward()
    return out.detach(), go, w.grad, None if b is None else b.grad


def _run(counts, w, b, mean, inv_std, go, backend):
    w = w.detach().clone().requires_grad_(True)
    b = None if b is None else b.detach().clone().requires_grad_(True)
    out = log1p_standardize_linear(counts, w, b, mean, inv_std, backend=backend)
    (out * go.to(out.dtype)).sum().backward()
    return out.detach(), w.grad, None if b is None else b.grad


def _force_sparse(monkeypatch, on: bool):
    monkeypatch.setattr(encoder_cpp, "SPARSE_BELOW", 1.0 if on else -1.0)


@needs_cpp
@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("shape", [(9, 70, 37), (12, 300, 16), (6, 65, 129), (4, 1, 1),
                                   (20, 131, 400), (7, 1100, 20)])
@pytest.mark.parametrize("bias", [True, False])
def test_float64_kernel_matches_the_definition(isa, shape, bias, monkeypatch):
    _force_sparse(monkeypatch, True)
    x, w, b, mean, inv_std = _inputs(*shape, bias=bias, seed=sum(shape))
    want, go, dw, db = _lin_definition(x, w, b, mean, inv_std)
    got, gw, gb = _run(x.to_sparse_csr(), w, b, mean, inv_std, go, "cpp")
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 1e-12 * scale
    assert (gw - dw).abs().max().item() <= 1e-12 * dw.abs().max().item()
    if bias:
        assert (gb - db).abs().max().item() <= 1e-12 * db.abs().max().item()
    else:
        assert gb is None


@needs_cpp
@pytest.mark.parametrize("sparse", [True, False])
def test_float32_error_is_that_of_float32(sparse, monkeypatch):
    """Both cpp paths within a few float32 ulps of the output scale, like the reference."""
    _force_sparse(monkeypatch, sparse)
    x, w, b, mean, inv_std = _inputs(64, 500, 400, density=0.2, seed=3, dtype=torch.float32)
    want, go, dw, db = _lin_definition(x, w, b, mean, inv_std)
    got, gw, gb = _run(x.float().to_sparse_csr(), w, b, mean, inv_std, go, "cpp")
    ref, rw, rb = _run(x.float().to_sparse_csr(), w, b, mean, inv_std, go, "reference")
    for mine, theirs, exact in ((got, ref, want), (gw, rw, dw), (gb, rb, db)):
        err = (mine.double() - exact).abs().max().item()
        ref_err = (theirs.double() - exact).abs().max().item()
        assert err <= max(4 * ref_err, 1e-6 * exact.abs().max().item())


@needs_cpp
def test_both_cpp_paths_and_the_reference_agree_on_a_training_batch(monkeypatch):
    from samsvae.data import synth_batch
    batch = synth_batch(128, 800, 10, seed=4, mean_count=0.1)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 800, generator=g) * 0.05
    b = torch.randn(64, generator=g)
    mean, inv_std = torch.rand(800, generator=g), 1.0 / (0.3 + torch.rand(800, generator=g))
    go = torch.randn(128, 64, generator=g)
    results = []
    for backend, sparse in (("reference", None), ("cpp", True), ("cpp", False)):
        if sparse is not None:
            _force_sparse(monkeypatch, sparse)
        results.append(_run(batch.counts, w, b, mean, inv_std, go, backend))
    for other in results[1:]:
        for a, b_ in zip(results[0], other):
            torch.testing.assert_close(a, b_, rtol=1e-4, atol=1e-4)


@needs_cpp
def test_threads_split_cells_and_genes_without_changing_the_result(monkeypatch):
    _force_sparse(monkeypatch, True)
    x, w, b, mean, inv_std = _inputs(70, 1000, 48, density=0.2, seed=5, dtype=torch.float32)
    go = torch.randn(70, 48, generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(x.float().to_sparse_csr(), w, b, mean, inv_std, go, "cpp")
        torch.set_num_threads(2)
        two = _run(x.float().to_sparse_csr(), w, b, mean, inv_std, go, "cpp")
    finally:
        torch.set_num_threads(threads)
    for a, b_ in zip(one, two):  # each output element is computed by one thread, same order
        assert torch.equal(a, b_)


@needs_cpp
def test_duplicate_entries_add_up_like_the_dense_features():
    """A CSR with a repeated column (outside torch's invariant, but what a scatter-add of the
    values gives) counts both entries."""
    crow = torch.tensor([0, 3, 3])
    col = torch.tensor([1, 1, 4])
    val = torch.tensor([2.0, 3.0, 1.0], dtype=torch.float64)
    counts = torch.sparse_csr_tensor(crow, col, val, size=(2, 6), check_invariants=False)
    g = torch.Generator().manual_seed(2)
    w = torch.randn(5, 6, generator=g, dtype=torch.float64)
    mean, inv_std = torch.rand(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    out, _ = torch.ops.samsvae.log1p_standardize_linear_csr(crow, col, val, w, None, mean, inv_std)
    feats = -mean.clone().repeat(2, 1)
    feats[0, 1] += np.log1p(2.0) + np.log1p(3.0)
    feats[0, 4] += np.log1p(1.0)
    torch.testing.assert_close(out, feats @ w.T, rtol=1e-12, atol=1e-12)


@needs_cpp
def test_opcheck():
    x, w, b, mean, inv_std = _inputs(7, 40, 19, seed=9)
    c = x.to_sparse_csr()
    parts = (c.crow_indices().clone(), c.col_indices().clone(), c.values().clone())
    torch.library.opcheck(torch.ops.samsvae.log1p_standardize_linear_csr.default,
                          (*parts, w.clone().requires_grad_(True), b.clone().requires_grad_(True),
                           mean, inv_std))
    torch.library.opcheck(torch.ops.samsvae.log1p_standardize_linear_csr_bwd.default,
                          (torch.randn(7, 19, dtype=torch.float64), parts[0], parts[1],
                           torch.rand(parts[2].shape, dtype=torch.float64), mean, inv_std))


@needs_cpp
@pytest.mark.parametrize("value, match", [(-1.0, "finite and non-negative"),
                                          (float("nan"), "finite and non-negative")])
def test_bad_counts_are_refused(value, match, monkeypatch):
    _force_sparse(monkeypatch, True)
    x, w, b, mean, inv_std = _inputs(6, 20, 8, seed=1)
    x[0, 0] = value
    with pytest.raises(RuntimeError, match=match):
        log1p_standardize_linear(x.to_sparse_csr(), w, b, mean, inv_std, backend="cpp")


@needs_cpp
def test_malformed_csr_is_refused_with_the_fix():
    w, mean, inv_std = torch.zeros(3, 5), torch.zeros(5), torch.ones(5)
    val = torch.tensor([1.0, 2.0])
    op = torch.ops.samsvae.log1p_standardize_linear_csr
    with pytest.raises(RuntimeError, match="col_indices must ascend.*sort_indices"):
        op(torch.tensor([0, 2]), torch.tensor([3, 1]), val, w, None, mean, inv_std)
    with pytest.raises(RuntimeError, match="col_indices must lie in"):
        op(torch.tensor([0, 2]), torch.tensor([1, 9]), val, w, None, mean, inv_std)
    with pytest.raises(RuntimeError, match="weight must be"):
        op(torch.tensor([0, 2]), torch.tensor([1, 3]), val, torch.zeros(3, 4), None, mean,
           inv_std)


def test_lin_shape_mismatch_is_refused():
    x, w, b, mean, inv_std = _inputs(4, 10, 3)
    with pytest.raises(ValueError, match="weight"):
        log1p_standardize_linear(x, w[:, :-1], b, mean, inv_std)
    with pytest.raises(ValueError, match="bias"):
        log1p_standardize_linear(x, w, b[:-1], mean, inv_std)
    with pytest.raises(ValueError, match="mean / inv_std"):
        log1p_standardize_linear(x, w, b, mean[:-1], inv_std)


def test_reference_is_the_definition_for_dense_and_csr_counts():
    x, w, b, mean, inv_std = _inputs(8, 30, 5, seed=4)
    want, go, dw, db = _lin_definition(x, w, b, mean, inv_std)
    for counts in (x, x.to_sparse_csr()):
        got, gw, gb = _run(counts, w, b, mean, inv_std, go, "reference")
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gw, dw, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gb, db, rtol=1e-12, atol=1e-12)


def test_no_gradient_reaches_the_statistics():
    x, w, b, mean, inv_std = _inputs(5, 12, 4)
    mean.requires_grad_(True)
    out = log1p_standardize_linear(x.to_sparse_csr(), w.requires_grad_(True), b, mean, inv_std)
    out.sum().backward()
    assert mean.grad is None and w.grad is not None


def test_triton_tier_matches_the_definition():
    """Under TRITON_INTERPRET=1 (conftest) on CPU tensors, or on the GPU when present."""
    pytest.importorskip("triton")
    from samsvae.ops.encoder.triton import log1p_standardize_linear_triton
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, w, b, mean, inv_std = _inputs(9, 21, 6, dtype=torch.float32, seed=6)
    want, go, dw, db = _lin_definition(x, w, b, mean, inv_std)
    w = w.to(device).requires_grad_(True)
    got = log1p_standardize_linear_triton(x.float().to_sparse_csr().to(device), w, b.to(device),
                                          mean.to(device), inv_std.to(device))
    (got * go.float().to(device)).sum().backward()
    assert (got.detach().cpu().double() - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    assert (w.grad.cpu().double() - dw).abs().max().item() <= 1e-5 * dw.abs().max().item()


def test_batches_from_an_unsorted_scipy_matrix_are_sorted():
    from samsvae.data.loader import csr_to_torch
    m = sp.csr_matrix((np.array([1.0, 2.0, 3.0], np.float32), np.array([4, 1, 2]),
                       np.array([0, 2, 3])), shape=(2, 5))
    m.has_sorted_indices = False  # as a reader that kept the file's order would hand it over
    t = csr_to_torch(m)
    assert t.col_indices().tolist() == [1, 4, 2]
    torch.testing.assert_close(t.to_dense(), torch.from_numpy(m.toarray()))


@needs_cpp
@pytest.mark.parametrize("cells", [0, 3])
def test_empty_batches_and_cells_without_counts(cells, monkeypatch):
    _force_sparse(monkeypatch, True)
    _, w, b, mean, inv_std = _inputs(4, 50, 7)
    counts = torch.zeros(cells, 50, dtype=torch.float64).to_sparse_csr()
    go = torch.randn(cells, 7, dtype=torch.float64)
    got = _run(counts, w, b, mean, inv_std, go, "cpp")
    want = _run(counts, w, b, mean, inv_std, go, "reference")
    for a, b_ in zip(got, want):
        torch.testing.assert_close(a, b_, rtol=1e-12, atol=1e-12)


@needs_cpp
def test_the_op_compiles_with_its_fake_and_autograd():
    """The custom op in a torch.compile graph (fullgraph): value and weight gradient as eager."""
    x, w, b, mean, inv_std = _inputs(6, 40, 9, seed=12)
    nz = x.nonzero()   # CSR parts built without a sparse tensor (dynamo does not take those)
    crow = torch.cat([torch.zeros(1, dtype=torch.int64), torch.bincount(nz[:, 0], minlength=6)
                      .cumsum(0)])
    parts = (crow, nz[:, 1].contiguous(), x[nz[:, 0], nz[:, 1]])

    def layer(crow, col, values, weight, bias):
        return torch.ops.samsvae.log1p_standardize_linear_csr(crow, col, values, weight, bias,
                                                              mean, inv_std)[0]

    results = []
    for fn in (layer, torch.compile(layer, fullgraph=True, backend="aot_eager")):
        weight = w.clone().requires_grad_(True)
        out = fn(*parts, weight, b)
        out.square().sum().backward()
        results.append((out.detach(), weight.grad))
    for a, b_ in zip(*results):
        torch.testing.assert_close(a, b_, rtol=1e-12, atol=1e-12)
