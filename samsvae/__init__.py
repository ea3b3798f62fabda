"""samsvae: fast SAMS-VAE for genetic perturbation screens."""
__version__ = "0.1.0"

import warnings as _warnings

# Batches are torch.sparse_csr tensors; torch flags the layout as beta on every construction.
_warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

from . import ops  # noqa: E402,F401
