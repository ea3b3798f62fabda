"""The C++ CPU kernels of masked_embedding_sum (csrc/embedding/) against the reference.

Both backends draw identical noise from the same generator, so outputs and gradients must agree
to rounding (the hard mask exactly). Skipped when samsvae._C is not built.
"""
import pytest
import torch
from conftest import CPU_ISAS

from samsvae.ops import _cpp, backends, masked_embedding_sum
from samsvae.ops.masked_embedding import draw_noise, masked_embedding_sum_reference

if not _cpp.ext_available():
    pytest.skip(f"C++ extension not built: {_cpp.EXT_ERROR}", allow_module_level=True)

ISAS = CPU_ISAS


def make_inputs(cells=12, n_pert=20, latent=7, *, dtype=torch.float64, seed=0):
    """CSR dosage where cell i has i % 6 perturbations (so none, one, ..., five), real-valued
    doses; tables (T, L) of loc, log scale and mask logits."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(n_pert, generator=g)[: i % 6].sort().values for i in range(cells)]
    crow = torch.tensor([0] + [len(r) for r in rows]).cumsum(0)
    col = torch.cat(rows)
    dose = torch.rand(col.numel(), generator=g, dtype=dtype) + 0.5
    dosage = torch.sparse_csr_tensor(crow, col, dose, (cells, n_pert))
    loc = torch.randn(n_pert, latent, generator=g, dtype=dtype)
    log_scale = torch.randn(n_pert, latent, generator=g, dtype=dtype) * 0.3
    mask_logits = torch.randn(n_pert, latent, generator=g, dtype=dtype) * 2
    return dosage, loc, log_scale, mask_logits


def sample_and_grads(fn, dosage, loc, log_scale, mask_logits, *, particles=3, temperature=0.7,
                     seed=7):
    """Outputs and the gradients of a fixed random functional of z_p, embedding and mask."""
    leaves = [None if t is None else t.detach().clone().requires_grad_()
              for t in (loc, log_scale, mask_logits)]
    gen = torch.Generator().manual_seed(seed)
    out = fn(dosage, *leaves, particles=particles, temperature=temperature, generator=gen)
    after = torch.rand(1, generator=gen)  # generator state after the call
    wg = torch.Generator().manual_seed(1)
    loss = (out.z_p * torch.randn(out.z_p.shape, generator=wg, dtype=loc.dtype)).sum()
    loss = loss + (out.embedding * torch.randn(out.embedding.shape, generator=wg,
                                               dtype=loc.dtype)).sum()
    if out.mask is not None:
        loss = loss + (out.mask * torch.randn(out.mask.shape, generator=wg, dtype=loc.dtype)).sum()
    loss.backward()
    grads = [None if t is None else t.grad for t in leaves]
    return out, grads, after


def cpp(*args, **kwargs):
    return masked_embedding_sum(*args, backend="cpp", **kwargs)


def assert_matches_reference(inputs, rtol, **kw):
    want, want_g, want_after = sample_and_grads(masked_embedding_sum_reference, *inputs, **kw)
    got, got_g, got_after = sample_and_grads(cpp, *inputs, **kw)
    assert torch.equal(got.index, want.index)
    assert torch.equal(got_after, want_after), "the backends must consume the same noise"
    if want.mask is None:
        assert got.mask is None
    else:
        assert torch.equal(got.mask, want.mask)
    for name, a, b in [("z_p", got.z_p, want.z_p), ("embedding", got.embedding, want.embedding),
                       *[(f"grad {n}", x, y) for n, x, y in
                         zip(("loc", "log_scale", "mask_logits"), got_g, want_g)]]:
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * b.abs().max().item(), msg=name)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("scaled", [True, False], ids=["scaled", "point"])
@pytest.mark.parametrize("masked", [True, False], ids=["masked", "unmasked"])
def test_matches_reference(isa, dtype, scaled, masked):
    dosage, loc, log_scale, mask_logits = make_inputs(dtype=dtype)
    inputs = (dosage, loc, log_scale if scaled else None, mask_logits if masked else None)
    assert_matches_reference(inputs, rtol=1e-12 if dtype == torch.float64 else 2e-6)


@pytest.mark.parametrize("latent", [1, 17, 40])
@pytest.mark.parametrize("particles", [1, 4])
def test_odd_latent_sizes_and_particles(latent, particles):
    inputs = make_inputs(cells=9, n_pert=11, latent=latent, seed=latent)
    assert_matches_reference(inputs, rtol=1e-12, particles=particles, temperature=1.3)


def test_work_split_across_threads():
    # big enough for the perturbation- and cell-parallel loops to use two threads
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert_matches_reference(make_inputs(cells=300, n_pert=60, latent=64, seed=3), rtol=1e-12,
                                 particles=2)
    finally:
        torch.set_num_threads(before)


def test_cells_without_perturbations_get_zero():
    dosage, loc, log_scale, mask_logits = make_inputs()
    out = cpp(dosage, loc, log_scale, mask_logits, particles=2)
    empty = (dosage.crow_indices()[1:] == dosage.crow_indices()[:-1])
    assert empty.any()
    assert torch.equal(out.z_p[:, empty], torch.zeros_like(out.z_p[:, empty]))


def test_batch_without_any_perturbation():
    _, loc, log_scale, mask_logits = make_inputs()
    dosage = torch.zeros(4, loc.shape[0], dtype=loc.dtype).to_sparse_csr()
    out = cpp(dosage, loc, log_scale, mask_logits, particles=2)
    assert out.z_p.shape == (2, 4, loc.shape[1]) and not out.z_p.any()
    assert out.index.numel() == 0 and out.embedding.shape == (2, 0, loc.shape[1])


def test_gradients_only_touch_rows_in_the_batch():
    dosage, loc, log_scale, mask_logits = make_inputs(cells=3, n_pert=30)
    leaves = [t.clone().requires_grad_() for t in (loc, log_scale, mask_logits)]
    out = cpp(dosage, *leaves, particles=2)
    (out.z_p.sum() + out.embedding.sum() + out.mask.sum()).backward()
    untouched = torch.ones(loc.shape[0], dtype=torch.bool)
    untouched[out.index] = False
    for t in leaves:
        assert not t.grad[untouched].any()


def test_bad_inputs_raise_clear_errors():
    dosage, loc, log_scale, mask_logits = make_inputs()
    with pytest.raises(ValueError, match="sparse_csr"):
        cpp(dosage.to_dense(), loc, log_scale, mask_logits, particles=2)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        cpp(dosage, loc, log_scale, mask_logits, particles=2, temperature=0.0)


def _op_args(masked=True, scaled=True):
    dosage, loc, log_scale, mask_logits = make_inputs(cells=5, n_pert=8, latent=3)
    index, local_col = torch.unique(dosage.col_indices(), sorted=True, return_inverse=True)
    eps, unif = draw_noise(2, index.numel(), 3, dtype=loc.dtype, device="cpu",
                           generator=torch.Generator().manual_seed(0), masked=masked)
    return (dosage.crow_indices().clone(), local_col, dosage.values().detach().clone(), index,
            loc.requires_grad_(), log_scale.requires_grad_() if scaled else None,
            mask_logits.requires_grad_() if masked else None, eps, unif, 0.7)


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("scaled", [True, False])
def test_opcheck(masked, scaled):
    args = _op_args(masked, scaled)
    torch.library.opcheck(torch.ops.samsvae.masked_embedding_fwd.default, args)
    z, emb, mask, soft = torch.ops.samsvae.masked_embedding_fwd(*args)
    g = torch.Generator().manual_seed(2)
    grads = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in (z, emb, mask)]
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    crow, local_col, dose, index, loc, log_scale, mask_logits, eps, _, temperature = detached
    bwd_args = (grads[0], grads[1], grads[2] if masked else None, crow, local_col, dose, index,
                loc, log_scale, mask_logits, eps, emb.detach(), mask.detach(), soft.detach(),
                temperature)
    torch.library.opcheck(torch.ops.samsvae.masked_embedding_bwd.default, bwd_args)


def test_gradcheck_without_mask():
    # the straight-through mask gradient is not the derivative of the hard mask, so gradcheck
    # applies to the reparameterised embedding only (the mask path is checked against the
    # reference above)
    args = _op_args(masked=False)
    crow, local_col, dose, index, loc, log_scale, _, eps, _, temperature = args

    def f(lo, ls):
        return torch.ops.samsvae.masked_embedding_fwd(crow, local_col, dose, index, lo, ls, None,
                                                      eps, None, temperature)[:2]
    assert torch.autograd.gradcheck(f, (loc, log_scale))


def test_torch_compile_matches_eager():
    dosage, loc, log_scale, mask_logits = make_inputs(cells=6, n_pert=9, latent=4)

    def loss(d, lo, ls, ml, seed):
        out = masked_embedding_sum(d, lo, ls, ml, particles=2, backend="cpp",
                                   generator=torch.Generator().manual_seed(seed))
        return out.z_p.square().sum() + out.embedding.sum() + out.mask.sum()

    want = loss(dosage, loc, log_scale, mask_logits, 3)
    got = torch.compile(loss)(dosage, loc, log_scale, mask_logits, 3)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    args = _op_args()
    op = lambda *a: torch.ops.samsvae.masked_embedding_fwd(*a)[0].sum()  # noqa: E731
    # inductor may sum in another order
    torch.testing.assert_close(torch.compile(op, fullgraph=True)(*args), op(*args), rtol=1e-12,
                               atol=0)


def test_auto_backend_on_cpu_is_cpp():
    assert backends.resolve("masked_embedding_sum", "auto", "cpu")[0] == "cpp"
