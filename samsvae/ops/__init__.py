"""Functional kernels: the drop-in fast layers other VAEs import.

Public ops (each with a pure-PyTorch reference and, where built/available, a C++ CPU kernel and a
Triton GPU kernel behind ``backend="auto"|"reference"|"cpp"|"triton"``):

* :func:`nb_log_prob`          negative binomial log-likelihood from decoder logits
* :func:`nb_log_prob_linear`   the same fused with the decoder's last linear layer
* :func:`masked_embedding_sum` sparse masked perturbation-embedding composition with sampling
* :func:`iwelbo`               streamed importance-weighted log-mean-exp
* :func:`log1p_standardize`    an encoder's standardised log1p input from CSR counts
* :func:`log1p_standardize_linear` the same followed by the encoder's first Linear (sparse on CPU)
"""
from . import backends
from .backends import BackendUnavailableError, available_backends, backend_report
from .iwelbo import OnlineLogSumExp, iwelbo
from .log1p_standardize import log1p_standardize
from .log1p_standardize_linear import log1p_standardize_linear
from .masked_embedding import (EmbeddingSample, batch_perturbations, draw_noise,
                               masked_embedding_sum, perturbation_sum, relaxed_bernoulli_st)
from .nb_log_prob import nb_log_prob, nb_log_prob_reference
from . import _load_backends  # noqa: F401  (registers compiled/GPU implementations if present)

try:  # the fused decoder head lives in its own module (added with the kernels)
    from .nb_linear import nb_log_prob_linear  # noqa: F401
except ImportError:  # pragma: no cover
    pass

__all__ = [
    "nb_log_prob", "nb_log_prob_reference", "nb_log_prob_linear", "masked_embedding_sum",
    "perturbation_sum", "EmbeddingSample", "batch_perturbations", "draw_noise",
    "relaxed_bernoulli_st", "iwelbo", "log1p_standardize", "log1p_standardize_linear",
    "OnlineLogSumExp", "available_backends",
    "backend_report", "BackendUnavailableError", "backends",
]
