"""``samsvae.ops.log1p_standardize``: the encoder's dense standardised log1p input.

The C++ op must equal the float64 definition (log1p(x) - mean) * inv_std on fresh random
batches (empty rows, counts to 1e5, non-integer counts), in float64 and float32, and reject
malformed CSR with a message naming the fix."""
import pytest
import torch

from samsvae.ops import _cpp, log1p_standardize
from samsvae.ops.log1p_standardize import log1p_standardize_reference


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
    if backend == "cpp" and not _cpp.ext_available():
        pytest.skip("C++ extension not built")
    x, mean, inv_std = _batch(dtype=dtype)
    counts = x.to(dtype).to_sparse_csr() if layout == "csr" else x.to(dtype)
    got = log1p_standardize(counts, mean, inv_std, backend=backend)
    assert got.dtype == dtype and got.shape == x.shape
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    want = _definition(x, mean, inv_std)
    assert (got.double() - want).abs().max().item() <= tol * want.abs().max().item()


@pytest.mark.skipif(not _cpp.ext_available(), reason="C++ extension not built")
def test_cpp_equals_reference_on_a_training_batch_shape():
    from samsvae.bench import synth_batch
    b = synth_batch(64, 500, 10, seed=3)
    mean = torch.rand(500)
    inv_std = 1.0 / (0.5 + torch.rand(500))
    got = log1p_standardize(b.counts, mean, inv_std, backend="cpp")
    want = log1p_standardize_reference(b.counts, mean, inv_std)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not _cpp.ext_available(), reason="C++ extension not built")
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
    from samsvae.ops._triton_encoder_kernels import log1p_standardize_triton
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
    if backend == "cpp" and not _cpp.ext_available():
        pytest.skip("C++ extension not built")
    x, mean, inv_std = _batch(dtype=torch.float32)
    x[2, 3] = bad
    with pytest.raises((ValueError, RuntimeError), match="finite and non-negative"):
        log1p_standardize(x.float().to_sparse_csr(), mean, inv_std, backend=backend)
