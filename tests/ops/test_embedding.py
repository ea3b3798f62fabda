"""masked_embedding_sum on every tier: the reference against a dense composition, the C++
kernels (csrc/embedding/, per ISA) and the Triton kernels against the float64 reference with
the same noise, forward and all gradients.

Triton runs under the CPU interpreter without CUDA (tiny shapes); CUDA-only tests at the end.
Accuracy rule as in test_nb.py: kernel error <= 2 x float32 reference error + one float32 ulp
of the result's size (Euclidean norms over each tensor).
"""
import pytest
import torch
from helpers import CPU_ISAS, HAS_TRITON, INTERPRETER_WARNINGS, needs_cpp, needs_triton

from samsvae import ops
from samsvae.ops import backends, masked_embedding_sum
from samsvae.ops.embedding import batch_perturbations, draw_noise, masked_embedding_sum_reference

if HAS_TRITON:
    from samsvae.ops.embedding import triton as K
pytestmark = INTERPRETER_WARNINGS


# ------------------------------------------------------------ ops_reference


def dosage_batch():
    # cell 0: one perturbation, cell 1: none, cell 2: five (real-valued dosages), cell 3: two
    dense = torch.zeros(4, 8, dtype=torch.float64)
    dense[0, 3] = 1
    dense[2, [0, 1, 3, 5, 7]] = torch.tensor([1.0, 0.5, 2.0, 1.0, 1.0], dtype=torch.float64)
    dense[3, [1, 6]] = 1
    return dense


@pytest.mark.parametrize("masked", [True, False])
def test_masked_embedding_reference_equals_dense_composition(masked):
    dense = dosage_batch()
    T, L, P = 8, 3, 2
    g = torch.Generator().manual_seed(1)
    loc, log_scale, mlog = (torch.randn(T, L, dtype=torch.float64, generator=g) for _ in range(3))
    out = masked_embedding_sum_reference(dense.to_sparse_csr(), loc, log_scale, mlog if masked else None,
                                         particles=P, generator=torch.Generator().manual_seed(5))
    assert out.index.tolist() == [0, 1, 3, 5, 6, 7]
    # redraw the same noise and compose densely over ALL perturbations
    eps, u = ops.draw_noise(P, 6, L, dtype=torch.float64, device="cpu",
                            generator=torch.Generator().manual_seed(5), masked=masked)
    E = torch.zeros(P, T, L, dtype=torch.float64)
    E[:, out.index] = loc[out.index] + log_scale[out.index].exp() * eps
    M = torch.ones(P, T, L, dtype=torch.float64)
    if masked:
        logistic = u.log() - (-u).log1p()
        M[:, out.index] = ((mlog[out.index] + logistic) > 0).double()
    expected = torch.einsum("ct,ptl->pcl", dense, E * M)
    torch.testing.assert_close(out.z_p, expected)
    assert (out.z_p[:, 1] == 0).all()          # the cell without perturbation
    torch.testing.assert_close(out.embedding, E[:, out.index])


def test_masked_embedding_reference_gradcheck_and_straight_through():
    dense = dosage_batch()
    T, L = 8, 2
    g = torch.Generator().manual_seed(2)
    loc, log_scale, mlog = (torch.randn(T, L, dtype=torch.float64, generator=g).requires_grad_(True)
                            for _ in range(3))

    def f(a, b, c):
        s = masked_embedding_sum_reference(dense.to_sparse_csr(), a, b, c, particles=2,
                                           generator=torch.Generator().manual_seed(0))
        return s.z_p, s.mask
    # exact derivatives in loc and log_scale (the hard mask is piecewise constant in the logits)
    assert torch.autograd.gradcheck(lambda a, b: f(a, b, mlog.detach())[0], (loc, log_scale))
    z, mask = f(loc, log_scale, mlog)
    assert set(mask.detach().unique().tolist()) <= {0.0, 1.0}
    z.sum().backward()
    untouched = [2, 4]   # perturbations that no cell in the batch carries get no gradient
    assert (loc.grad[untouched] == 0).all() and (mlog.grad[untouched] == 0).all()
    # straight-through: the logits' gradient is that of the relaxed (soft) sample
    P, index = 2, torch.tensor([0, 1, 3, 5, 6, 7])
    gen = torch.Generator().manual_seed(0)
    eps, u = ops.draw_noise(P, 6, L, dtype=torch.float64, device="cpu", generator=gen)
    c = mlog.detach().clone().requires_grad_(True)
    soft = torch.sigmoid(c[index] + u.log() - (-u).log1p())
    emb = (loc[index] + log_scale[index].exp() * eps).detach()
    weight = torch.einsum("ct->t", dense)[index]          # d z.sum() / d (e*m) per perturbation
    (soft * emb * weight[None, :, None]).sum().backward()
    torch.testing.assert_close(mlog.grad, c.grad)


