"""The execution options shared by ``train`` and ``evaluate``: where and on which kernels a
command runs. None of them is saved with a run."""
from __future__ import annotations

from .. import ops


def add_execution_arguments(group, *, what: str) -> None:
    """``--device``, ``--tf32`` and ``--backend`` on ``group`` (a parser or argument group);
    ``what`` names the work in the help ("this training", "this evaluation")."""
    group.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    group.add_argument("--tf32", action="store_true",
                       help="on --device cuda: TF32 matrix products (faster, ~1e-3 relative "
                            "error per product); off by default; not saved with the run")
    group.add_argument("--backend", default="auto", choices=("auto",) + ops.backends.BACKENDS,
                       help=f"kernel backend of the fused ops for {what} (default: auto); not "
                            "saved with the run, so a run trained on one evaluates on any")
