"""Functional kernels: the drop-in fast layers other VAEs import.

Public ops (each with a pure-PyTorch reference and, where built/available, a C++ CPU kernel and a
Triton GPU kernel behind ``backend="auto"|"reference"|"cpp"|"triton"``; :func:`use_backend`
sets what ``"auto"`` means for a block of code):

* :func:`nb_log_prob`          negative binomial log-likelihood from decoder logits
* :func:`nb_log_prob_linear`   the same fused with the decoder's last linear layer
* :func:`masked_embedding_sum` sparse masked perturbation-embedding composition with sampling
* :func:`iwelbo`               streamed importance-weighted log-mean-exp
* :func:`log1p_standardize`    an encoder's standardised log1p input from CSR counts
* :func:`log1p_standardize_linear` the same followed by the encoder's first Linear (sparse on CPU)

One package per op (``nb/``, ``embedding/``, ``encoder/``, like ``csrc/``), each holding its
``reference.py``, ``cpp.py`` and ``triton.py`` tiers; :mod:`.backends` is the one registry.
"""
from . import backends
from .backends import BackendUnavailableError, available_backends, backend_report, use_backend
from .embedding import (EmbeddingSample, batch_perturbations, draw_noise, masked_embedding_sum,
                        perturbation_sum, relaxed_bernoulli_st)
from .encoder import log1p_standardize, log1p_standardize_linear
from .iwelbo import OnlineLogSumExp, iwelbo
from .nb import nb_log_prob, nb_log_prob_linear, nb_log_prob_reference

__all__ = [
    "nb_log_prob", "nb_log_prob_reference", "nb_log_prob_linear", "masked_embedding_sum",
    "perturbation_sum", "EmbeddingSample", "batch_perturbations", "draw_noise",
    "relaxed_bernoulli_st", "iwelbo", "log1p_standardize", "log1p_standardize_linear",
    "OnlineLogSumExp", "available_backends",
    "backend_report", "BackendUnavailableError", "backends", "use_backend",
]
