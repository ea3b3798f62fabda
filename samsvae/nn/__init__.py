"""nn.Module wrappers over :mod:`samsvae.ops` (drop-in layers for any VAE)."""
from .embedding import MaskedPerturbationEmbedding
from .likelihood import NBLikelihood

__all__ = ["NBLikelihood", "MaskedPerturbationEmbedding"]
