"""Registers the Triton GPU kernel as the ``triton`` backend of :func:`samsvae.ops.nb_log_prob`.

Importing this module does not import triton (``import samsvae`` stays cheap on CPU machines);
the kernels in :mod:`._triton_nb_kernels` load on the first call.
"""
from . import backends
from ._triton_utils import triton_cuda_available, why_triton_unavailable


def nb_log_prob_triton(counts, logits, log_library, log_theta, logit_bias=None):
    """See :func:`samsvae.ops._triton_nb_kernels.nb_log_prob_triton`. A ``logit_bias`` is
    added to the logits before the kernel (not fused on this backend)."""
    from ._triton_nb_kernels import nb_log_prob_triton as kernel
    if logit_bias is not None:
        logits = logits + logit_bias.to(logits.dtype)
    return kernel(counts, logits, log_library, log_theta)


backends.register("nb_log_prob", "triton", nb_log_prob_triton, devices=("cuda",),
                  available=triton_cuda_available, why_unavailable=why_triton_unavailable)
