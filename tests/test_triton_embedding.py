"""Triton masked embedding composition (samsvae/ops/_triton_embedding_kernels.py) against the
float64 reference with the same noise, forward and all gradients.

Runs under the Triton CPU interpreter without CUDA (tiny shapes); CUDA-only tests at the end.
Accuracy rule as in test_triton_nb.py: kernel error <= 2 x float32 reference error + one
float32 ulp of the result's size (Euclidean norms over each tensor).
"""
import pytest
import torch

triton = pytest.importorskip("triton")

from samsvae.ops import _triton_embedding_kernels as K  # noqa: E402
from samsvae.ops.masked_embedding import (batch_perturbations, draw_noise,  # noqa: E402
                                          masked_embedding_sum,
                                          masked_embedding_sum_reference)

EPS32 = torch.finfo(torch.float32).eps
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter runs CPU tensors
pytestmark = [pytest.mark.filterwarnings("ignore:divide by zero encountered"),
              pytest.mark.filterwarnings("ignore:invalid value encountered"),
              pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")]

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


def test_same_generator_state_gives_the_reference_sample():
    kernel = _evaluate(K.masked_embedding_sum_triton, torch.float32, True, True)
    ref = _evaluate(masked_embedding_sum_reference, torch.float32, True, True)
    assert torch.equal(kernel[2], ref[2])  # identical hard masks
    for k, r in zip(kernel[:2], ref[:2]):
        assert torch.allclose(k, r, rtol=1e-6, atol=1e-6)


def test_all_control_batch():
    dosage = torch.zeros(4, T, device=DEVICE).to_sparse_csr()
    loc, log_scale, logits = [t.requires_grad_() for t in _params(1)]
    out = K.masked_embedding_sum_triton(dosage, loc, log_scale, logits, particles=2)
    assert out.z_p.shape == (2, 4, L) and (out.z_p == 0).all()
    assert out.embedding.shape == (2, 0, L) and out.mask.shape == (2, 0, L)
    assert out.index.numel() == 0
    out.z_p.sum().backward()
    assert (loc.grad == 0).all() and (logits.grad == 0).all()


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


# ----------------------------------------------------------------------------- CUDA only

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


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


@cuda
def test_cuda_opcheck():
    dosage = _dosage().cuda()
    loc, log_scale, logits = [t.cuda().requires_grad_() for t in _params(5)]
    index, local_col, _, dose = batch_perturbations(dosage)
    eps, u = draw_noise(P, index.numel(), L, dtype=torch.float32, device="cuda")
    torch.library.opcheck(K._fwd_op, (index, local_col, dosage.crow_indices(), dose, eps, u,
                                      loc, log_scale, logits, TEMPERATURE))
