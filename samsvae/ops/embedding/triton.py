"""The ``triton`` tier of :func:`samsvae.ops.masked_embedding_sum`: kernels, launchers, autograd.

Imported on the first call (it imports triton): :mod:`samsvae.ops.embedding` registers
:func:`masked_embedding_sum_triton` by name.

For the U perturbations present in a batch (``index``), particles p and latent dims l::

    e[p, u]    = loc[t] + exp(log_scale[t]) * eps[p, u]                      t = index[u]
    soft[p, u] = sigmoid((mask_logit[t] + log(v) - log(1 - v)) / temperature),  v = noise
    m[p, u]    = 1[soft > 1/2]        (straight-through: the gradient flows as if m = soft)
    z[p, i]    = sum_{k in row i of the dosage} d_k * e[p, u_k] * m[p, u_k]

``_sample_kernel`` writes e and m (P, U, L); ``_compose_kernel`` sums them per cell from the CSR
dosage (one program per cell, particle and latent block). The backward runs one program per
(perturbation, latent block): it gathers dz over the perturbation's cells (a CSC copy of the
batch's few non-zeros, so no atomics and a deterministic result), adds the direct gradients of
e and m, reduces over particles and writes the perturbation's rows of d loc, d log_scale and
d mask_logits (the ids in ``index`` are unique, so each row has a single writer).

The noise is drawn outside, by :func:`samsvae.ops.embedding.draw_noise`, exactly as the
reference draws it. Math is float32.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import triton_math as tm
from ..triton_support import next_power_of_2, triton_op, wrap_triton
from .reference import (EmbeddingSample, batch_perturbations, draw_noise,
                        masked_embedding_sum_reference)


@triton.jit
def _relaxed_mask(logit, v, temperature):
    """(hard {0,1}, soft) relaxed Bernoulli sample from uniform noise v in (0, 1)."""
    logistic = tl.log(v) - tm.log1p(-v)
    soft, _ = tm.sigmoid_pair((logit + logistic) / temperature)
    return tl.where(soft > 0.5, 1.0, 0.0), soft


@triton.jit
def _sample_kernel(index_ptr, loc_ptr, log_scale_ptr, mask_logit_ptr, eps_ptr, v_ptr,
                   emb_ptr, mask_ptr, n_pert, latent, temperature,
                   HAS_SCALE: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_L: tl.constexpr):
    pu = tl.program_id(0)  # particle * U + u
    l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    lm = l < latent
    t = tl.load(index_ptr + pu % n_pert).to(tl.int64)
    src = t * latent + l
    dst = pu.to(tl.int64) * latent + l
    e = tl.load(loc_ptr + src, mask=lm, other=0.0).to(tl.float32)
    if HAS_SCALE:
        sigma = tm.exp_acc(tl.load(log_scale_ptr + src, mask=lm, other=0.0).to(tl.float32))
        e += sigma * tl.load(eps_ptr + dst, mask=lm, other=0.0).to(tl.float32)
    tl.store(emb_ptr + dst, e, mask=lm)
    if HAS_MASK:
        logit = tl.load(mask_logit_ptr + src, mask=lm, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + dst, mask=lm, other=0.5).to(tl.float32)
        hard, soft = _relaxed_mask(logit, v, temperature)
        # a NaN logit gives a NaN mask (as the reference's hard + soft - soft), not a hard 0
        tl.store(mask_ptr + dst, tl.where(soft == soft, hard, soft), mask=lm)


@triton.jit
def _compose_kernel(crow_ptr, local_col_ptr, dose_ptr, emb_ptr, mask_ptr, z_ptr,
                    n_cells, n_pert, latent,
                    HAS_MASK: tl.constexpr, BLOCK_L: tl.constexpr):
    cell = tl.program_id(0)
    p = tl.program_id(1)
    l = tl.program_id(2) * BLOCK_L + tl.arange(0, BLOCK_L)
    lm = l < latent
    start = tl.load(crow_ptr + cell).to(tl.int64)
    end = tl.load(crow_ptr + cell + 1).to(tl.int64)
    acc = tl.zeros([BLOCK_L], tl.float32)
    for k in range(start, end):
        u = tl.load(local_col_ptr + k).to(tl.int64)
        d = tl.load(dose_ptr + k).to(tl.float32)
        off = (p.to(tl.int64) * n_pert + u) * latent + l
        v = tl.load(emb_ptr + off, mask=lm, other=0.0)
        if HAS_MASK:
            v *= tl.load(mask_ptr + off, mask=lm, other=0.0)
        acc += d * v
    # int64 before the product: p * n_cells + cell passes 2^31 at large particle counts
    tl.store(z_ptr + (p.to(tl.int64) * n_cells + cell) * latent + l, acc, mask=lm)


@triton.jit
def _embedding_bwd_kernel(gz_ptr, gemb_ptr, gmask_ptr,
                          index_ptr, ccol_ptr, csc_row_ptr, csc_dose_ptr,
                          emb_ptr, mask_ptr, eps_ptr, v_ptr,
                          log_scale_ptr, mask_logit_ptr,
                          dloc_ptr, dlog_scale_ptr, dmask_logit_ptr,
                          n_particles, n_cells, n_pert, latent, temperature,
                          HAS_SCALE: tl.constexpr, HAS_MASK: tl.constexpr,
                          HAS_GZ: tl.constexpr, HAS_GEMB: tl.constexpr, HAS_GMASK: tl.constexpr,
                          BLOCK_L: tl.constexpr):
    u = tl.program_id(0)
    l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    lm = l < latent
    t = tl.load(index_ptr + u).to(tl.int64)
    src = t * latent + l
    start = tl.load(ccol_ptr + u).to(tl.int64)
    end = tl.load(ccol_ptr + u + 1).to(tl.int64)
    if HAS_SCALE:
        sigma = tm.exp_acc(tl.load(log_scale_ptr + src, mask=lm, other=0.0).to(tl.float32))
    if HAS_MASK:
        logit = tl.load(mask_logit_ptr + src, mask=lm, other=0.0).to(tl.float32)
    acc_loc = tl.zeros([BLOCK_L], tl.float32)
    acc_scale = tl.zeros([BLOCK_L], tl.float32)
    acc_logit = tl.zeros([BLOCK_L], tl.float32)
    for p in range(n_particles):
        pu = (p * n_pert + u).to(tl.int64) * latent + l
        dv = tl.zeros([BLOCK_L], tl.float32)  # d z / d (e * m) gathered over the cells of u
        if HAS_GZ:
            for k in range(start, end):
                cell = tl.load(csc_row_ptr + k).to(tl.int64)
                d = tl.load(csc_dose_ptr + k).to(tl.float32)
                dv += d * tl.load(gz_ptr + (p * n_cells + cell) * latent + l, mask=lm,
                                  other=0.0).to(tl.float32)
        e = tl.load(emb_ptr + pu, mask=lm, other=0.0)
        if HAS_MASK:
            de = dv * tl.load(mask_ptr + pu, mask=lm, other=0.0)
        else:
            de = dv
        if HAS_GEMB:
            de += tl.load(gemb_ptr + pu, mask=lm, other=0.0).to(tl.float32)
        acc_loc += de
        if HAS_SCALE:
            acc_scale += de * sigma * tl.load(eps_ptr + pu, mask=lm, other=0.0).to(tl.float32)
        if HAS_MASK:
            dm = dv * e
            if HAS_GMASK:
                dm += tl.load(gmask_ptr + pu, mask=lm, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + pu, mask=lm, other=0.5).to(tl.float32)
            _, soft = _relaxed_mask(logit, v, temperature)
            acc_logit += dm * soft * (1.0 - soft) / temperature
    tl.store(dloc_ptr + src, acc_loc, mask=lm)
    if HAS_SCALE:
        tl.store(dlog_scale_ptr + src, acc_scale, mask=lm)
    if HAS_MASK:
        tl.store(dmask_logit_ptr + src, acc_logit, mask=lm)


# ----------------------------------------------------------------------------- launchers


def _block_l(latent: int) -> int:
    return min(next_power_of_2(latent), 1024)


def _dummy(device):
    return torch.empty(1, dtype=torch.float32, device=device)


def _forward_impl(index: torch.Tensor, local_col: torch.Tensor, crow: torch.Tensor,
                  dose: torch.Tensor, eps: torch.Tensor, noise_u: Optional[torch.Tensor],
                  emb_loc: torch.Tensor, emb_log_scale: Optional[torch.Tensor],
                  mask_logits: Optional[torch.Tensor], temperature: float,
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (z (P, C, L), embedding (P, U, L), mask (P, U, L); mask is (0,) if unmasked),
    all float32."""
    n_particles, n_pert, latent = eps.shape
    n_cells = crow.shape[0] - 1
    device = emb_loc.device
    has_mask = mask_logits is not None
    emb = torch.empty(n_particles, n_pert, latent, dtype=torch.float32, device=device)
    mask = (torch.empty_like(emb) if has_mask
            else torch.empty(0, dtype=torch.float32, device=device))
    z = torch.empty(n_particles, n_cells, latent, dtype=torch.float32, device=device)
    block = _block_l(latent)
    n_lblk = triton.cdiv(latent, block)
    if n_particles * n_pert * latent > 0:
        wrap_triton(_sample_kernel)[(n_particles * n_pert, n_lblk)](
            index, emb_loc, emb_log_scale if emb_log_scale is not None else _dummy(device),
            mask_logits if has_mask else _dummy(device), eps,
            noise_u if has_mask else _dummy(device), emb, mask if has_mask else _dummy(device),
            n_pert, latent, temperature,
            HAS_SCALE=emb_log_scale is not None, HAS_MASK=has_mask, BLOCK_L=block)
    if n_particles * n_cells * latent > 0:
        wrap_triton(_compose_kernel)[(n_cells, n_particles, n_lblk)](
            crow, local_col, dose, emb, mask if has_mask else _dummy(device), z,
            n_cells, n_pert, latent, HAS_MASK=has_mask, BLOCK_L=block)
    return z, emb, mask


