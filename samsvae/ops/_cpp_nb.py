"""The ``cpp`` backend of :func:`samsvae.ops.nb_log_prob`: fused C++ CPU kernels.

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
"""
from __future__ import annotations

import torch

from . import backends
from ._cpp import ext_available, why_unavailable

_COMPUTE_DTYPES = (torch.float32, torch.float64)


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
    dtype = out_dtype if out_dtype in _COMPUTE_DTYPES else torch.float32
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
        # values() is a view of the sparse tensor; detach() drops that link (no copy), which
        # torch.compile cannot trace through
        return (counts.crow_indices().to(torch.int64).contiguous(),
                counts.col_indices().to(torch.int64).contiguous(),
                counts.values().detach().to(dtype).contiguous())
    return (counts.detach().to(dtype).contiguous(),)


backends.register("nb_log_prob", "cpp", nb_log_prob_cpp, devices=("cpu",),
                  available=ext_available, why_unavailable=why_unavailable)