def test_perturbation_sum_matches_dense():
    dense = dosage_batch()
    index = torch.tensor([0, 1, 3, 5, 6, 7])
    values = torch.randn(3, 6, 4, dtype=torch.float64)
    full = torch.zeros(3, 8, 4, dtype=torch.float64)
    full[:, index] = values
    torch.testing.assert_close(ops.perturbation_sum(dense.to_sparse_csr(), index, values),
                               torch.einsum("ct,ptl->pcl", dense, full))


# ------------------------------------------------------------ cpp_embedding


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


@needs_cpp
@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("scaled", [True, False], ids=["scaled", "point"])
@pytest.mark.parametrize("masked", [True, False], ids=["masked", "unmasked"])
def test_matches_reference(isa, dtype, scaled, masked):
    dosage, loc, log_scale, mask_logits = make_inputs(dtype=dtype)
    inputs = (dosage, loc, log_scale if scaled else None, mask_logits if masked else None)
    assert_matches_reference(inputs, rtol=1e-12 if dtype == torch.float64 else 2e-6)


@needs_cpp
@pytest.mark.parametrize("latent", [1, 17, 40])
@pytest.mark.parametrize("particles", [1, 4])
def test_odd_latent_sizes_and_particles(latent, particles):
    inputs = make_inputs(cells=9, n_pert=11, latent=latent, seed=latent)
    assert_matches_reference(inputs, rtol=1e-12, particles=particles, temperature=1.3)


@needs_cpp
def test_work_split_across_threads():
    # big enough for the perturbation- and cell-parallel loops to use two threads
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert_matches_reference(make_inputs(cells=300, n_pert=60, latent=64, seed=3), rtol=1e-12,
                                 particles=2)
    finally:
        torch.set_num_threads(before)


@needs_cpp
def test_cells_without_perturbations_get_zero():
    dosage, loc, log_scale, mask_logits = make_inputs()
    out = cpp(dosage, loc, log_scale, mask_logits, particles=2)
    empty = (dosage.crow_indices()[1:] == dosage.crow_indices()[:-1])
    assert empty.any()
    assert torch.equal(out.z_p[:, empty], torch.zeros_like(out.z_p[:, empty]))


@needs_cpp
def test_batch_without_any_perturbation():
    _, loc, log_scale, mask_logits = make_inputs()
    dosage = torch.zeros(4, loc.shape[0], dtype=loc.dtype).to_sparse_csr()
    out = cpp(dosage, loc, log_scale, mask_logits, particles=2)
    assert out.z_p.shape == (2, 4, loc.shape[1]) and not out.z_p.any()
    assert out.index.numel() == 0 and out.embedding.shape == (2, 0, loc.shape[1])


@needs_cpp
def test_gradients_only_touch_rows_in_the_batch():
    dosage, loc, log_scale, mask_logits = make_inputs(cells=3, n_pert=30)
    leaves = [t.clone().requires_grad_() for t in (loc, log_scale, mask_logits)]
    out = cpp(dosage, *leaves, particles=2)
    (out.z_p.sum() + out.embedding.sum() + out.mask.sum()).backward()
    untouched = torch.ones(loc.shape[0], dtype=torch.bool)
    untouched[out.index] = False
    for t in leaves:
        assert not t.grad[untouched].any()


@needs_cpp
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


