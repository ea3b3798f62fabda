"""The last step of ``gpu_check.sh``: a run trained (and evaluated) on the GPU, loaded on the CPU
through the user API and evaluated there to the same metrics within Monte Carlo noise.

    python benchmarks/gpu_check_cpu_load.py RUN_DIR SCREEN.h5ad GPU_METRICS.json \\
        [--iwelbo-particles K] [--ate-particles N] [--min-cells M] [--out cpu_metrics.json]

Reads the h5ad with anndata, ``SAMSVAE.load(run_dir, adata, map_location="cpu")``, and evaluates
the loaded model on the run's test split with ``samsvae.infer.evaluate_model`` (the function
``samsvae evaluate`` calls) at seeds 0 and 1. The Monte Carlo noise of a metric is taken as
the spread between those two CPU evaluations; the GPU figure (``samsvae evaluate --device cuda``,
seed 0) passes when it lies within ``4 x noise + floor`` of the CPU seed-0 figure (floors:
IWELBO 0.2% + 0.05 nats, ATE Pearson 0.02: the GPU and CPU draw different random numbers, so
the values are not expected to be bit-equal). Exit 0 when every metric agrees, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys

FLOORS = {"test_iwelbo": lambda v: 0.002 * abs(v) + 0.05, "ate_pearson": lambda v: 0.02}


def compare(gpu: dict, cpu0: dict, cpu1: dict) -> list:
    """Rows ``(metric, gpu, cpu, noise, tolerance, ok)`` for each metric both sides have."""
    rows = []
    for key, floor in FLOORS.items():
        a, b, c = gpu.get(key), cpu0.get(key), cpu1.get(key)
        if a is None or b is None:
            continue
        noise = abs(b - c) if c is not None else 0.0
        tol = 4.0 * noise + floor(b)
        rows.append((key, a, b, noise, tol, abs(a - b) <= tol))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("h5ad")
    p.add_argument("gpu_metrics", help="metrics.json written by samsvae evaluate on the GPU")
    p.add_argument("--iwelbo-particles", type=int, default=20)
    p.add_argument("--ate-particles", type=int, default=50)
    p.add_argument("--min-cells", type=int, default=20)
    p.add_argument("--out", default=None, help="write the CPU metrics and the comparison here")
    args = p.parse_args(argv)

    import anndata
    import numpy as np
    import torch

    from samsvae import SAMSVAE
    from samsvae.infer import evaluate_model

    adata = anndata.read_h5ad(args.h5ad)
    model = SAMSVAE.load(args.run_dir, adata, map_location="cpu")
    params = [t for t in model.module.parameters()] + [t for t in model.module.buffers()]
    devices = {str(t.device) for t in params}
    if devices != {"cpu"}:
        print(f"loaded model has tensors on {sorted(devices)}, expected cpu only")
        return 1
    idx = np.flatnonzero(model.split == "test")
    cpu = []
    with torch.no_grad():
        for seed in (0, 1):
            raw = evaluate_model(model.module.eval(), model.screen, idx,
                                 iwelbo_particles=args.iwelbo_particles,
                                 ate_particles=args.ate_particles, seed=seed,
                                 min_cells=args.min_cells)
            cpu.append({k: (float(v) if v is not None else None) for k, v in raw.items()
                        if k in FLOORS})
    with open(args.gpu_metrics) as f:
        gpu = json.load(f)
    rows = compare(gpu, cpu[0], cpu[1])
    for key, a, b, noise, tol, ok in rows:
        print(f"{key}: gpu {a:.6g}  cpu {b:.6g}  |diff| {abs(a - b):.3g}  mc noise {noise:.3g}  "
              f"tolerance {tol:.3g}  {'ok' if ok else 'DIFFERENT'}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"cpu_seed0": cpu[0], "cpu_seed1": cpu[1], "gpu": {k: gpu.get(k) for k in FLOORS},
                       "rows": [list(r) for r in rows]}, f, indent=1)
    if not rows:
        print("no metric to compare (test_iwelbo missing)")
        return 1
    return 0 if all(r[-1] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
