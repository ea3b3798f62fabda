"""Benchmark the NB log-likelihood: every baseline of ``references.py`` against samsvae's backends.

    OMP_NUM_THREADS=1 python benchmarks/bench_nb.py --threads 1
    python benchmarks/bench_nb.py --quick                 # small subset
    python benchmarks/bench_nb.py --device cuda           # same on a GPU (+ the triton backend)

Grid: rows B in {256 (1 particle x 256 cells), 2560 (5 particles x 512 cells)}, genes
G in {2000, 8000}, zero fraction in {0.5, 0.9, 0.97}, float32. For each point and implementation:
forward (under ``no_grad``) and forward+backward (gradients of logits and log_theta) median wall
time, speed-up over ``eager`` measured in the same worker process (implementations timed
round-robin), forward throughput in G elements/s (B * G / time), peak extra memory of one call
(see ``_harness``), and the float32 error against the float64 reference (forward: max |error|
per row in nats; backward: max |error| of d/dlogits relative to its max magnitude).

Implementations: ``eager`` (log_softmax + lgamma, dense), ``scvi_formula`` (scvi-tools'
``log_nb_positive`` from its formula, on ``mu = library * softmax``), real scvi-tools / pyro
when importable, ``compile_eager`` and ``compile_sparse_coo`` (``torch.compile``; the latter
takes precomputed COO indices of the counts and evaluates lgamma on non-zeros only), and
samsvae's ``nb_log_prob`` backends with CSR and dense counts (``reference``, ``cpp`` when
built, ``triton`` on CUDA).

Each grid point runs in two fresh worker processes (timing, then memory), so compiled code,
caches and allocator pools of one point never leak into another.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # this folder's helpers, then the repo's samsvae

import torch  # noqa: E402

import _harness as H  # noqa: E402
import references as R  # noqa: E402
from samsvae import ops  # noqa: E402
from samsvae.ops import nb_log_prob, nb_log_prob_reference  # noqa: E402

ROWS = {256: (None, 256), 2560: (5, 512)}          # B -> (particles, cells)
FULL_GRID = [(b, g, z) for b in (256, 2560) for g in (2000, 8000) for z in (0.5, 0.9, 0.97)]
QUICK_GRID = [(2560, 2000, 0.5), (2560, 2000, 0.97)]
MODES = ("fwd", "fwd_bwd")


def make_impls(counts: torch.Tensor, device: str, *, compile_: bool,
               compile_backend: str = "inductor", only=None) -> Dict[str, Callable]:
    """name -> fn(logits, log_library, log_theta) over fixed counts (dense, CSR or COO)."""
    csr = counts.to_sparse_csr()
    coo = R.csr_to_coo(csr)
    impls: Dict[str, Callable] = {
        "eager": lambda lg, lib, lt: R.nb_eager(counts, lg, lib, lt),
        "scvi_formula": lambda lg, lib, lt: R.nb_scvi_formula(counts, lg, lib, lt),
    }
    for name, fn in R.optional_nb_baselines().items():
        impls[name] = (lambda f: (lambda lg, lib, lt: f(counts, lg, lib, lt)))(fn)
    if compile_:
        ce, cs = (R.compiled(R.nb_eager, compile_backend),
                  R.compiled(R.nb_sparse_coo, compile_backend))
        impls["compile_eager"] = lambda lg, lib, lt: ce(counts, lg, lib, lt)
        impls["compile_sparse_coo"] = lambda lg, lib, lt: cs(coo, lg, lib, lt)
    usable = {"cpu": ("reference", "cpp"), "cuda": ("reference", "triton")}[device]
    for b in ops.available_backends("nb_log_prob"):
        if b not in usable:
            continue
        for layout, c in (("csr", csr), ("dense", counts)):
            impls[f"{b}_{layout}"] = (lambda c_, b_: (
                lambda lg, lib, lt: nb_log_prob(c_, lg, lib, lt, backend=b_)))(c, b)
    if only:
        missing = set(only) - set(impls)
        if missing:
            raise SystemExit(f"--impls: unknown or unavailable {sorted(missing)}; "
                             f"available here: {sorted(impls)}")
        impls = {k: v for k, v in impls.items() if k in only or k == "eager"}
    return impls


def _call(fn, logits, lib, lt, mode):
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(logits, lib, lt)
    else:
        def run():
            lg, t = logits.detach().requires_grad_(), lt.detach().requires_grad_()
            return torch.autograd.grad(fn(lg, lib, t).sum(), (lg, t))
    return run


def _accuracy(fn, ref_value, ref_grad, logits, lib, lt) -> Dict[str, float]:
    lg = logits.detach().requires_grad_()
    out = fn(lg, lib, lt)
    (g,) = torch.autograd.grad(out.sum(), (lg,))
    return {"fwd_max_abs_err": float((out.detach().double() - ref_value).abs().max()),
            "grad_rel_err": float((g.double() - ref_grad).abs().max() / ref_grad.abs().max())}


def worker(cfg: Dict) -> List[Dict]:
    """Run one grid point; ``cfg['measure']`` is 'time' or 'memory'."""
    threads = H.set_threads(cfg.get("threads"))
    device = cfg["device"]
    particles, cells = ROWS.get(cfg["rows"], (None, cfg["rows"]))
    if "particles" in cfg:
        particles, cells = cfg["particles"], cfg["cells"]
    counts, logits, lib, lt = R.nb_inputs(particles, cells, cfg["genes"], cfg["zero_fraction"],
                                          seed=cfg.get("seed", 0), device=device)
    impls = make_impls(counts, device, compile_=cfg["compile"],
                       compile_backend=cfg.get("compile_backend", "inductor"),
                       only=cfg.get("impls"))
    acc_ref = None
    if cfg["measure"] == "time" and cfg.get("check", True):
        lg64 = logits.double().requires_grad_()
        val64 = nb_log_prob_reference(counts.double(), lg64, lib.double(), lt.double())
        (g64,) = torch.autograd.grad(val64.sum(), (lg64,))
        acc_ref = (val64.detach(), g64)
        del lg64, val64
    n_elem = logits.numel()
    calls = {(name, mode): _call(fn, logits, lib, lt, mode) for name, fn in impls.items()
             for mode in MODES}
    if cfg["measure"] == "time":
        stats = H.time_interleaved(calls, repeats=cfg["repeats"], warmup=cfg["warmup"],
                                   block=cfg.get("block", 1),
                                   device=device)
    rows = []
    for (name, mode), call in calls.items():
        row = {"impl": name, "mode": mode, "rows": n_elem // cfg["genes"],
               "particles": particles or 1, "cells": cells, "genes": cfg["genes"],
               "zero_fraction": cfg["zero_fraction"],
               "nonzero_fraction_actual": float((counts != 0).float().mean())}
        if cfg["measure"] == "time":
            row.update(stats[(name, mode)])
            if mode == "fwd":
                row["gelem_per_s"] = n_elem / row["median_s"] / 1e9
                if acc_ref is not None:
                    row.update(_accuracy(impls[name], acc_ref[0], acc_ref[1], logits, lib, lt))
        else:
            for _ in range(max(1, cfg["warmup"])):
                call()
            row["peak_bytes"] = H.peak_memory_bytes(call, device)
        row.update(threads)
        rows.append(row)
    return rows


def _point(r):
    return (r["rows"], r["genes"], r["zero_fraction"])


def tables(rows: List[Dict]) -> str:
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    points = list(dict.fromkeys(_point(r) for r in rows))
    by = {(_point(r), r["impl"], r["mode"]): r for r in rows}
    key = [("B", lambda p: str(p[0])), ("G", lambda p: str(p[1])), ("zeros", lambda p: str(p[2]))]

    def table(title, cell):
        cols = [(h, (lambda f: (lambda row: f(row["_p"])))(f)) for h, f in key]
        cols += [(i, (lambda i_: (lambda row: cell(row["_p"], i_)))(i)) for i in impls]
        return f"**{title}**\n\n" + H.markdown_table([{"_p": p} for p in points], cols)

    def get(p, i, m, f):
        r = by.get((p, i, m))
        return "-" if r is None or f(r) is None else f(r)

    out = []
    for mode, label in (("fwd", "forward"), ("fwd_bwd", "forward+backward")):
        out.append(table(f"{label}: median ms (speed-up vs eager)", lambda p, i, m=mode: get(
            p, i, m, lambda r: f"{r['median_s'] * 1e3:.2f} ({r['speedup_vs_eager']:.2f}x)")))
    out.append(table("forward throughput, G elements/s", lambda p, i: get(
        p, i, "fwd", lambda r: f"{r['gelem_per_s']:.3f}")))
    out.append(table("peak extra memory of one call, MiB: forward / forward+backward",
                     lambda p, i: f"{get(p, i, 'fwd', lambda r: H.fmt_bytes(r['peak_bytes']))} / "
                                  f"{get(p, i, 'fwd_bwd', lambda r: H.fmt_bytes(r['peak_bytes']))}"))
    if any("fwd_max_abs_err" in r for r in rows):
        out.append(table("float32 error vs float64 reference: max |err| per row (nats) / "
                         "d logits max rel err", lambda p, i: get(
                             p, i, "fwd", lambda r: f"{r['fwd_max_abs_err']:.2g} / "
                                                    f"{r['grad_rel_err']:.1e}"
                             if "fwd_max_abs_err" in r else None)))
    return "\n\n".join(out)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads and OMP_NUM_THREADS of the workers")
    ap.add_argument("--quick", action="store_true", help="a 2-point subset of the grid")
    ap.add_argument("--rows", type=int, nargs="*", help="override B (256 and 2560 are "
                    "1x256 and 5x512 particles x cells; other values are 1 particle)")
    ap.add_argument("--genes", type=int, nargs="*", help="override G")
    ap.add_argument("--zero-fractions", type=float, nargs="*", help="override zero fractions")
    ap.add_argument("--impls", nargs="*", help="only these implementations (+ eager)")
    H.add_worker_args(ap, repeats=7, warmup=2, compile_=True)
    return ap.parse_args(argv)


def grid(args):
    pts = QUICK_GRID if args.quick else FULL_GRID
    if args.rows or args.genes or args.zero_fractions:
        bs = args.rows or sorted({p[0] for p in pts})
        gs = args.genes or sorted({p[1] for p in pts})
        zs = args.zero_fractions or sorted({p[2] for p in pts})
        pts = [(b, g, z) for b in bs for g in gs for z in zs]
    return pts


def csv_rows(rows) -> List[Dict]:
    """The results.csv rows of :func:`main`'s rows (op ``nb_log_prob``)."""
    out = []
    for r in rows:
        shape = H.shape_str(B=r["rows"], G=r["genes"], zeros=r["zero_fraction"])
        out += H.timing_results("nb_log_prob", r["impl"], shape, r["mode"], r, "speedup_vs_eager")
        if r["mode"] == "fwd" and r.get("gelem_per_s") is not None:
            out.append(H.result("nb_log_prob", r["impl"], shape, "fwd_gelem_per_s",
                                r["gelem_per_s"]))
    return out


def main(argv=None) -> Dict:
    args = parse_args(argv)
    if H.run_as_worker(args, worker):
        return {}
    H.require_device(args.device)
    threads_info = H.set_threads(args.threads)
    rows = []
    for b, g, z in grid(args):
        cfg = {"rows": b, "genes": g, "zero_fraction": z, "device": args.device,
               "threads": args.threads, "compile": not args.no_compile,
               "compile_backend": args.compile_backend, "impls": args.impls,
               "repeats": args.repeats, "warmup": args.warmup, "block": args.block,
               "check": not args.no_check}
        t_rows, m_rows = H.measure_both(__file__, worker, cfg, args)
        rows.extend(H.merge_time_memory(t_rows, m_rows, "eager"))
        print(f"done B={b} G={g} zeros={z}", file=sys.stderr, flush=True)
    meta = H.run_meta("bench_nb", argv, args, threads_info)
    return H.publish(rows, meta, tables(rows), args, csv_rows(rows), device=args.device,
                     threads=threads_info["torch_threads"])


if __name__ == "__main__":
    main()
