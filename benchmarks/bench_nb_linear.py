"""Peak memory and time of the fused decoder head ``nb_log_prob_linear`` as particles grow.

    OMP_NUM_THREADS=1 python benchmarks/bench_nb_linear.py --threads 1

Default: C = 512 cells, G = 8000 genes, H = 400 hidden units, P in {5, 50, 100} particles,
float32, CSR counts with 90% zeros. ``fused`` is ``nb_log_prob_linear`` (default chunk, NB
backend ``--backend``); ``unfused`` is ``nb_log_prob(counts, F.linear(hidden, weight, bias))``
with the same NB backend, run only up to ``--unfused-max-particles`` (its memory grows linearly
with P: several (P, C, G) float32 tensors, 1.6 GB each at P = 100).

Modes: ``fwd`` = forward with autograd recording (what the graph keeps alive is included) and
``fwd_bwd`` = forward + backward to hidden, weight, bias and log_theta. Peak memory is the extra
resident memory of one call over what was resident before it (inputs excluded, gradients
included), measured in a fresh worker per (impl, P) (see ``_harness``); times come from one
worker per P timing fused and unfused round-robin.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # this folder's helpers, then the repo's samsvae

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import _harness as H  # noqa: E402
import references as R  # noqa: E402
from samsvae import ops  # noqa: E402
from samsvae.ops import nb_log_prob, nb_log_prob_linear  # noqa: E402
from samsvae.ops.nb import default_chunk_rows  # noqa: E402

MODES = ("fwd", "fwd_bwd")


def make_inputs(cfg: Dict, device: str):
    g = torch.Generator().manual_seed(0)
    C, G, Hd, P = cfg["cells"], cfg["genes"], cfg["hidden"], cfg["particles"]
    counts = R.make_counts(C, G, cfg["zero_fraction"], device=device).to_sparse_csr()
    hidden = torch.randn(P, C, Hd, generator=g).to(device)
    weight = (torch.randn(G, Hd, generator=g) / Hd ** 0.5).to(device)
    bias = torch.randn(G, generator=g).to(device)
    log_lib = torch.log(counts.to_dense().sum(1).clamp_min(1.0))
    log_theta = (torch.randn(G, generator=g) + 1.0).to(device)
    return counts, hidden, weight, bias, log_lib, log_theta


def _fn(impl: str, backend: str, chunk_rows):
    if impl == "fused":
        return lambda c, h, w, b, ll, lt: nb_log_prob_linear(c, h, w, b, ll, lt, backend=backend,
                                                             chunk_rows=chunk_rows)
    return lambda c, h, w, b, ll, lt: nb_log_prob(c, F.linear(h, w, b), ll, lt, backend=backend)


def _call(fn, inputs, mode):
    counts, hidden, weight, bias, log_lib, log_theta = inputs

    def run():
        leaves = [t.detach().requires_grad_() for t in (hidden, weight, bias, log_theta)]
        h, w, b, lt = leaves
        out = fn(counts, h, w, b, log_lib, lt)
        if mode == "fwd_bwd":
            return torch.autograd.grad(out.sum(), leaves)
        return out
    return run


def worker(cfg: Dict) -> List[Dict]:
    """One particle count: time every impl in ``cfg['impls']`` round-robin, or measure the
    peak memory of the single impl given (memory workers hold one implementation each)."""
    threads = H.set_threads(cfg.get("threads"))
    device = cfg["device"]
    inputs = make_inputs(cfg, device)
    calls = {(impl, mode): _call(_fn(impl, cfg["backend"], cfg.get("chunk_rows")), inputs, mode)
             for impl in cfg["impls"] for mode in MODES}
    if cfg["measure"] == "time":
        stats = H.time_interleaved(calls, repeats=cfg["repeats"], warmup=cfg["warmup"],
                                   block=cfg.get("block", 1),
                                   device=device)
    rows = []
    for (impl, mode), call in calls.items():
        row = {"impl": impl, "mode": mode, "particles": cfg["particles"],
               "cells": cfg["cells"], "genes": cfg["genes"], "hidden": cfg["hidden"],
               "nb_backend": ops.backends.resolve("nb_log_prob", cfg["backend"], device)[0],
               "chunk_rows": cfg.get("chunk_rows") or default_chunk_rows(cfg["genes"],
                                                                         torch.float32)}
        if cfg["measure"] == "time":
            row.update(stats[(impl, mode)])
        else:
            call()  # first calls allocate one-time buffers that would inflate the peak
            row["peak_bytes"] = H.peak_memory_bytes(call, device)
        row.update(threads)
        rows.append(row)
    return rows


def _vs_unfused(by, r, mode) -> str:
    """Time of this row over the unfused time at the same P (timed in the same worker)."""
    base = by.get(("unfused", r["P"], mode))
    mine = by.get((r["impl"], r["P"], mode))
    return "-" if base is None or mine is None else f"{mine['median_s'] / base['median_s']:.2f}"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--particles", type=int, nargs="*", default=[5, 50, 100])
    ap.add_argument("--cells", type=int, default=512)
    ap.add_argument("--genes", type=int, default=8000)
    ap.add_argument("--hidden", type=int, default=400)
    ap.add_argument("--zero-fraction", type=float, default=0.9)
    ap.add_argument("--backend", default="auto", help="NB backend used by both forms")
    ap.add_argument("--chunk-rows", type=int, default=None)
    ap.add_argument("--unfused-max-particles", type=int, default=20)
    H.add_worker_args(ap, repeats=3, warmup=1)
    return ap.parse_args(argv)


def csv_rows(rows) -> List[Dict]:
    """The results.csv rows of :func:`main`'s rows (op ``nb_log_prob_linear``)."""
    out = []
    for r in rows:
        shape = H.shape_str(P=r["particles"], C=r["cells"], G=r["genes"], H=r["hidden"])
        out += H.timing_results("nb_log_prob_linear", r["impl"], shape, r["mode"], r)
    return out


