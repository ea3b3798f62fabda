"""Registers the Triton GPU kernel as the ``triton`` backend of
:func:`samsvae.ops.masked_embedding_sum`.

Importing this module does not import triton; the kernels in
:mod:`._triton_embedding_kernels` load on the first call.
"""
from . import backends
from ._triton_utils import triton_cuda_available, why_triton_unavailable


def masked_embedding_sum_triton(dosage, emb_loc, emb_log_scale, mask_logits, *, particles,
                                temperature=1.0, generator=None):
    """See :func:`samsvae.ops._triton_embedding_kernels.masked_embedding_sum_triton`."""
    from ._triton_embedding_kernels import masked_embedding_sum_triton as kernel
    return kernel(dosage, emb_loc, emb_log_scale, mask_logits, particles=particles,
                  temperature=temperature, generator=generator)


backends.register("masked_embedding_sum", "triton", masked_embedding_sum_triton,
                  devices=("cuda",), available=triton_cuda_available,
                  why_unavailable=why_triton_unavailable)
