"""The perturbation-embedding op :func:`masked_embedding_sum`: sample the embeddings and masks of
the perturbations present in a batch and compose them per cell.

Tiers: ``reference`` (:mod:`.reference`, also the home of the shared pieces re-exported here),
``cpp`` (:mod:`.cpp`, loaded when the C++ extension is built), ``triton`` (:mod:`.triton`,
imported on its first call). Every tier draws its noise with :func:`draw_noise` on the
caller's generator, so backends agree for the same generator state.
"""
from __future__ import annotations

from .. import backends
from ..cpp_extension import ext_available
from ..triton_support import triton_cuda_available, why_triton_unavailable
from .reference import (UNIFORM_EPS, EmbeddingSample, batch_perturbations, draw_noise,
                        masked_embedding_sum_reference, perturbation_sum_reference,
                        relaxed_bernoulli_st)


def masked_embedding_sum(dosage, emb_loc, emb_log_scale, mask_logits, *, particles,
                         temperature=1.0, generator=None, index=None, backend="auto"):
    """Sample embeddings and masks for the batch's perturbations and compose them per cell.

    Args:
        dosage: ``(cells, T)`` ``torch.sparse_csr`` dosage matrix of the batch (real values ok).
        emb_loc: ``(T, latent)`` guide mean of the perturbation embeddings.
        emb_log_scale: ``(T, latent)`` guide log standard deviation, or None for a point value.
        mask_logits: ``(T, latent)`` guide logits of the Bernoulli masks, or None for masks
            fixed to one (CPA-VAE).
        particles: number of samples P.
        temperature: Gumbel-sigmoid relaxation temperature.
        generator: optional ``torch.Generator`` for the noise.
        index: optional (U,) sorted ids of the perturbations present in ``dosage`` when the
            caller knows them (``samsvae.data.Batch.perturbations``): spares the
            ``torch.unique`` and its device-to-host synchronisation on a GPU.

    Returns:
        :class:`EmbeddingSample` ``(z_p (P, cells, L), index (U,), embedding (P, U, L),
        mask (P, U, L) or None)``. Gradients flow to ``emb_loc``, ``emb_log_scale`` and
        ``mask_logits`` through every output.
    """
    if emb_loc.dim() != 2:
        raise ValueError(f"emb_loc must be (perturbations, latent), got {tuple(emb_loc.shape)}")
    if dosage.dim() != 2 or dosage.shape[1] != emb_loc.shape[0]:
        raise ValueError(f"dosage must be (cells, {emb_loc.shape[0]}) to match emb_loc, "
                         f"got {tuple(dosage.shape)}")
    for name, t in (("emb_log_scale", emb_log_scale), ("mask_logits", mask_logits)):
        if t is not None and t.shape != emb_loc.shape:
            raise ValueError(f"{name} must have the shape of emb_loc {tuple(emb_loc.shape)}, "
                             f"got {tuple(t.shape)}")
    if particles < 1:
        raise ValueError(f"particles must be >= 1, got {particles}")
    _, fn = backends.resolve("masked_embedding_sum", backend, emb_loc.device)
    return fn(dosage, emb_loc, emb_log_scale, mask_logits, particles=particles,
              temperature=temperature, generator=generator, index=index)


def perturbation_sum(dosage, index, values, *, backend="auto"):
    """z[k, i] = sum_t d_it * values[k, pos(t)]: compose given per-particle values of the
    batch's perturbations per cell (the correlated-embedding guide and IWELBO, whose samples
    are drawn outside :func:`masked_embedding_sum`).

    dosage: (cells, T) CSR; index: (U,) sorted ids of the columns ``values`` holds (every
    column of ``dosage`` among them); values: (P, U, L). Returns (P, cells, L), differentiable
    in ``values``. ``backend``: ``"auto"`` | ``"reference"`` | ``"cpp"`` (the reference's one
    ``index_add``: the C++ tier has no kernel of its own for it) | ``"triton"``.
    """
    _, fn = backends.resolve("perturbation_sum", backend, values.device)
    return fn(dosage, index, values)


backends.register("masked_embedding_sum", "reference", masked_embedding_sum_reference)
backends.load_tier(f"{__name__}.cpp", needs=ext_available)
backends.register("perturbation_sum", "reference", perturbation_sum_reference)
backends.register("perturbation_sum", "cpp", perturbation_sum_reference, devices=("cpu",))
backends.register("perturbation_sum", "triton", f"{__name__}.triton:perturbation_sum_triton",
                  devices=("cuda",), available=triton_cuda_available,
                  why_unavailable=why_triton_unavailable)
backends.register("masked_embedding_sum", "triton",
                  f"{__name__}.triton:masked_embedding_sum_triton", devices=("cuda",),
                  available=triton_cuda_available, why_unavailable=why_triton_unavailable)

__all__ = ["masked_embedding_sum", "masked_embedding_sum_reference", "EmbeddingSample",
           "UNIFORM_EPS", "batch_perturbations", "draw_noise", "perturbation_sum",
           "perturbation_sum_reference",
           "relaxed_bernoulli_st"]
