"""samsvae: fast SAMS-VAE for genetic perturbation screens."""
from .version import __version__  # noqa: F401

from . import ops  # noqa: F401


def __getattr__(name):
    # the user class pulls in anndata/pandas: imported on first use so `import samsvae` stays light
    if name == "SAMSVAE":
        from .api import SAMSVAE
        return SAMSVAE
    if name == "evaluate_predictions":
        from .infer import evaluate_predictions
        return evaluate_predictions
    raise AttributeError(f"module 'samsvae' has no attribute {name!r}")