def _csc(local_col: torch.Tensor, crow: torch.Tensor, dose: torch.Tensor, n_pert: int):
    """Column pointers (U + 1,), row ids and doses of the batch's non-zeros sorted by column."""
    nnz = local_col.numel()
    n_cells = crow.numel() - 1
    rows = torch.repeat_interleave(torch.arange(n_cells, device=crow.device), crow.diff(),
                                   output_size=nnz)
    order = torch.argsort(local_col, stable=True)
    ccol = torch.zeros(n_pert + 1, dtype=torch.int64, device=crow.device)
    ccol.index_add_(0, local_col + 1, torch.ones_like(local_col))
    return ccol.cumsum(0), rows[order], dose[order]


def _backward_impl(grad_z: Optional[torch.Tensor], grad_emb: Optional[torch.Tensor],
                   grad_mask: Optional[torch.Tensor], index: torch.Tensor,
                   local_col: torch.Tensor, crow: torch.Tensor, dose: torch.Tensor,
                   emb: torch.Tensor, mask: torch.Tensor, eps: torch.Tensor,
                   noise_u: Optional[torch.Tensor], emb_loc: torch.Tensor,
                   emb_log_scale: Optional[torch.Tensor], mask_logits: Optional[torch.Tensor],
                   temperature: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (d emb_loc, d emb_log_scale, d mask_logits), each (T, L) float32, or (0,) for
    an absent log_scale / mask_logits."""
    n_particles, n_pert, latent = emb.shape
    n_cells = crow.shape[0] - 1
    device = emb_loc.device
    has_scale, has_mask = emb_log_scale is not None, mask_logits is not None

    def zeros(present):
        return torch.zeros(emb_loc.shape if present else (0,), dtype=torch.float32,
                           device=device)

    dloc, dscale, dlogit = zeros(True), zeros(has_scale), zeros(has_mask)
    if n_pert * latent == 0:
        return dloc, dscale, dlogit
    ccol, csc_rows, csc_dose = _csc(local_col, crow, dose, n_pert)
    block = _block_l(latent)
    dummy = _dummy(device)
    wrap_triton(_embedding_bwd_kernel)[(n_pert, triton.cdiv(latent, block))](
        grad_z if grad_z is not None else dummy,
        grad_emb if grad_emb is not None else dummy,
        grad_mask if grad_mask is not None else dummy,
        index, ccol, csc_rows, csc_dose, emb, mask if has_mask else dummy, eps,
        noise_u if has_mask else dummy,
        emb_log_scale if has_scale else dummy, mask_logits if has_mask else dummy,
        dloc, dscale if has_scale else dummy, dlogit if has_mask else dummy,
        n_particles, n_cells, n_pert, latent, temperature,
        HAS_SCALE=has_scale, HAS_MASK=has_mask, HAS_GZ=grad_z is not None,
        HAS_GEMB=grad_emb is not None, HAS_GMASK=grad_mask is not None and has_mask,
        BLOCK_L=block)
    return dloc, dscale, dlogit


if triton_op is not None:
    _fwd_op = triton_op("samsvae::triton_masked_embedding_sum", mutates_args=())(_forward_impl)
    _bwd_op = triton_op("samsvae::triton_masked_embedding_sum_backward",
                         mutates_args=())(_backward_impl)

    def _setup_context(ctx, inputs, output):
        index, local_col, crow, dose, eps, noise_u, loc, log_scale, mask_logits, temp = inputs
        _, emb, mask = output
        ctx.temperature = temp
        ctx.save_for_backward(index, local_col, crow, dose, emb, mask, eps, noise_u, loc,
                              log_scale, mask_logits)

    def _backward(ctx, grad_z, grad_emb, grad_mask):
        (index, local_col, crow, dose, emb, mask, eps, noise_u, loc, log_scale,
         mask_logits) = ctx.saved_tensors
        dloc, dscale, dlogit = _bwd_op(
            _contiguous(grad_z), _contiguous(grad_emb), _contiguous(grad_mask),
            index, local_col, crow, dose, emb, mask, eps, noise_u, loc, log_scale,
            mask_logits, ctx.temperature)
        return (None, None, None, None, None, None, dloc.to(loc.dtype),
                dscale.to(log_scale.dtype) if log_scale is not None else None,
                dlogit.to(mask_logits.dtype) if mask_logits is not None else None, None)

    _fwd_op.register_autograd(_backward, setup_context=_setup_context)

    def _apply(*args):
        return _fwd_op(*args)
else:  # pragma: no cover
    class _EmbeddingFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            out = _forward_impl(*args)
            index, local_col, crow, dose, eps, noise_u, loc, log_scale, mask_logits, temp = args
            ctx.temperature = temp
            ctx.save_for_backward(index, local_col, crow, dose, out[1], out[2], eps, noise_u,
                                  loc, log_scale, mask_logits)
            return out

        @staticmethod
        def backward(ctx, grad_z, grad_emb, grad_mask):
            (index, local_col, crow, dose, emb, mask, eps, noise_u, loc, log_scale,
             mask_logits) = ctx.saved_tensors
            dloc, dscale, dlogit = _backward_impl(
                _contiguous(grad_z), _contiguous(grad_emb), _contiguous(grad_mask), index,
                local_col, crow, dose, emb, mask, eps, noise_u, loc, log_scale, mask_logits,
                ctx.temperature)
            return (None, None, None, None, None, None, dloc.to(loc.dtype),
                    dscale.to(log_scale.dtype) if log_scale is not None else None,
                    dlogit.to(mask_logits.dtype) if mask_logits is not None else None, None)

    def _apply(*args):
        return _EmbeddingFunction.apply(*args)


def _contiguous(t):
    return None if t is None else t.contiguous()


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def masked_embedding_sum_triton(dosage, emb_loc, emb_log_scale, mask_logits, *, particles,
                                temperature=1.0, generator=None, index=None):
    """Triton masked embedding composition; same contract as
    :func:`samsvae.ops.masked_embedding_sum` (noise drawn identically, so the same generator
    state gives the reference's sample).

    Args:
        dosage: (C, T) ``torch.sparse_csr`` dosage of the batch.
        emb_loc: (T, L) float32/bfloat16/float16; emb_log_scale, mask_logits: (T, L) or None.
        particles: P; temperature: > 0; generator: optional ``torch.Generator``.

    Returns:
        :class:`EmbeddingSample` (z_p (P, C, L), index (U,), embedding (P, U, L),
        mask (P, U, L) or None), in the dtype of ``emb_loc``. float64 parameters go to the
        reference instead of being run in float32.
    """
    if emb_loc.dtype not in _KERNEL_DTYPES:
        return masked_embedding_sum_reference(dosage, emb_loc, emb_log_scale, mask_logits,
                                              particles=particles, temperature=temperature,
                                              generator=generator, index=index)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    for name, t in (("dosage", dosage), ("emb_log_scale", emb_log_scale),
                    ("mask_logits", mask_logits)):
        if t is not None and t.device != emb_loc.device:
            raise ValueError(f"masked_embedding_sum: {name} is on {t.device} but emb_loc on "
                             f"{emb_loc.device}; move them to one device with .to()")
    index, local_col, _, dose = batch_perturbations(dosage, index)
    latent = emb_loc.shape[-1]
    eps, noise_u = draw_noise(particles, index.numel(), latent, dtype=emb_loc.dtype,
                              device=emb_loc.device, generator=generator,
                              masked=mask_logits is not None)
    params = [None if t is None else t.contiguous()
              for t in (emb_loc, emb_log_scale, mask_logits)]
    z, emb, mask = _apply(index, local_col, dosage.crow_indices(), dose, eps, noise_u,
                          *params, float(temperature))
    dtype = emb_loc.dtype
    return EmbeddingSample(z.to(dtype), index, emb.to(dtype),
                           mask.to(dtype) if mask_logits is not None else None)


# ----------------------------------------------------------------------------- composition only


def _compose_values_impl(crow: torch.Tensor, local_col: torch.Tensor, dose: torch.Tensor,
                         values: torch.Tensor) -> torch.Tensor:
    """z (P, rows, L) float32 with z[p, i] = sum over row i's entries k of dose_k values[p, col_k]
    (``_compose_kernel`` without masks); values (P, U, L) float32."""
    n_particles, n_cols, latent = values.shape
    n_rows = crow.shape[0] - 1
    z = torch.empty(n_particles, n_rows, latent, dtype=torch.float32, device=values.device)
    if n_particles * n_rows * latent > 0:
        block = _block_l(latent)
        wrap_triton(_compose_kernel)[(n_rows, n_particles, triton.cdiv(latent, block))](
            crow, local_col, dose, values, _dummy(values.device), z, n_rows, n_cols, latent,
            HAS_MASK=False, BLOCK_L=block)
    return z


def _compose_values_bwd_impl(crow: torch.Tensor, local_col: torch.Tensor, dose: torch.Tensor,
                             grad_z: torch.Tensor, n_cols: int) -> torch.Tensor:
    """d values (P, U, L) float32: the same kernel over the transposed (CSC) pattern, one
    program per (column, particle, latent block), no atomics."""
    ccol, csc_rows, csc_dose = _csc(local_col, crow, dose, n_cols)
    n_particles, n_rows, latent = grad_z.shape
    out = torch.empty(n_particles, n_cols, latent, dtype=torch.float32, device=grad_z.device)
    if n_particles * n_cols * latent > 0:
        block = _block_l(latent)
        wrap_triton(_compose_kernel)[(n_cols, n_particles, triton.cdiv(latent, block))](
            ccol, csc_rows, csc_dose, grad_z, _dummy(grad_z.device), out, n_cols, n_rows,
            latent, HAS_MASK=False, BLOCK_L=block)
    return out


if triton_op is not None:
    _compose_op = triton_op("samsvae::triton_perturbation_sum",
                            mutates_args=())(_compose_values_impl)
    _compose_bwd_op = triton_op("samsvae::triton_perturbation_sum_backward",
                                mutates_args=())(_compose_values_bwd_impl)

    def _compose_setup(ctx, inputs, output):
        crow, local_col, dose, values = inputs
        ctx.n_cols = values.shape[1]
        ctx.save_for_backward(crow, local_col, dose)

    def _compose_backward(ctx, grad_z):
        crow, local_col, dose = ctx.saved_tensors
        return None, None, None, _compose_bwd_op(crow, local_col, dose, grad_z.contiguous(),
                                                 ctx.n_cols)

    _compose_op.register_autograd(_compose_backward, setup_context=_compose_setup)

    def _compose_apply(*args):
        return _compose_op(*args)
else:  # pragma: no cover
    class _ComposeFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, crow, local_col, dose, values):
            ctx.n_cols = values.shape[1]
            ctx.save_for_backward(crow, local_col, dose)
            return _compose_values_impl(crow, local_col, dose, values)

        @staticmethod
        def backward(ctx, grad_z):
            crow, local_col, dose = ctx.saved_tensors
            return None, None, None, _compose_values_bwd_impl(crow, local_col, dose,
                                                              grad_z.contiguous(), ctx.n_cols)

    def _compose_apply(*args):
        return _ComposeFunction.apply(*args)


def perturbation_sum_triton(dosage, index, values):
    """Triton :func:`samsvae.ops.perturbation_sum`: z (P, cells, L) from given per-particle
    values (P, U, L) of the perturbations ``index`` (the corr_embedding guide's composition and
    IWELBO's); float64 values go to the reference."""
    if values.dtype not in _KERNEL_DTYPES:
        from .reference import perturbation_sum_reference
        return perturbation_sum_reference(dosage, index, values)
    _, local_col, _, dose = batch_perturbations(dosage, index)
    z = _compose_apply(dosage.crow_indices().contiguous(), local_col.contiguous(),
                       dose.detach().to(torch.float32).contiguous(),
                       values.to(torch.float32).contiguous())
    return z.to(values.dtype)