@needs_cpp
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


@needs_cpp
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


@needs_cpp
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


@needs_cpp
def test_auto_backend_on_cpu_is_cpp():
    assert backends.resolve("masked_embedding_sum", "auto", "cpu")[0] == "cpp"


# ------------------------------------------------------------ triton_embedding


EPS32 = torch.finfo(torch.float32).eps


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter runs CPU tensors


C, T, L, P = 7, 12, 5, 3


TEMPERATURE = 0.7


def _dosage(dtype=torch.float32):
    """(C, T) CSR dosage: a control cell (empty row), a cell with five perturbations, real
    dosages, and perturbation columns 0, 5, 6, 10 that no cell of the batch carries."""
    d = torch.zeros(C, T)
    d[1, 2] = 1.0
    d[2, [1, 3, 4, 7, 8]] = torch.tensor([1.0, 0.5, 2.0, 1.0, 1.0])
    d[3, 2] = 1.0
    d[4, 8] = 1.5
    d[5, [4, 11]] = 1.0
    d[6, 9] = 1.0
    return d.to(DEVICE, dtype).to_sparse_csr()


def _params(seed):
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(T, L, generator=g)
    log_scale = 0.5 * torch.randn(T, L, generator=g) - 1.0
    logits = 2.0 * torch.randn(T, L, generator=g)
    return [t.to(DEVICE) for t in (loc, log_scale, logits)]


def _evaluate(fn, dtype, use_scale, use_mask, seed=0):
    """Sample with generator seed 3, back-propagate random projections of z, embedding and
    mask; returns (z, embedding, mask, d loc, d log_scale, d mask_logits) (None if absent)."""
    loc, log_scale, logits = _params(seed)
    leaves = [loc.to(dtype).requires_grad_(),
              log_scale.to(dtype).requires_grad_() if use_scale else None,
              logits.to(dtype).requires_grad_() if use_mask else None]
    out = fn(_dosage(dtype), *leaves, particles=P, temperature=TEMPERATURE,
             generator=torch.Generator(DEVICE).manual_seed(3))
    g = torch.Generator().manual_seed(5)
    loss = sum((t * torch.randn(t.shape, generator=g).to(t.device, dtype)).sum()
               for t in (out.z_p, out.embedding, out.mask) if t is not None)
    loss.backward()
    grads = [None if t is None else t.grad for t in leaves]
    return [out.z_p.detach(), out.embedding.detach(),
            None if out.mask is None else out.mask.detach()] + grads


def _reference_same_noise(dtype):
    """The reference in ``dtype`` fed the float32 noise the kernel draws (float64 noise from
    the same generator would be other numbers)."""
    def fn(dosage, loc, log_scale, logits, *, particles, temperature, generator):
        index, *_ = batch_perturbations(dosage)
        eps, u = draw_noise(particles, index.numel(), loc.shape[-1], dtype=torch.float32,
                            device=loc.device, generator=generator, masked=logits is not None)
        noise = (eps.to(dtype), None if u is None else u.to(dtype))
        return masked_embedding_sum_reference(dosage, loc, log_scale, logits,
                                              particles=particles, temperature=temperature,
                                              noise=noise)
    return fn


NAMES = ("z_p", "embedding", "mask", "d emb_loc", "d emb_log_scale", "d mask_logits")


@needs_triton
@pytest.mark.parametrize("use_scale,use_mask", [(True, True), (True, False), (False, True),
                                                (False, False)])
def test_matches_float64_reference(use_scale, use_mask):
    kernel = _evaluate(K.masked_embedding_sum_triton, torch.float32, use_scale, use_mask)
    ref64 = _evaluate(_reference_same_noise(torch.float64), torch.float64, use_scale, use_mask)
    ref32 = _evaluate(_reference_same_noise(torch.float32), torch.float32, use_scale, use_mask)
    for name, k, r32, r64 in zip(NAMES, kernel, ref32, ref64):
        assert (k is None) == (r64 is None), name
        if k is None:
            continue
        assert k.shape == r64.shape, name
        err_k = (k.double() - r64).norm().item()
        err_r = (r32.double() - r64).norm().item()
        assert err_k <= 2 * err_r + EPS32 * r64.norm().item(), (name, err_k, err_r)
    z = kernel[0]
    assert (z[:, 0] == 0).all()  # the control cell
    # gradient rows of perturbations absent from the batch stay exactly zero
    absent = [0, 5, 6, 10]
    for grad in kernel[3:]:
        if grad is not None:
            assert (grad[absent] == 0).all() and (grad.abs().sum(1) > 0).sum() > 0
    if use_mask:
        assert set(kernel[2].unique().tolist()) <= {0.0, 1.0}


