"""``build_model``: the one entry point from a (model, guide) name pair to a model instance."""
from __future__ import annotations

import inspect

from .base import PerturbationModel
from .cvae import ConditionalVAE
from .sams import SAMSVAE
from .svae_plus import SVAEPlus

MODEL_GUIDES = {"cvae": ("mean_field",), "svae_plus": ("mean_field",),
                "cpa_vae": ("mean_field", "corr_basal"),
                "sams_vae": ("mean_field", "corr_embedding", "corr_basal", "corr_both")}

_CLASSES = {"cvae": ConditionalVAE, "svae_plus": SVAEPlus, "cpa_vae": SAMSVAE,
            "sams_vae": SAMSVAE}


_COMMON = {"model", "guide", "n_genes", "n_perturbations", "n_latent", "n_hidden",
           "gene_log1p_mean", "gene_log1p_std", "perturbation_counts", "n_batches"}


def _valid_pairs() -> str:
    return ", ".join(f"{m}/{g}" for m, gs in MODEL_GUIDES.items() for g in gs)


def build_model(model: str, guide: str = "mean_field", *, n_genes: int, n_perturbations: int,
                n_latent: int = 100, n_hidden: int = 400, gene_log1p_mean=None,
                gene_log1p_std=None, perturbation_counts=None, **kwargs) -> PerturbationModel:
    """Build a model of the family.

    Args:
        model, guide: a pair of :data:`MODEL_GUIDES`.
        n_genes: G. n_perturbations: T (dosage columns). n_latent: L. n_hidden: width of the
            encoder and decoder hidden layers.
        gene_log1p_mean, gene_log1p_std: (G,) training statistics of log1p(counts) (encoder
            input standardisation); None -> no standardisation.
        perturbation_counts: (T,) training cells per perturbation (the 1/N_t weights of the
            global terms); may instead be set later with ``set_perturbation_counts``.
        **kwargs: model options (see the classes: ``SAMSVAE``, ``ConditionalVAE``,
            ``SVAEPlus``), e.g. ``mask_prior_prob``, ``temperature``, ``labels``.

    ``build_model(**model.config)`` rebuilds an identical (untrained) model; its buffers
    (gene statistics, counts) and weights come from ``load_state_dict``. The kernel backend is
    not part of a model: choose it per call (``backend=`` of the ops,
    ``samsvae.ops.use_backend``, ``SAMSVAE_BACKEND``).
    """
    if model not in MODEL_GUIDES or guide not in MODEL_GUIDES[model]:
        raise ValueError(f"unknown model/guide pair {model!r}/{guide!r}; valid pairs: "
                         f"{_valid_pairs()}")
    if "backend" in kwargs:
        raise TypeError("backend is not a model option any more: it is chosen per call "
                        "(with samsvae.ops.use_backend(name): ..., SAMSVAE_BACKEND, or "
                        "--backend on the command line), never saved with a model")
    cls = _CLASSES[model]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        own = ", ".join(sorted(accepted - _COMMON)) or "none beyond the sizes"
        raise ValueError(f"{model} has no option {', '.join(map(repr, unknown))}; its options: "
                         f"{own}")
    return cls(model=model, guide=guide, n_genes=n_genes,
                           n_perturbations=n_perturbations, n_latent=n_latent,
                           n_hidden=n_hidden, gene_log1p_mean=gene_log1p_mean,
                           gene_log1p_std=gene_log1p_std,
                           perturbation_counts=perturbation_counts, **kwargs)
