"""Helpers shared by several test modules (input makers of the ops tests, the ISA list).

Imported as ``helpers`` (``pythonpath = ["tests"]`` in pyproject.toml), never from a test
module or conftest.
"""
import pytest
import torch

from samsvae.ops import cpp_extension

# the C++ kernels' instruction sets, best first (the ``isa`` fixture of conftest.py)
CPU_ISAS = ("avx512", "avx2", "baseline")


def make_inputs(cells, genes, particles=None, *, seed=0, zero_fraction=0.9, theta=(-4, 6),
                max_count=None, integer=True, logit_scale=1.5):
    """float64 (counts (C, G), logits, log_library (C,), log_theta (G,)); log10 theta uniform
    in `theta`; counts 1 + Poisson(lognormal) on a random (1 - zero_fraction) of the entries,
    a few of them up to `max_count`."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    keep = torch.rand(cells, genes, generator=g, dtype=f64) >= zero_fraction
    rate = torch.exp(torch.randn(cells, genes, generator=g, dtype=f64) * 1.2)
    x = 1.0 + torch.poisson(rate, generator=g)
    if max_count is not None:
        big = torch.rand(cells, genes, generator=g, dtype=f64) < 0.05
        wide = torch.randint(0, max_count + 1, (cells, genes), generator=g).to(f64)
        x = torch.where(big, wide, x)
    if not integer:
        x = x * torch.rand(cells, genes, generator=g, dtype=f64) * 1.7
    counts = x * keep
    shape = (cells, genes) if particles is None else (particles, cells, genes)
    logits = torch.randn(*shape, generator=g, dtype=f64) * logit_scale
    log_library = torch.log(counts.sum(1).clamp_min(1.0) + 50.0)
    lo, hi = theta
    log_theta = (torch.rand(genes, generator=g, dtype=f64) * (hi - lo) + lo) * 2.302585092994046
    return counts, logits, log_library, log_theta


def random_inputs(cells=5, genes=9, particles=None, dtype=torch.float64, seed=0,
                  zero_frac=0.6):
    """(counts (C, G) float64 Poisson with `zero_frac` zeros, logits (C, G) or (P, C, G),
    log_library (C,), log_theta (G,)) for the NB reference tests."""
    g = torch.Generator().manual_seed(seed)
    x = torch.poisson(torch.rand(cells, genes, generator=g, dtype=torch.float64) * 8, generator=g)
    x[torch.rand(cells, genes, generator=g) < zero_frac] = 0
    shape = (cells, genes) if particles is None else (particles, cells, genes)
    logits = torch.randn(*shape, generator=g, dtype=dtype)
    log_library = (torch.rand(cells, generator=g, dtype=dtype) * 3 + 5)
    log_theta = torch.randn(genes, generator=g, dtype=dtype) * 2
    return x, logits, log_library, log_theta


def two_batch_screen(n_cells=240, n_genes=20, n_perturbations=3, seed=0):
    """A tiny simulated screen (AnnData) with two batches of different baseline expression:
    obs["line"] is "L1" / "L2" alternately, and the L2 cells' counts of the first half of the
    genes are tripled (before the batch's cells are drawn), so the batches differ."""
    import numpy as np
    import scipy.sparse as sp
    from samsvae.data import simulate_screen
    adata = simulate_screen(n_cells=n_cells, n_genes=n_genes, n_perturbations=n_perturbations,
                            n_latent=3, seed=seed, control_fraction=0.3)
    line = np.where(np.arange(adata.n_obs) % 2 == 0, "L1", "L2")
    x = sp.csr_matrix(adata.X).astype(np.float64).toarray()
    x[line == "L2", : n_genes // 2] *= 3
    adata.X = sp.csr_matrix(x.astype(np.float32))
    adata.obs["line"] = line
    return adata


needs_cpp = pytest.mark.skipif(not cpp_extension.ext_available(),
                               reason=f"C++ extension not built: {cpp_extension.EXT_ERROR}")
try:
    import triton  # noqa: F401  (the kernels run under the interpreter without CUDA)
    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
# the interpreter evaluates both branches of tl.where: inf/nan in the discarded lanes are fine
INTERPRETER_WARNINGS = [pytest.mark.filterwarnings("ignore:divide by zero encountered"),
                        pytest.mark.filterwarnings("ignore:invalid value encountered"),
                        pytest.mark.filterwarnings("ignore:overflow encountered"),
                        pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")]


class CrashAt:
    """A Trainer callback that interrupts training before step ``at + 1``, as a kill would:
    a resume test then continues a run with the same budget (hence the same warm-up)."""

    def __init__(self, at: int):
        self.at = at

    def on_step_start(self, trainer, step: int) -> None:
        if step == self.at + 1:
            raise KeyboardInterrupt(f"crash before step {step}")
