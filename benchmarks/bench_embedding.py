"""Benchmark masked_embedding_sum (sample e, m for the batch's perturbations and compose z_p).

    OMP_NUM_THREADS=1 python benchmarks/bench_embedding.py --threads 1
    python benchmarks/bench_embedding.py --device cuda    # same on a GPU (+ the triton backend)

Default point: T = 10,000 perturbations, L = 100 latent dims, P = 5 particles, a batch of 512
cells with 1-2 perturbations each, masked (SAMS-VAE) embeddings, float32. Forward (under
``no_grad``) and forward+backward (gradients of loc, log_scale and mask_logits; upstream
``z_p.sum()``), median wall time, speed-up over ``dense_all_t`` measured in the same worker
(implementations timed round-robin), peak extra memory of one call (see ``_harness``) and the
float32 error of ``z_p`` against the float64 reference driven by the same noise.

Implementations (``references.py``): ``dense_all_t`` samples all T embeddings and masks and
multiplies by a dense (C, T) dosage (given precomputed: its construction is not timed);
``bag_all_t`` samples all T and sums with ``F.embedding_bag``; ``bag_batch_u`` samples only the
U perturbations in the batch (``unique`` inside) and uses ``embedding_bag``;
``index_add_batch_u`` samples U and gathers + ``index_add`` on indices a loader could precompute
(given precomputed); ``compile_*`` are ``torch.compile`` of those taking plain tensors; then
samsvae's ``masked_embedding_sum`` backends (``reference``, ``cpp`` when built, ``triton`` on
CUDA) on the CSR dosage.
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
from samsvae.ops import masked_embedding_sum  # noqa: E402
from samsvae.ops.embedding import masked_embedding_sum_reference  # noqa: E402

MODES = ("fwd", "fwd_bwd")
BASELINE = "dense_all_t"


def make_inputs(cfg: Dict, device: str, dtype=torch.float32):
    T, L = cfg["perturbations"], cfg["latent"]
    g = torch.Generator().manual_seed(cfg.get("seed", 0))
    dosage = R.make_dosage(cfg["cells"], T, max_per_cell=cfg["max_per_cell"],
                           seed=cfg.get("seed", 0), dtype=dtype, device=device)
    loc = torch.randn(T, L, generator=g).to(device=device, dtype=dtype)
    log_scale = (torch.randn(T, L, generator=g) * 0.3 - 1.0).to(device=device, dtype=dtype)
    mask_logits = torch.randn(T, L, generator=g).to(device=device, dtype=dtype)
    return dosage, loc, log_scale, mask_logits


def make_impls(dosage: torch.Tensor, device: str, *, compile_: bool,
               compile_backend: str = "inductor", only=None) -> Dict[str, Callable]:
    """name -> fn(loc, log_scale, mask_logits, particles, noise=None) -> z_p (P, C, L).

    ``noise`` (for the accuracy check) is ``(noise_U, noise_T)`` from ``R.embedding_noise``; the
    samsvae ops take a seeded generator instead (they draw the same U noise from it).
    """
    dense = dosage.to_dense()
    parts = R.csr_parts(dosage)
    index, coo = R.coo_local(dosage)
    C = dosage.shape[0]
    impls: Dict[str, Callable] = {
        "dense_all_t": lambda lo, ls, ml, P, noise=None: R.embedding_dense_all_t(
            dense, lo, ls, ml, P, noise=noise and noise[1]),
        "bag_all_t": lambda lo, ls, ml, P, noise=None: R.embedding_bag_all_t(
            parts, lo, ls, ml, P, noise=noise and noise[1]),
        "bag_batch_u": lambda lo, ls, ml, P, noise=None: R.embedding_bag_batch_u(
            dosage, lo, ls, ml, P, noise=noise and noise[0]),
        "index_add_batch_u": lambda lo, ls, ml, P, noise=None: R.embedding_index_add_batch_u(
            coo, C, index, lo, ls, ml, P, noise=noise and noise[0]),
    }
    if compile_:
        cd = R.compiled(R.embedding_dense_all_t, compile_backend)
        cb = R.compiled(R.embedding_bag_all_t, compile_backend)
        ci = R.compiled(R.embedding_index_add_batch_u, compile_backend)
        impls["compile_dense_all_t"] = lambda lo, ls, ml, P, noise=None: cd(
            dense, lo, ls, ml, P, noise=noise and noise[1])
        impls["compile_bag_all_t"] = lambda lo, ls, ml, P, noise=None: cb(
            parts, lo, ls, ml, P, noise=noise and noise[1])
        impls["compile_index_add_batch_u"] = lambda lo, ls, ml, P, noise=None: ci(
            coo, C, index, lo, ls, ml, P, noise=noise and noise[0])
    usable = {"cpu": ("reference", "cpp"), "cuda": ("reference", "triton")}[device]
    for b in ops.available_backends("masked_embedding_sum"):
        if b in usable:
            def op(lo, ls, ml, P, noise=None, b_=b):
                gen = None
                if noise is not None:  # the seed that drew noise_U in R.embedding_noise
                    gen = torch.Generator(device=lo.device).manual_seed(noise[2])
                return masked_embedding_sum(dosage, lo, ls, ml, particles=P, generator=gen,
                                            backend=b_).z_p
            impls[b] = op
    if only:
        missing = set(only) - set(impls)
        if missing:
            raise SystemExit(f"--impls: unknown or unavailable {sorted(missing)}; "
                             f"available here: {sorted(impls)}")
        impls = {k: v for k, v in impls.items() if k in only or k == BASELINE}
    return impls


def _call(fn, params, particles, mode):
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(*params, particles)
    else:
        def run():
            leaves = [p.detach().requires_grad_() for p in params]
            return torch.autograd.grad(fn(*leaves, particles).sum(), leaves)
    return run


def _accuracy(fn, dosage, params, particles, seed=1234) -> float:
    """max |z_p(float32 impl) - z_p(float64 reference)| with identical noise."""
    index = R.coo_local(dosage)[0]
    T, L = params[0].shape
    gen = torch.Generator(device=params[0].device).manual_seed(seed)
    n_u, n_t = R.embedding_noise(particles, T, L, index, dtype=params[0].dtype,
                                 device=params[0].device, generator=gen)
    with torch.no_grad():
        got = fn(*params, particles, noise=(n_u, n_t, seed))
        d64 = torch.sparse_csr_tensor(dosage.crow_indices(), dosage.col_indices(),
                                      dosage.values().double(), size=dosage.shape,
                                      check_invariants=False)
        want = masked_embedding_sum_reference(
            d64, *[p.double() for p in params], particles=particles,
            noise=tuple(n.double() for n in n_u)).z_p
    return float((got.double() - want).abs().max())


def worker(cfg: Dict) -> List[Dict]:
    threads = H.set_threads(cfg.get("threads"))
    device = cfg["device"]
    dosage, *params = make_inputs(cfg, device)
    impls = make_impls(dosage, device, compile_=cfg["compile"],
                       compile_backend=cfg.get("compile_backend", "inductor"),
                       only=cfg.get("impls"))
    P = cfg["particles"]
    calls = {(name, mode): _call(fn, params, P, mode) for name, fn in impls.items()
             for mode in MODES}
    if cfg["measure"] == "time":
        stats = H.time_interleaved(calls, repeats=cfg["repeats"], warmup=cfg["warmup"],
                                   block=cfg.get("block", 1),
                                   device=device)
    index = R.coo_local(dosage)[0]
    rows = []
    for (name, mode), call in calls.items():
        row = {"impl": name, "mode": mode, "perturbations": cfg["perturbations"],
               "latent": cfg["latent"], "particles": P, "cells": cfg["cells"],
               "present_U": int(index.numel()), "nnz": int(dosage.values().numel())}
        if cfg["measure"] == "time":
            row.update(stats[(name, mode)])
            if mode == "fwd" and cfg.get("check", True):
                row["max_abs_err"] = _accuracy(impls[name], dosage, params, P)
        else:
            for _ in range(max(1, cfg["warmup"])):
                call()
            row["peak_bytes"] = H.peak_memory_bytes(call, device)
        row.update(threads)
        rows.append(row)
    return rows


def tables(rows: List[Dict]) -> str:
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    by = {(r["impl"], r["mode"]): r for r in rows}

    def fmt(i, m, f):
        r = by.get((i, m))
        return "-" if r is None else f(r)

    out = [H.markdown_table([{"impl": i} for i in impls], [
        ("implementation", "impl"),
        ("fwd ms", lambda r: fmt(r["impl"], "fwd", lambda x: f"{x['median_s'] * 1e3:.2f}")),
        (f"fwd speed-up vs {BASELINE}", lambda r: fmt(
            r["impl"], "fwd", lambda x: f"{x['speedup_vs_dense_all_t']:.2f}x")),
        ("fwd+bwd ms", lambda r: fmt(r["impl"], "fwd_bwd", lambda x: f"{x['median_s'] * 1e3:.2f}")),
        (f"fwd+bwd speed-up vs {BASELINE}", lambda r: fmt(
            r["impl"], "fwd_bwd", lambda x: f"{x['speedup_vs_dense_all_t']:.2f}x")),
        ("peak MiB fwd", lambda r: fmt(r["impl"], "fwd", lambda x: H.fmt_bytes(x["peak_bytes"]))),
        ("peak MiB fwd+bwd", lambda r: fmt(r["impl"], "fwd_bwd",
                                           lambda x: H.fmt_bytes(x["peak_bytes"]))),
        ("max abs err vs f64", lambda r: fmt(r["impl"], "fwd", lambda x: f"{x['max_abs_err']:.1e}"
                                             if "max_abs_err" in x else "-")),
    ])]
    r0 = rows[0]
    head = (f"T={r0['perturbations']}, L={r0['latent']}, P={r0['particles']}, "
            f"cells={r0['cells']}, U present={r0['present_U']}, nnz={r0['nnz']}")
    return head + "\n\n" + out[0]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--perturbations", type=int, default=10_000, help="T")
    ap.add_argument("--latent", type=int, default=100, help="L")
    ap.add_argument("--particles", type=int, default=5, help="P")
    ap.add_argument("--cells", type=int, default=512, help="batch size")
    ap.add_argument("--max-per-cell", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="fewer repeats, no torch.compile")
    ap.add_argument("--impls", nargs="*", help=f"only these implementations (+ {BASELINE})")
    H.add_worker_args(ap, repeats=15, warmup=3, compile_=True)
    return ap.parse_args(argv)


def csv_rows(rows) -> List[Dict]:
    """The results.csv rows of :func:`main`'s rows (op ``masked_embedding_sum``)."""
    out = []
    for r in rows:
        shape = H.shape_str(T=r["perturbations"], L=r["latent"], P=r["particles"], C=r["cells"])
        out += H.timing_results("masked_embedding_sum", r["impl"], shape, r["mode"], r,
                                f"speedup_vs_{BASELINE}")
    return out


def main(argv=None) -> Dict:
    args = parse_args(argv)
    if H.run_as_worker(args, worker):
        return {}
    H.require_device(args.device)
    if args.quick:
        args.repeats, args.warmup, args.no_compile = min(args.repeats, 3), 1, True
    threads_info = H.set_threads(args.threads)
    cfg = {"perturbations": args.perturbations, "latent": args.latent, "particles": args.particles,
           "cells": args.cells, "max_per_cell": args.max_per_cell, "device": args.device,
           "threads": args.threads, "compile": not args.no_compile,
           "compile_backend": args.compile_backend, "impls": args.impls,
           "repeats": args.repeats, "warmup": args.warmup, "block": args.block, "check": not args.no_check}
    t_rows, m_rows = H.measure_both(__file__, worker, cfg, args)
    rows = H.merge_time_memory(t_rows, m_rows, BASELINE)
    meta = H.run_meta("bench_embedding", argv, args, threads_info)
    return H.publish(rows, meta, tables(rows), args, csv_rows(rows), device=args.device,
                     threads=threads_info["torch_threads"])


if __name__ == "__main__":
    main()
