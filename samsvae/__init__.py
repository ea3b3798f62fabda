"""samsvae: fast SAMS-VAE for genetic perturbation screens."""
__version__ = "0.1.0"

from . import ops  # noqa: F401