@needs_triton
def test_same_generator_state_gives_the_reference_sample():
    kernel = _evaluate(K.masked_embedding_sum_triton, torch.float32, True, True)
    ref = _evaluate(masked_embedding_sum_reference, torch.float32, True, True)
    assert torch.equal(kernel[2], ref[2])  # identical hard masks
    for k, r in zip(kernel[:2], ref[:2]):
        assert torch.allclose(k, r, rtol=1e-6, atol=1e-6)


@needs_triton
def test_all_control_batch():
    dosage = torch.zeros(4, T, device=DEVICE).to_sparse_csr()
    loc, log_scale, logits = [t.requires_grad_() for t in _params(1)]
    out = K.masked_embedding_sum_triton(dosage, loc, log_scale, logits, particles=2)
    assert out.z_p.shape == (2, 4, L) and (out.z_p == 0).all()
    assert out.embedding.shape == (2, 0, L) and out.mask.shape == (2, 0, L)
    assert out.index.numel() == 0
    out.z_p.sum().backward()
    assert (loc.grad == 0).all() and (logits.grad == 0).all()


@needs_triton
def test_float64_goes_to_the_reference_and_bad_temperature_is_named():
    loc, log_scale, logits = [t.double() for t in _params(2)]
    kw = dict(particles=2, temperature=0.5)
    a = K.masked_embedding_sum_triton(_dosage(torch.float64), loc, log_scale, logits, **kw,
                                      generator=torch.Generator(DEVICE).manual_seed(0))
    b = masked_embedding_sum_reference(_dosage(torch.float64), loc, log_scale, logits, **kw,
                                       generator=torch.Generator(DEVICE).manual_seed(0))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="temperature"):
        K.masked_embedding_sum_triton(_dosage(), *_params(2), particles=1, temperature=0.0)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_triton
@cuda
def test_cuda_registered_backend_matches_reference():
    dosage = _dosage().cuda()
    loc, log_scale, logits = [t.cuda().requires_grad_() for t in _params(4)]
    out = masked_embedding_sum(dosage, loc, log_scale, logits, particles=P,
                               temperature=TEMPERATURE, backend="triton",
                               generator=torch.Generator("cuda").manual_seed(0))
    ref = masked_embedding_sum_reference(dosage, loc, log_scale, logits, particles=P,
                                         temperature=TEMPERATURE,
                                         generator=torch.Generator("cuda").manual_seed(0))
    assert torch.equal(out.mask, ref.mask)
    assert torch.allclose(out.z_p, ref.z_p, rtol=1e-5, atol=1e-5)
    g_k = torch.autograd.grad(out.z_p.square().sum(), (loc, log_scale, logits))
    g_r = torch.autograd.grad(ref.z_p.square().sum(), (loc, log_scale, logits))
    for a, b in zip(g_k, g_r):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * (1 + b.abs().max().item()))


@needs_triton
@cuda
def test_cuda_opcheck():
    dosage = _dosage().cuda()
    loc, log_scale, logits = [t.cuda().requires_grad_() for t in _params(5)]
    index, local_col, _, dose = batch_perturbations(dosage)
    eps, u = draw_noise(P, index.numel(), L, dtype=torch.float32, device="cuda")
    # contiguous copies: opcheck must not see views into the sparse tensor
    torch.library.opcheck(K._fwd_op, (index, local_col, dosage.crow_indices().contiguous(),
                                      dose.clone(), eps, u,
                                      loc, log_scale, logits, TEMPERATURE))
