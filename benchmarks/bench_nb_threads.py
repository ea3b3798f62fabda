"""Thread scaling of the C++ NB kernel: the same calls at 1 and N intra-op threads, alternated.

    OMP_NUM_THREADS=2 python benchmarks/bench_nb_threads.py --threads 1 2 --out scaling.json

Each round runs every (thread count, shape, mode) ``--block`` times in a row after one untimed
call, switching ``torch.set_num_threads`` between blocks, so that both thread counts see the
same machine state; the table gives median ms and the speed-up of each thread count over the
first. Only meaningful on an otherwise idle machine: a second process on the other core halves
what a second thread can add (the script prints the load average before and after).
``OMP_NUM_THREADS`` must be at least the largest thread count (OpenMP sizes its pool from it).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _harness as H  # noqa: E402
import references as R  # noqa: E402
from samsvae.ops import nb_log_prob  # noqa: E402

SHAPES = {256: (None, 256), 2560: (5, 512)}  # B -> (particles, cells), as bench_nb.py


def _calls(rows: int, genes: int, zero_fraction: float):
    particles, cells = SHAPES.get(rows, (None, rows))
    counts, logits, lib, lt = R.nb_inputs(particles, cells, genes, zero_fraction)
    csr = counts.to_sparse_csr()

    def fwd():
        with torch.no_grad():
            nb_log_prob(csr, logits, lib, lt, backend="cpp")

    def fwd_bwd():
        lg, t = logits.detach().requires_grad_(), lt.detach().requires_grad_()
        torch.autograd.grad(nb_log_prob(csr, lg, lib, t, backend="cpp").sum(), (lg, t))
    return {"fwd": fwd, "fwd_bwd": fwd_bwd}


def csv_rows(rows, cpu_label: str) -> List[Dict]:
    """The results.csv rows (op ``nb_log_prob``, implementation ``cpp_csr``; the machine column
    names each row's thread count)."""
    out = []
    for r in rows:
        shape = H.shape_str(B=r["rows"], G=r["genes"], zeros=r["zero_fraction"])
        m = r["mode"].replace("_", "")
        extra = {"machine": f"{cpu_label} t{r['threads']}"}
        out += [H.result("nb_log_prob", "cpp_csr", shape, f"{m}_ms", 1e3 * r["median_s"],
                         **extra),
                H.result("nb_log_prob", "cpp_csr", shape, f"{m}_speedup_vs_t1",
                         r["speedup_over_first"], **extra)]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rows", type=int, nargs="+", default=[256, 2560])
    ap.add_argument("--genes", type=int, default=8000)
    ap.add_argument("--zero-fraction", type=float, default=0.9)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--block", type=int, default=5)
    H.add_output_args(ap)
    args = ap.parse_args(argv)
    omp = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if omp and omp < max(args.threads):
        raise SystemExit(f"OMP_NUM_THREADS={omp} < {max(args.threads)} threads asked for: "
                         f"run with OMP_NUM_THREADS={max(args.threads)}")
    load_before = os.getloadavg()
    calls = {(b, m): fn for b in args.rows
             for m, fn in _calls(b, args.genes, args.zero_fraction).items()}
    times = {(t, key): [] for t in args.threads for key in calls}
    for t in args.threads:          # warm-up at every thread count
        torch.set_num_threads(t)
        for fn in calls.values():
            fn()
    for _ in range(args.rounds):
        for key, fn in calls.items():
            for t in args.threads:
                torch.set_num_threads(t)
                fn()
                for _ in range(args.block):
                    t0 = time.perf_counter()
                    fn()
                    times[(t, key)].append(time.perf_counter() - t0)
    load_after = os.getloadavg()
    rows = []
    for (b, m) in calls:
        base = statistics.median(times[(args.threads[0], (b, m))])
        for t in args.threads:
            med = statistics.median(times[(t, (b, m))])
            rows.append({"rows": b, "genes": args.genes, "zero_fraction": args.zero_fraction,
                         "mode": m, "threads": t, "median_s": med, "min_s": min(times[(t, (b, m))]),
                         "speedup_over_first": base / med, "n": len(times[(t, (b, m))])})
    table = H.markdown_table(rows, [("B", "rows"), ("G", "genes"), ("mode", "mode"),
                                    ("threads", "threads"),
                                    ("median ms", lambda r: f"{r['median_s'] * 1e3:.2f}"),
                                    ("speed-up", lambda r: f"{r['speedup_over_first']:.2f}x")])
    text = (f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} "
            f"(cpu_count {os.cpu_count()})\n\n{table}")
    meta = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            **H.device_info("cpu"), "threads": args.threads, "OMP_NUM_THREADS": omp,
            "load_before": load_before, "load_after": load_after,
            "timing": f"median of {args.rounds} rounds x {args.block} consecutive calls per "
                      "thread count (after one untimed call), thread counts alternated"}
    return H.publish(rows, meta, text, args, csv_rows(rows, H.cpu_label()))


if __name__ == "__main__":
    main()
