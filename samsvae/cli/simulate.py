"""``samsvae simulate OUT.h5ad``: write a simulated perturbation screen to an .h5ad file."""
from __future__ import annotations

import argparse

from ..data.simulate import write_simulated_screen


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT.h5ad", help="file to write")
    parser.add_argument("--cells", type=int, default=5000, help="number of cells (default 5000)")
    parser.add_argument("--genes", type=int, default=500, help="number of genes (default 500)")
    parser.add_argument("--perturbations", type=int, default=20,
                        help="number of single perturbations T (default 20)")
    parser.add_argument("--combinations", type=int, default=0,
                        help="number of double perturbations (random pairs of singles; default 0)")
    parser.add_argument("--mask-prob", type=float, default=0.1,
                        help="probability that a latent dimension is in a perturbation's mask (0.1)")
    parser.add_argument("--latent", type=int, default=10, help="latent dimensions L (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--control-fraction", type=float, default=0.1,
                        help="fraction of control cells (default 0.1)")
    parser.add_argument("--chunk-cells", type=int, default=10_000,
                        help="cells generated and written per step (default 10000)")
    parser.add_argument("--compression", choices=["gzip", "lzf"], default=None,
                        help="compress X in the file (smaller, slower; default none)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:

    summary = write_simulated_screen(
        args.out, args.cells, args.genes, args.perturbations, chunk_cells=args.chunk_cells,
        compression=args.compression, progress=not args.quiet, n_combinations=args.combinations,
        mask_prob=args.mask_prob, n_latent=args.latent, seed=args.seed,
        control_fraction=args.control_fraction)
    density = summary["nnz"] / max(1, summary["n_cells"] * summary["n_genes"])
    print(f"wrote {summary['path']}: {summary['n_cells']:,} cells x {summary['n_genes']:,} genes, "
          f"{summary['n_perturbations']:,} perturbations + {summary['n_combinations']:,} "
          f"combinations, {summary['nnz']:,} non-zero counts ({density:.1%}), "
          f"{summary['bytes'] / 2**20:,.1f} MiB in {summary['seconds']:.1f} s")
    return 0
