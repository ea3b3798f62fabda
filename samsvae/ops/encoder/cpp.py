"""The ``cpp`` tier of :func:`samsvae.ops.log1p_standardize` and
:func:`samsvae.ops.log1p_standardize_linear` (kernels in ``csrc/encoder``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backends
from ..cpp_extension import CPP_DTYPES, ext_available, why_unavailable
from ..csr import kernel_parts
from .reference import log1p_standardize_reference

# Above this fraction of stored entries one dense product beats the sparse kernel (forward +
# backward, 512 cells x 8,000 genes, hidden 400, one thread: crossover 0.17-0.25;
# benchmarks/bench_encoder_input.py, benchmarks/README.md "Encoder input").
SPARSE_BELOW = 0.15


@torch.library.register_fake("samsvae::log1p_standardize_csr")
def _fake(crow, col, values, mean, inv_std):
    return mean.new_empty((crow.shape[0] - 1, mean.shape[0]))


@torch.library.register_fake("samsvae::log1p_standardize_linear_csr")
def _linear_fake(crow, col, values, weight, bias, mean, inv_std):
    return (weight.new_empty((crow.shape[0] - 1, weight.shape[0])),
            values.new_empty(values.shape))


@torch.library.register_fake("samsvae::log1p_standardize_linear_csr_bwd")
def _linear_bwd_fake(grad_out, crow, col, s, mean, inv_std):
    return (grad_out.new_empty((grad_out.shape[1], mean.shape[0])),
            grad_out.new_empty((grad_out.shape[1],)))


def _linear_setup(ctx, inputs, output):
    crow, col, _values, _weight, bias, mean, inv_std = inputs
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(crow, col, output[1], mean, inv_std)


def _linear_backward(ctx, grad_out, _grad_s):
    crow, col, s, mean, inv_std = ctx.saved_tensors
    grad_w, grad_b = torch.ops.samsvae.log1p_standardize_linear_csr_bwd(
        grad_out.contiguous(), crow, col, s, mean, inv_std)
    return None, None, None, grad_w, grad_b if ctx.has_bias else None, None, None


torch.library.register_autograd("samsvae::log1p_standardize_linear_csr", _linear_backward,
                                setup_context=_linear_setup)


def log1p_standardize_cpp(counts, mean, inv_std):
    """CSR counts on the CPU in float32/float64 through the C++ op; anything else (dense
    counts, other dtypes, torch.compile tracing) through the reference."""
    if (counts.layout != torch.sparse_csr or mean.dtype not in CPP_DTYPES
            or torch.compiler.is_compiling()):
        return log1p_standardize_reference(counts, mean, inv_std)
    dtype = mean.dtype
    return torch.ops.samsvae.log1p_standardize_csr(*kernel_parts(counts, dtype), mean.contiguous(),
                                                   inv_std.to(dtype).contiguous())


def log1p_standardize_linear_cpp(counts, weight, bias, mean, inv_std):
    """The sparse kernel for CSR batches of at most ``SPARSE_BELOW`` stored entries in
    float32/float64; otherwise the C++ features and one dense product."""
    dtype = weight.dtype
    sparse = (counts.layout == torch.sparse_csr and dtype in CPP_DTYPES
              and not torch.compiler.is_compiling()
              and counts.values().numel() <= SPARSE_BELOW * counts.numel())
    if not sparse:
        with torch.no_grad():
            features = log1p_standardize_cpp(counts, mean.to(dtype), inv_std.to(dtype))
        return F.linear(features, weight, bias)
    out, _ = torch.ops.samsvae.log1p_standardize_linear_csr(
        *kernel_parts(counts, dtype), weight.contiguous(),
        None if bias is None else bias.contiguous(), mean.to(dtype).contiguous(),
        inv_std.to(dtype).contiguous())
    return out


backends.register("log1p_standardize", "cpp", log1p_standardize_cpp, devices=("cpu",),
                  available=ext_available, why_unavailable=why_unavailable)
backends.register("log1p_standardize_linear", "cpp", log1p_standardize_linear_cpp,
                  devices=("cpu",), available=ext_available, why_unavailable=why_unavailable)
