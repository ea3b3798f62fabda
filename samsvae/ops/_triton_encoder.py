"""Registers the Triton kernel as the ``triton`` backend of
:func:`samsvae.ops.log1p_standardize` (CSR counts; dense counts go to the reference). Triton
is imported on the first call only."""
import torch

from . import backends
from ._triton_utils import triton_cuda_available, why_triton_unavailable
from .log1p_standardize import check_counts, log1p_standardize_reference


def log1p_standardize_triton(counts, mean, inv_std):
    if counts.layout != torch.sparse_csr or torch.compiler.is_compiling():
        return log1p_standardize_reference(counts, mean, inv_std)
    from ._triton_encoder_kernels import log1p_standardize_triton as kernel
    check_counts(counts.values())
    return kernel(counts, mean, inv_std)


backends.register("log1p_standardize", "triton", log1p_standardize_triton, devices=("cuda",),
                  available=triton_cuda_available, why_unavailable=why_triton_unavailable)


def log1p_standardize_linear_triton(counts, weight, bias, mean, inv_std):
    """The Triton features and one cuBLAS product: on a GPU the dense product is the fast
    path, so there is no sparse product kernel here."""
    with torch.no_grad():
        features = log1p_standardize_triton(counts, mean.to(weight.dtype),
                                            inv_std.to(weight.dtype))
    return torch.nn.functional.linear(features, weight, bias)


backends.register("log1p_standardize_linear", "triton", log1p_standardize_linear_triton,
                  devices=("cuda",), available=triton_cuda_available,
                  why_unavailable=why_triton_unavailable)
