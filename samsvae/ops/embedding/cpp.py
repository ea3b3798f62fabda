"""The ``cpp`` tier of :func:`samsvae.ops.masked_embedding_sum`: fused C++ CPU kernels.

The kernels (``csrc/embedding/``) are registered by ``samsvae._C`` as the custom ops

* ``samsvae::masked_embedding_fwd(crow, local_col, dose, index, emb_loc, emb_log_scale?,
  mask_logits?, eps, unif?, temperature) -> (z_p, embedding, mask, soft)``
* ``samsvae::masked_embedding_bwd(grad_z, grad_embedding?, grad_mask?, crow, local_col, dose,
  index, emb_loc, emb_log_scale?, mask_logits?, eps, embedding, mask, soft, temperature)
  -> (grad_emb_loc, grad_emb_log_scale, grad_mask_logits)``

Python keeps what must be identical across backends: the batch's perturbation ids
(``torch.unique`` of the dosage columns) and the noise (:func:`draw_noise` on the caller's
generator), so every backend sees the same random numbers. ``mask``/``soft`` and the
gradients of absent inputs are empty ``(0,)`` tensors at the op level.
"""
from __future__ import annotations

import torch

from .. import backends
from ..cpp_extension import CPP_DTYPES, ext_available, why_unavailable
from ..csr import kernel_parts
from .reference import EmbeddingSample, batch_perturbations, draw_noise


@torch.library.register_fake("samsvae::masked_embedding_fwd")
def _fwd_fake(crow, local_col, dose, index, emb_loc, emb_log_scale, mask_logits, eps, unif,
              temperature):
    P, U, L = eps.shape
    C = crow.shape[0] - 1
    z = emb_loc.new_empty((P, C, L))
    emb = emb_loc.new_empty((P, U, L))
    if mask_logits is None:
        return z, emb, emb_loc.new_empty((0,)), emb_loc.new_empty((0,))
    return z, emb, emb_loc.new_empty((P, U, L)), emb_loc.new_empty((P, U, L))


@torch.library.register_fake("samsvae::masked_embedding_bwd")
def _bwd_fake(grad_z, grad_embedding, grad_mask, crow, local_col, dose, index, emb_loc,
              emb_log_scale, mask_logits, eps, embedding, mask, soft, temperature):
    def like(t):
        return torch.empty_like(emb_loc) if t is not None else emb_loc.new_empty((0,))
    return torch.empty_like(emb_loc), like(emb_log_scale), like(mask_logits)


def _setup(ctx, inputs, output):
    (crow, local_col, dose, index, emb_loc, emb_log_scale, mask_logits, eps, unif,
     temperature) = inputs
    _, emb, mask, soft = output
    ctx.save_for_backward(crow, local_col, dose, index, emb_loc, emb_log_scale, mask_logits, eps,
                          emb, mask, soft)
    ctx.temperature = temperature
    ctx.mark_non_differentiable(soft)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_z, grad_emb, grad_mask, _grad_soft):
    (crow, local_col, dose, index, emb_loc, emb_log_scale, mask_logits, eps, emb, mask,
     soft) = ctx.saved_tensors
    if grad_z is None:
        grad_z = emb.new_zeros((eps.shape[0], crow.shape[0] - 1, eps.shape[2]))
    g_loc, g_ls, g_ml = torch.ops.samsvae.masked_embedding_bwd(
        grad_z.contiguous(), None if grad_emb is None else grad_emb.contiguous(),
        None if grad_mask is None or mask_logits is None else grad_mask.contiguous(),
        crow, local_col, dose, index, emb_loc, emb_log_scale, mask_logits, eps, emb, mask, soft,
        ctx.temperature)
    need = ctx.needs_input_grad
    return (None, None, None, None, g_loc if need[4] else None,
            g_ls if emb_log_scale is not None and need[5] else None,
            g_ml if mask_logits is not None and need[6] else None, None, None, None)


torch.library.register_autograd("samsvae::masked_embedding_fwd", _backward, setup_context=_setup)


def _no_setup(ctx, inputs, output):
    return None


def _no_double_backward(ctx, *grads):
    raise RuntimeError("masked_embedding_sum with backend='cpp' has no second derivative; use "
                       "backend='reference' for double backward")


torch.library.register_autograd("samsvae::masked_embedding_bwd", _no_double_backward,
                                setup_context=_no_setup)


def masked_embedding_sum_cpp(dosage, emb_loc, emb_log_scale, mask_logits, *, particles,
                             temperature=1.0, generator=None, index=None):
    """C++ CPU implementation of :func:`samsvae.ops.masked_embedding_sum` (same signature,
    same noise for the same generator state, same :class:`EmbeddingSample`)."""
    if dosage.layout != torch.sparse_csr:
        raise ValueError(f"dosage must be a torch.sparse_csr tensor (cells x perturbations), "
                         f"got layout {dosage.layout}; convert it with .to_sparse_csr()")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    out_dtype = emb_loc.dtype
    dtype = out_dtype if out_dtype in CPP_DTYPES else torch.float32
    crow, _, dose = kernel_parts(dosage, dtype)
    index, local_col, _, _ = batch_perturbations(dosage, index)
    masked = mask_logits is not None
    eps, unif = draw_noise(particles, index.numel(), emb_loc.shape[-1], dtype=out_dtype,
                           device=emb_loc.device, generator=generator, masked=masked)

    def prep(t):
        return None if t is None else t.to(dtype).contiguous()

    z, emb, mask, _soft = torch.ops.samsvae.masked_embedding_fwd(
        crow, local_col.to(torch.int64).contiguous(), dose, index.to(torch.int64).contiguous(), prep(emb_loc), prep(emb_log_scale),
        prep(mask_logits), prep(eps), prep(unif), float(temperature))
    if dtype != out_dtype:
        z, emb, mask = z.to(out_dtype), emb.to(out_dtype), mask.to(out_dtype)
    return EmbeddingSample(z, index, emb, mask if masked else None)


backends.register("masked_embedding_sum", "cpp", masked_embedding_sum_cpp, devices=("cpu",),
                  available=ext_available, why_unavailable=why_unavailable)
