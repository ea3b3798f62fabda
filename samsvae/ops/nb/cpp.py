"""The ``cpp`` tier of :func:`samsvae.ops.nb_log_prob` and of the decoder head's training form.

The kernels (``csrc/nb/``) are registered by ``samsvae._C`` as the custom ops

* ``samsvae::nb_log_prob_fwd(crow, col, values, logits, log_library, log_theta,
  logit_bias=None) -> (out, lse)``
* ``samsvae::nb_log_prob_bwd(grad_out, crow, col, values, logits, log_library, log_theta, lse,
  logit_bias=None) -> (grad_logits, grad_log_library, grad_log_theta, grad_logit_bias)``
* ``samsvae::nb_log_prob_dense_fwd`` / ``samsvae::nb_log_prob_dense_bwd``: the same with dense
  counts ``(C, G)`` in place of the three CSR parts.

``logit_bias`` ``(G,)`` is added to every logits row inside the kernel (so a decoder's last
Linear can run without its bias, and the bias gradient is accumulated by the backward kernel
instead of a separate sum over rows); ``grad_logit_bias`` is empty ``(0,)`` without it.

``lse`` (float64, ``logits.shape[:-1]``) is the per-row logsumexp, the only intermediate kept
for the backward. This module gives the ops fake (meta) implementations and autograd, so they
run under ``torch.compile`` and pass ``torch.library.opcheck``, and registers
:func:`nb_log_prob_cpp` with the backend registry.

The training head (:func:`nb_log_prob_linear_stored_cpp`, what
``nb_log_prob_linear(..., recompute=False)`` calls on this backend): forward computes
``logits = hidden @ weight.T`` into a kept buffer (:mod:`samsvae.ops.workspace`), then
``samsvae::nb_log_prob_fwd_grad`` computes the log-likelihood of every row and overwrites the
buffer with ``U = d out_r / d logits_r`` (the gradient for a unit upstream gradient), plus the
per-row ``d out_r / d log_library`` and the sums over rows of the ``log_theta`` and bias
gradients. Backward, with the upstream per-row gradient ``g``:

* ``d hidden = diag(g) (U @ weight)`` and ``d weight = U.T @ (diag(g) hidden)``: a row scale
  commutes with the products, so any ``g`` is exact and ``U`` is never rescaled;
* ``d bias``, ``d log_library``: from the saved sums (``g`` uniform) or ``U.T @ g``;
* ``d log_theta`` needs every row's terms weighted by ``g``: exact from the saved sum when
  ``g`` is the same for every row (the ELBO: every row weighs 1 / (P B)); otherwise the logits
  are recomputed and the ordinary NB backward runs (one more product, same result).

Against storing the logits and running forward then backward kernels, the step saves one max
pass, one exp and one log per element, and the backward's read of the logits plus its write of
a fresh ``(P, C, G)`` gradient. Memory kept for backward: one ``(P, C, G)`` tensor, as before.
"""
from __future__ import annotations

import torch

from .. import backends
from ..cpp_extension import CPP_DTYPES, ext_available, why_unavailable
from ..csr import kernel_parts
from ..workspace import Workspace

_LOGITS = Workspace()  # the (P * C, G) logits / U buffer, kept between training steps


def _lead_fake(logits):
    lead = logits.shape[:-1]
    return logits.new_empty(lead), logits.new_empty(lead, dtype=torch.float64)


@torch.library.register_fake("samsvae::nb_log_prob_fwd")
def _fwd_fake(crow, col, values, logits, log_library, log_theta, logit_bias=None):
    return _lead_fake(logits)


@torch.library.register_fake("samsvae::nb_log_prob_dense_fwd")
def _dense_fwd_fake(counts, logits, log_library, log_theta, logit_bias=None):
    return _lead_fake(logits)


def _grads_fake(logits, log_library, log_theta, logit_bias):
    n_bias = 0 if logit_bias is None else log_theta.shape[0]
    return (torch.empty_like(logits), torch.empty_like(log_library), torch.empty_like(log_theta),
            logits.new_empty((n_bias,)))


@torch.library.register_fake("samsvae::nb_log_prob_bwd")
def _bwd_fake(grad_out, crow, col, values, logits, log_library, log_theta, lse, logit_bias=None):
    return _grads_fake(logits, log_library, log_theta, logit_bias)


@torch.library.register_fake("samsvae::nb_log_prob_dense_bwd")
def _dense_bwd_fake(grad_out, counts, logits, log_library, log_theta, lse, logit_bias=None):
    return _grads_fake(logits, log_library, log_theta, logit_bias)


def _setup(ctx, inputs, output):
    *tensors, logit_bias = inputs
    ctx.has_bias = logit_bias is not None
    ctx.save_for_backward(*tensors, output[1], *((logit_bias,) if ctx.has_bias else ()))
    ctx.mark_non_differentiable(output[1])


def _select(ctx, grads, n_count_parts):
    """Gradients in input order: None for the count parts and for inputs that need none."""
    grads = list(grads)
    if not ctx.has_bias:
        grads[-1] = None
    out = [None] * n_count_parts + grads
    return tuple(g if need else None for g, need in zip(out, ctx.needs_input_grad))


