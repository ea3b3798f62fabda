"""The negative binomial log-likelihood ops: :func:`nb_log_prob` and the fused decoder head
:func:`nb_log_prob_linear`, with the one choice between the head's two forms.

    nb_log_prob(counts, logits, log_library, log_theta)[..., i]
        = sum_g log NB(x_ig | mu_ig = exp(log_library_i) * softmax(logits_i)_g,
                              theta_g = exp(log_theta_g))

with NB parameterised by mean ``mu`` and inverse dispersion ``theta`` (variance mu + mu^2/theta).

The reference (:mod:`.reference`) is the spec, in the numerically stable form the fast
kernels use (see its docstring).

Tiers: ``reference`` (:mod:`.reference`), ``cpp`` (:mod:`.cpp`, loaded when the C++ extension
is built), ``triton`` (:mod:`.triton`, imported on its first call). ``nb_log_prob_linear`` is
a composite: it runs on the ``nb_log_prob`` backend, either storing the ``(P, C, G)`` logits
for backward (on ``cpp``: the forward-with-gradient head of :mod:`.cpp`) or recomputing them
chunk by chunk (:mod:`.linear`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import backends
from ..cpp_extension import ext_available
from ..triton_support import triton_cuda_available, why_triton_unavailable
from .linear import check_linear_inputs, default_chunk_rows, nb_log_prob_linear_chunked
from .reference import check_nb_inputs, lgamma_ratio, nb_log_prob_reference

# recompute=None stores the (particles, cells, genes) logits for backward when gradients are on
# and they take at most this many bytes (P=5, B=512, G=8000 float32: 82 MB), else recomputes.
STORED_LOGITS_BYTES = 512 * 2 ** 20


def nb_log_prob(counts, logits, log_library, log_theta, *, logit_bias=None, backend="auto"):
    """Per-row NB log-likelihood of ``counts`` under decoder ``logits``.

    Args:
        counts: ``(cells, genes)`` non-negative counts, dense or ``torch.sparse_csr``; shared by
            every particle (never copied per particle).
        logits: ``(cells, genes)`` or ``(particles, cells, genes)`` unnormalised decoder outputs;
            ``softmax`` over genes gives each cell's expression proportions.
        log_library: ``(cells,)`` log library size (total counts); mean = library * softmax.
        log_theta: ``(genes,)`` log inverse dispersion.
        logit_bias: optional ``(genes,)`` added to every logits row: a decoder's last bias,
            whose Linear layer then runs without it. The ``cpp`` backend adds it inside the
            kernel and accumulates its gradient there (no broadcast copy, no sum over rows);
            the other backends add it first.
        backend: ``"auto"`` | ``"reference"`` | ``"cpp"`` | ``"triton"``.

    Returns:
        ``logits.shape[:-1]``: log-likelihood in nats summed over genes. Differentiable in
        ``logits``, ``log_library``, ``log_theta`` and ``logit_bias``.
    """
    check_nb_inputs(counts, logits, log_library, log_theta, logit_bias)
    _, fn = backends.resolve("nb_log_prob", backend, logits.device)
    if logit_bias is None:
        return fn(counts, logits, log_library, log_theta)
    return fn(counts, logits, log_library, log_theta, logit_bias)


def _stores_logits(hidden, n_genes: int, recompute: Optional[bool]) -> bool:
    """The store-or-recompute choice of :func:`nb_log_prob_linear` (``recompute=None``: auto)."""
    if recompute is not None:
        return not recompute
    logits_bytes = hidden[..., :1].numel() * n_genes * hidden.element_size()
    return torch.is_grad_enabled() and logits_bytes <= STORED_LOGITS_BYTES


def nb_log_prob_linear(counts, hidden, weight, bias, log_library, log_theta, *,
                       backend: str = "auto", chunk_rows: Optional[int] = None,
                       recompute: bool = True):
    """NB log-likelihood of ``counts`` under ``logits = hidden @ weight.T + bias``.

    Same value and gradients as ``nb_log_prob(counts, F.linear(hidden, weight, bias),
    log_library, log_theta)``. With ``recompute=True`` (default) the logits are never stored:
    memory is that of one chunk of ``chunk_rows`` logit rows instead of all
    ``particles * cells`` rows (backward recomputes each chunk's logits; the evaluation form).
    With ``recompute=False`` one ``(particles, cells, genes)`` tensor is kept for backward and
    nothing is recomputed (the training form, when it fits in memory); on the ``cpp`` backend
    the NB forward then also computes the gradient, which backward only combines with the
    per-row upstream gradient (see :mod:`samsvae.ops.nb.cpp`). ``recompute=None`` chooses:
    store when gradients are enabled and the logits take at most ``STORED_LOGITS_BYTES``.

    Args:
        counts: ``(cells, genes)`` counts, dense or ``torch.sparse_csr``; shared by every
            particle (never copied).
        hidden: ``(cells, H)`` or ``(particles, cells, H)`` input of the decoder's last layer.
        weight: ``(genes, H)`` (``nn.Linear(H, genes).weight``), same dtype as ``hidden``.
        bias: ``(genes,)`` or None.
        log_library: ``(cells,)`` log library size.
        log_theta: ``(genes,)`` log inverse dispersion.
        backend: the ``nb_log_prob`` backend (``"auto"`` | ``"reference"`` | ``"cpp"`` |
            ``"triton"``); an explicitly requested unavailable one raises.
        chunk_rows: logit rows per chunk when recomputing; default :func:`default_chunk_rows`
            (~32 MiB of logits).
        recompute: True recomputes the logits in backward, False keeps them (or their
            gradient), None chooses by size (see above).

    Returns:
        ``hidden.shape[:-1]`` log-likelihoods in nats summed over genes, differentiable in
        ``hidden``, ``weight``, ``bias``, ``log_library`` and ``log_theta`` (first order only).
    """
    check_linear_inputs(counts, hidden, weight, bias, log_library, log_theta, chunk_rows)
    name, nb_fn = backends.resolve("nb_log_prob", backend, hidden.device)
    if not _stores_logits(hidden, weight.shape[0], recompute):
        return nb_log_prob_linear_chunked(counts, hidden, weight, bias, log_library, log_theta,
                                          nb_fn, chunk_rows)
    if name == "cpp":
        from .cpp import nb_log_prob_linear_stored_cpp
        return nb_log_prob_linear_stored_cpp(counts, hidden, weight, bias, log_library,
                                             log_theta)
    # the bias rides the product's epilogue (cuBLAS / the CPU GEMM): no second pass over the
    # (P, C, G) logits to add it
    return nb_fn(counts, F.linear(hidden, weight, bias), log_library, log_theta)


backends.register("nb_log_prob", "reference", nb_log_prob_reference)
backends.load_tier(f"{__name__}.cpp", needs=ext_available)
backends.register("nb_log_prob", "triton", f"{__name__}.triton:nb_log_prob_triton",
                  devices=("cuda",), available=triton_cuda_available,
                  why_unavailable=why_triton_unavailable)
backends.follow("nb_log_prob_linear", "nb_log_prob")

__all__ = ["nb_log_prob", "nb_log_prob_linear", "nb_log_prob_reference", "lgamma_ratio",
           "default_chunk_rows", "STORED_LOGITS_BYTES"]
