"""The decoder head's training form on the ``cpp`` backend: the NB forward computes the gradient.

``nb_log_prob_linear(..., recompute=False)`` (what a training step uses when the logits fit in
memory) lands here on the CPU with the C++ extension. Forward: ``logits = hidden @ weight.T``
into a fresh buffer, then ``samsvae::nb_log_prob_fwd_grad`` computes the log-likelihood of
every row and overwrites the buffer with ``U = d out_r / d logits_r`` (the gradient for a unit
upstream gradient), plus the per-row ``d out_r / d log_library`` and the sums over rows of the
``log_theta`` and bias gradients. Backward, with the upstream per-row gradient ``g``:

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

from . import backends
from ._cpp import ext_available, why_unavailable
from ._cpp_nb import _COMPUTE_DTYPES as _DTYPES
from ._cpp_nb import count_parts
from ._workspace import Workspace

_LOGITS = Workspace()  # the (P * C, G) logits / U buffer, kept between training steps


def _fwd_grad_fake(logits, log_theta, logit_bias):
    lead = logits.shape[:-1]
    P = logits.shape[0] if logits.dim() == 3 else 1
    f64 = torch.float64
    n_bias = 0 if logit_bias is None else log_theta.shape[0]
    return (logits.new_empty(lead), logits.new_empty(lead, dtype=f64),
            logits.new_empty((P, logits.shape[-2]), dtype=f64), torch.empty_like(log_theta),
            logits.new_empty((n_bias,)))


@torch.library.register_fake("samsvae::nb_log_prob_fwd_grad")
def _csr_fake(crow, col, values, logits, log_library, log_theta, logit_bias=None):
    return _fwd_grad_fake(logits, log_theta, logit_bias)


@torch.library.register_fake("samsvae::nb_log_prob_dense_fwd_grad")
def _dense_fake(counts, logits, log_library, log_theta, logit_bias=None):
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


def nb_log_prob_linear_stored_cpp(counts, hidden, weight, bias, log_library, log_theta,
                                  nb_fn=None):
    """``nb_log_prob(counts, F.linear(hidden, weight, bias), log_library, log_theta)`` through
    the forward-with-gradient kernel; hidden (C, H) or (P, C, H) -> ``hidden.shape[:-1]``.
    Without gradients, for dtypes the kernel lacks, or under ``torch.compile`` (whose graphs
    cannot hold the backward's branch on the upstream gradient), the logits go to ``nb_fn``
    (the resolved ``nb_log_prob``: its forward and backward kernels) instead."""
    plain = (not torch.is_grad_enabled() or hidden.dtype not in _DTYPES
             or torch.compiler.is_compiling())
    if plain and nb_fn is not None:
        return nb_fn(counts, torch.nn.functional.linear(hidden, weight), log_library, log_theta,
                     logit_bias=bias)
    h3 = hidden.unsqueeze(0) if hidden.dim() == 2 else hidden
    out = _HeadGradInForward.apply(counts, h3, weight, bias, log_library, log_theta)
    return out.squeeze(0) if hidden.dim() == 2 else out


backends.register("nb_log_prob_linear_stored", "cpp", nb_log_prob_linear_stored_cpp,
                  devices=("cpu",), available=ext_available, why_unavailable=why_unavailable)