def _saved(ctx):
    saved = list(ctx.saved_tensors)
    bias = saved.pop() if ctx.has_bias else None
    return saved, bias


def _csr_backward(ctx, grad_out, _grad_lse):
    (crow, col, values, logits, log_library, log_theta, lse), bias = _saved(ctx)
    grads = torch.ops.samsvae.nb_log_prob_bwd(grad_out.contiguous(), crow, col, values, logits,
                                              log_library, log_theta, lse, bias)
    return _select(ctx, grads, 3)


def _dense_backward(ctx, grad_out, _grad_lse):
    (counts, logits, log_library, log_theta, lse), bias = _saved(ctx)
    grads = torch.ops.samsvae.nb_log_prob_dense_bwd(grad_out.contiguous(), counts, logits,
                                                    log_library, log_theta, lse, bias)
    return _select(ctx, grads, 1)


torch.library.register_autograd("samsvae::nb_log_prob_fwd", _csr_backward, setup_context=_setup)
torch.library.register_autograd("samsvae::nb_log_prob_dense_fwd", _dense_backward,
                                setup_context=_setup)


def _no_setup(ctx, inputs, output):
    return None


def _no_double_backward(ctx, *grads):
    raise RuntimeError("nb_log_prob with backend='cpp' has no second derivative; use "
                       "backend='reference' for double backward (e.g. gradient penalties)")


for _op in ("samsvae::nb_log_prob_bwd", "samsvae::nb_log_prob_dense_bwd"):
    torch.library.register_autograd(_op, _no_double_backward, setup_context=_no_setup)


def nb_log_prob_cpp(counts, logits, log_library, log_theta, logit_bias=None):
    """C++ CPU implementation of :func:`samsvae.ops.nb_log_prob` (same signature and result).

    counts ``(C, G)`` dense or ``torch.sparse_csr`` (any numeric dtype; never differentiated),
    logits ``(C, G)`` or ``(P, C, G)``, log_library ``(C,)``, log_theta ``(G,)``; returns
    ``logits.shape[:-1]`` log-likelihoods in nats. float32 and float64 run natively; other
    floating dtypes are computed in float32 and cast back.
    """
    out_dtype = logits.dtype
    dtype = out_dtype if out_dtype in CPP_DTYPES else torch.float32
    logits = logits.to(dtype).contiguous()
    log_library = log_library.to(dtype).contiguous()
    log_theta = log_theta.to(dtype).contiguous()
    if logit_bias is not None:
        logit_bias = logit_bias.to(dtype).contiguous()
    parts = count_parts(counts, dtype)
    op = (torch.ops.samsvae.nb_log_prob_fwd if len(parts) == 3
          else torch.ops.samsvae.nb_log_prob_dense_fwd)
    out, _ = op(*parts, logits, log_library, log_theta, logit_bias)
    return out.to(out_dtype)


def count_parts(counts, dtype) -> tuple:
    """The kernels' view of ``counts``: ``(crow, col, values)`` int64/int64/``dtype`` for CSR,
    ``(dense,)`` of ``dtype`` otherwise; contiguous, detached."""
    if counts.layout == torch.sparse_csr:
        return kernel_parts(counts, dtype)
    return (counts.detach().to(dtype).contiguous(),)


def _fwd_grad_fake(logits, log_theta, logit_bias):
    lead = logits.shape[:-1]
    P = logits.shape[0] if logits.dim() == 3 else 1
    f64 = torch.float64
    n_bias = 0 if logit_bias is None else log_theta.shape[0]
    return (logits.new_empty(lead), logits.new_empty(lead, dtype=f64),
            logits.new_empty((P, logits.shape[-2]), dtype=f64), torch.empty_like(log_theta),
            logits.new_empty((n_bias,)))


@torch.library.register_fake("samsvae::nb_log_prob_fwd_grad")
def _fwd_grad_csr_fake(crow, col, values, logits, log_library, log_theta, logit_bias=None):
    return _fwd_grad_fake(logits, log_theta, logit_bias)


@torch.library.register_fake("samsvae::nb_log_prob_dense_fwd_grad")
def _fwd_grad_dense_fake(counts, logits, log_library, log_theta, logit_bias=None):
    return _fwd_grad_fake(logits, log_theta, logit_bias)


def nb_fwd_grad(parts, logits, log_library, log_theta, logit_bias):
    """Run the forward-with-gradient kernel; ``logits`` (P, C, G) becomes ``U``. Returns
    ``(out, lse, row_dlog_library, dlog_theta_sum, dbias_sum)``."""
    op = (torch.ops.samsvae.nb_log_prob_fwd_grad if len(parts) == 3
          else torch.ops.samsvae.nb_log_prob_dense_fwd_grad)
    return op(*parts, logits, log_library, log_theta, logit_bias)


