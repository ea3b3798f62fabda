"""``samsvae predict RUN_DIR``: simulated integer counts of conditions, as an .h5ad.

    samsvae predict RUN_DIR --perturbations A,B+C,control --cells 500 --out pred.h5ad
                    [--seed 0] [--library control|N] [--data DATA.h5ad] [--batch NAME[,NAME]]

Writes an AnnData of raw counts (cells x genes, integer CSR; obs: condition, library, and batch
for a run trained with --batch-key), the input that scanpy (normalize_total, log1p,
rank_genes_groups), pertpy or PyDESeq2 take as is.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from .. import ops
from ..infer import sample_counts_anndata
from ..train.run_dir import load_run


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="directory written by samsvae train")
    parser.add_argument("--perturbations", required=True, metavar="A,B+C",
                        help="comma-separated conditions: seen perturbations, compositions "
                             "joined by '+', or the control label")
    parser.add_argument("--cells", type=int, default=100, metavar="N",
                        help="simulated cells per condition (and batch) (default: 100)")
    parser.add_argument("--out", required=True, metavar="PRED.h5ad", help="file to write")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed; a condition's cells depend on it and the condition only")
    parser.add_argument("--library", default="control", metavar="control|N",
                        help="library size of the simulated cells: 'control' (default) draws "
                             "each from the control cells' sizes, scaled by the condition's "
                             "learnt depth shift; a number: every cell at that size")
    parser.add_argument("--data", default=None, metavar="DATA.h5ad",
                        help="screen whose control cells give the library sizes (default: the "
                             "run's training file)")
    parser.add_argument("--batch", default=None, metavar="NAME[,NAME]",
                        help="runs trained with --batch-key: the batches to simulate (default: "
                             "every batch, --cells each)")
    parser.add_argument("--effects", default="mean", choices=("mean", "sample"),
                        help="perturbation effects at their guide means (default) or sampled "
                             "per cell")
    parser.add_argument("--device", default="cpu", help="cpu | cuda (default: cpu)")


def _library(value: str):
    if value == "control":
        return value
    try:
        size = float(value)
    except ValueError:
        size = float("nan")
    if not size > 0 or size == float("inf"):
        raise ValueError(f"--library must be 'control' or a positive number, got {value!r}")
    return size


def run(args) -> int:
    try:
        labels = [s.strip() for s in args.perturbations.split(",") if s.strip()]
        if not labels:
            raise ValueError("--perturbations names no condition; e.g. --perturbations A,B+C")
        if args.cells < 1:
            raise ValueError(f"--cells must be >= 1, got {args.cells}")
        library = _library(args.library)
        out = Path(args.out)
        if out.suffix != ".h5ad":
            raise ValueError(f"--out must name an .h5ad file, got {args.out}")
        batch = None if args.batch is None else [b.strip() for b in args.batch.split(",")]
        loaded = load_run(args.run_dir, data=args.data, map_location=args.device)
        with ops.use_backend("auto"):
            adata = sample_counts_anndata(loaded.model, loaded.screen, labels,
                                          n_cells=args.cells, library=library, batch=batch,
                                          seed=args.seed, effects=args.effects)
        out.parent.mkdir(parents=True, exist_ok=True)
        adata.write_h5ad(out)
    except (ValueError, FileNotFoundError) as exc:
        if os.environ.get("SAMSVAE_DEBUG"):
            raise
        print(f"samsvae predict: error: {exc}", file=sys.stderr)
        return 2
    conditions = adata.uns["samsvae_sample_counts"]["conditions"]
    print(f"wrote {out}: {adata.n_obs} simulated cells x {adata.n_vars} genes (integer counts; "
          f"conditions {', '.join(conditions)}; obs: {', '.join(adata.obs.columns)})")
    return 0
