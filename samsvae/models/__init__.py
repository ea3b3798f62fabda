"""Generative models of perturbation screens and their guides (AnnData-free nn.Modules).

``build_model(model, guide, ...)`` for the pairs of :data:`MODEL_GUIDES`:

* ``cvae``       conditional VAE (perturbation as encoder/decoder input)
* ``svae_plus``  SVAE+ (sparse shift of the latent prior mean per label)
* ``cpa_vae``    SAMS-VAE with every mask fixed to 1
* ``sams_vae``   SAMS-VAE (sparse masked additive perturbation embeddings)
"""
from .base import PerturbationModel
from .cvae import ConditionalVAE
from .spread_globals import per_cell_global_term
from .labels import svae_plus_labels
from .registry import MODEL_GUIDES, build_model
from .sams import SAMSVAE
from .svae_plus import SVAEPlus

__all__ = ["MODEL_GUIDES", "build_model", "PerturbationModel", "SAMSVAE", "ConditionalVAE",
           "SVAEPlus", "svae_plus_labels", "per_cell_global_term"]