class _HeadGradInForward(torch.autograd.Function):
    """``nb_log_prob(counts, hidden @ weight.T + bias, ...)`` for (P, C, H) ``hidden``."""

    @staticmethod
    def forward(ctx, counts, hidden, weight, bias, log_library, log_theta):
        P, C, H = hidden.shape
        G = weight.shape[0]
        dtype = hidden.dtype
        parts = count_parts(counts, dtype)
        h2 = hidden.reshape(P * C, H)
        logits = torch.mm(h2, weight.T, out=_LOGITS.take((P * C, G), dtype, hidden.device))
        logits = logits.view(P, C, G)
        lib, lt = log_library.to(dtype).contiguous(), log_theta.to(dtype).contiguous()
        b = None if bias is None else bias.contiguous()
        out, lse, row_dlib, d_theta, d_bias = nb_fwd_grad(parts, logits, lib, lt, b)
        ctx.n_parts = len(parts)
        ctx.has_bias = b is not None
        ctx.save_for_backward(*parts, h2, weight, *((b,) if b is not None else ()), lib, lt,
                              logits, lse, row_dlib, d_theta, d_bias)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        saved = list(ctx.saved_tensors)
        parts = saved[:ctx.n_parts]
        rest = saved[ctx.n_parts:]
        h2, weight = rest[0], rest[1]
        bias = rest[2] if ctx.has_bias else None
        lib, lt, U, lse, row_dlib, d_theta, d_bias = rest[2 + ctx.has_bias:]
        _, need_h, need_w, need_b, need_lib, need_theta = ctx.needs_input_grad
        P, C, G = U.shape
        go = grad_out.to(U.dtype).contiguous()
        flat = go.reshape(-1)
        uniform = flat.numel() == 0 or bool((flat == flat[0]).all())
        if not uniform and need_theta:
            return (None,) + _recompute_backward(ctx, go, parts, h2, weight, bias, lib, lt, lse,
                                                 (P, C, G))
        U2 = U.view(P * C, G)
        col = flat.unsqueeze(1)
        grad_h = torch.mm(U2, weight).mul_(col).view(P, C, -1) if need_h else None
        grad_w = None
        if need_w and uniform:  # the scale rides on the product (beta=0 ignores the input)
            c = float(flat[0]) if flat.numel() else 0.0
            grad_w = torch.addmm(weight, U2.T, h2, beta=0.0, alpha=c)
        elif need_w:
            grad_w = torch.mm(U2.T, h2 * col)
        grad_b = None
        if need_b:
            grad_b = d_bias * flat[0] if uniform else torch.mv(U2.T, flat)
        grad_lib = (row_dlib * go.to(torch.float64)).sum(0).to(U.dtype) if need_lib else None
        grad_theta = d_theta * flat[0] if need_theta else None
        return None, grad_h, grad_w, grad_b, grad_lib, grad_theta


def _recompute_backward(ctx, go, parts, h2, weight, bias, lib, lt, lse, shape):
    """Rows weighted unequally: the ordinary NB backward on recomputed logits."""
    P, C, G = shape
    logits = torch.mm(h2, weight.T).view(P, C, G)
    op = (torch.ops.samsvae.nb_log_prob_bwd if len(parts) == 3
          else torch.ops.samsvae.nb_log_prob_dense_bwd)
    d_logits, d_lib, d_theta, d_bias = op(go, *parts, logits, lib, lt, lse, bias)
    _, need_h, need_w, need_b, need_lib, need_theta = ctx.needs_input_grad
    d2 = d_logits.view(P * C, G)
    return (torch.mm(d2, weight).view(P, C, -1) if need_h else None,
            torch.mm(d2.T, h2) if need_w else None,
            d_bias if need_b else None,
            d_lib if need_lib else None,
            d_theta if need_theta else None)


def nb_log_prob_linear_stored_cpp(counts, hidden, weight, bias, log_library, log_theta):
    """``nb_log_prob(counts, F.linear(hidden, weight, bias), log_library, log_theta)`` keeping
    one ``(P, C, G)`` tensor for backward: through the forward-with-gradient kernel (see the
    module docstring); hidden ``(C, H)`` or ``(P, C, H)`` -> ``hidden.shape[:-1]`` nats.

    Without gradients, for dtypes the kernel lacks, or under ``torch.compile`` (whose graphs
    cannot hold the backward's branch on the upstream gradient), the logits go through
    :func:`nb_log_prob_cpp` (its forward and backward kernels) instead."""
    if (not torch.is_grad_enabled() or hidden.dtype not in CPP_DTYPES
            or torch.compiler.is_compiling()):
        return nb_log_prob_cpp(counts, torch.nn.functional.linear(hidden, weight), log_library,
                               log_theta, bias)
    h3 = hidden.unsqueeze(0) if hidden.dim() == 2 else hidden
    out = _HeadGradInForward.apply(counts, h3, weight, bias, log_library, log_theta)
    return out.squeeze(0) if hidden.dim() == 2 else out


backends.register("nb_log_prob", "cpp", nb_log_prob_cpp, devices=("cpu",),
                  available=ext_available, why_unavailable=why_unavailable)