def main(argv=None) -> Dict:
    args = parse_args(argv)
    if H.run_as_worker(args, worker):
        return {}
    threads_info = H.set_threads(args.threads)
    rows = []
    for P in args.particles:
        impls = ["fused"] + (["unfused"] if P <= args.unfused_max_particles else [])
        cfg = {"particles": P, "cells": args.cells, "genes": args.genes, "hidden": args.hidden,
               "zero_fraction": args.zero_fraction, "backend": args.backend,
               "chunk_rows": args.chunk_rows, "device": args.device, "threads": args.threads,
               "repeats": args.repeats, "warmup": args.warmup, "block": args.block}
        mem = {}
        for impl in impls:
            m_cfg = {**cfg, "impls": [impl], "measure": "memory"}
            m_rows = (worker(m_cfg) if args.in_process else
                      H.run_worker(__file__, m_cfg, args.threads, for_memory=True))
            mem.update({(r["impl"], r["mode"]): r["peak_bytes"] for r in m_rows})
        t_cfg = {**cfg, "impls": impls, "measure": "time"}
        t_rows = (worker(t_cfg) if args.in_process else
                  H.run_worker(__file__, t_cfg, args.threads, for_memory=False))
        rows.extend(dict(r, peak_bytes=mem[(r["impl"], r["mode"])]) for r in t_rows)
        print(f"done P={P}", file=sys.stderr, flush=True)
    rows.sort(key=lambda r: (r["impl"], r["particles"]))
    by = {(r["impl"], r["particles"], r["mode"]): r for r in rows}
    table_rows = [{"impl": i, "P": p} for i, p in dict.fromkeys((r["impl"], r["particles"])
                                                               for r in rows)]

    def cell(r, mode, f):
        x = by.get((r["impl"], r["P"], mode))
        return "-" if x is None else f(x)
    text = (f"C={args.cells}, G={args.genes}, H={args.hidden}, float32, CSR counts "
            f"({args.zero_fraction:.0%} zeros), NB backend {rows[0]['nb_backend']}, "
            f"chunk_rows={rows[0]['chunk_rows']}\n\n" + H.markdown_table(table_rows, [
                ("impl", "impl"), ("P", lambda r: str(r["P"])),
                ("rows P*C", lambda r: str(r["P"] * args.cells)),
                ("peak MiB fwd", lambda r: cell(r, "fwd", lambda x: H.fmt_bytes(x["peak_bytes"]))),
                ("peak MiB fwd+bwd", lambda r: cell(r, "fwd_bwd",
                                                    lambda x: H.fmt_bytes(x["peak_bytes"]))),
                ("fwd s", lambda r: cell(r, "fwd", lambda x: f"{x['median_s']:.2f}")),
                ("fwd+bwd s", lambda r: cell(r, "fwd_bwd", lambda x: f"{x['median_s']:.2f}")),
                ("fwd+bwd time / unfused", lambda r: _vs_unfused(by, r, "fwd_bwd")),
            ]))
    meta = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv)
            if argv is None else "bench_nb_linear.main(" + repr(argv) + ")",
            **H.device_info(args.device), **threads_info, "worker_threads": args.threads,
            "memory_method": ("torch.cuda.max_memory_allocated delta" if args.device == "cuda"
                              else "VmHWM - VmRSS around one call in a fresh worker with "
                                   "MALLOC_MMAP_THRESHOLD_=65536"),
            "timing": f"median of {args.repeats} after {args.warmup} warmup calls"}
    return H.publish(rows, meta, text, args, csv_rows(rows), device=args.device,
                     threads=threads_info["torch_threads"])


if __name__ == "__main__":
    main()
