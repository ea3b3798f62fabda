"""GPU benchmark of the Triton kernels against PyTorch baselines (needs CUDA).

    python benchmarks/bench_triton_gpu.py --out bench_triton.json
    python benchmarks/bench_triton_gpu.py --cases 5x512x8000 1x2560x8000 1x25600x8000 5x512x7993
    TRITON_INTERPRET=1 python benchmarks/bench_triton_gpu.py --device cpu --cases 2x6x40 ...
        (the measuring code at tiny sizes under the interpreter: what gpu_check.sh --dry-run runs)

nb_log_prob, forward and forward+backward (d logits and d log_theta), for every case: either
``--cases PxBxG`` (P particles; P > 1 gives logits (P, B, G) against counts (B, G) shared by
every particle, the training shape) or the grid ``--batch`` x ``--genes`` (P = 1), at each
``--zero-fractions``:

    triton_dense / triton_csr   the Triton kernel with dense or CSR counts
    eager                       references.nb_eager (dense counts), plain PyTorch
    compile                     torch.compile of that same eager form (references.compiled)
    compile_sparse              torch.compile of the sparsity-aware form references.nb_sparse_coo:
                                the x = 0 term over all genes, lgamma terms on the non-zeros only

Each baseline exists once, in ``benchmarks/references.py``. Bytes moved per call are the least a
forward-then-backward implementation must move (forward: read logits and counts; backward: read
them again and write d logits; CSR counts as 8 bytes per non-zero plus row pointers); the
effective bandwidth of the faster Triton layout is reported as a fraction of a device-to-device
copy (``dst.copy_(src)``, read + write) measured in the same run.

Also: the encoder op ``log1p_standardize_linear`` (Triton features + cuBLAS vs the reference,
forward + backward to weight and bias) and the decoder head (``F.linear`` with the bias in the
GEMM epilogue + Triton NB vs the reference op vs eager), and masked_embedding_sum (T
perturbations, latent L, P particles) vs the reference and the dense ``D @ (E * M)``.

Times are ``triton.testing.do_bench`` medians (L2 flushed between calls) in milliseconds. A
markdown table of times and speed-ups (baseline time / triton time) goes to stdout, and
everything, including any error per measurement, to the JSON file given by --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as H  # noqa: E402
import references as R  # noqa: E402

from samsvae.ops.embedding import (masked_embedding_sum_reference,  # noqa: E402
                                   relaxed_bernoulli_st)
from samsvae.ops.nb import nb_log_prob_reference  # noqa: E402

DEVICE = "cuda"  # tests of this script set "cpu" to run its logic under the Triton interpreter
NB_METHODS = ("triton_dense", "triton_csr", "eager", "compile", "compile_sparse")
EMB_METHODS = ("triton", "reference", "dense_matmul")


# ----------------------------------------------------------------------------- arguments

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    H.add_output_args(p, out_default="bench_triton_gpu.json")
    p.add_argument("--batch", type=int, nargs="+", default=[256, 2560], help="cells B")
    p.add_argument("--genes", type=int, nargs="+", default=[2000, 8000], help="genes G")
    p.add_argument("--zero-fractions", type=float, nargs="+", default=[0.5, 0.9, 0.97])
    p.add_argument("--cases", nargs="+", default=None, metavar="PxBxG",
                   help="NB cases particles x cells x genes (replaces the --batch x --genes grid)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: the measuring code under TRITON_INTERPRET=1 at tiny sizes (CI)")
    p.add_argument("--warmup-ms", type=float, default=25.0, help="do_bench warm-up (ms)")
    p.add_argument("--rep-ms", type=float, default=100.0, help="do_bench measuring time (ms)")
    p.add_argument("--quick", action="store_true", help="warm-up 10 ms, measuring 40 ms")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    p.add_argument("--compile-max-elements", type=float, default=3e7,
                   help="torch.compile baselines only for cases with at most this many logits "
                        "(each shape compiles anew: seconds to a minute each)")
    p.add_argument("--copy-mib", type=float, default=1024.0,
                   help="size of the device-to-device copy that sets the bandwidth scale")
    p.add_argument("--hidden", type=int, default=400, help="encoder / head hidden width H")
    p.add_argument("--no-embedding", action="store_true")
    p.add_argument("--no-encoder", action="store_true")
    p.add_argument("--no-head", action="store_true")
    p.add_argument("--perturbations", type=int, default=10_000, help="embedding T")
    p.add_argument("--latent", type=int, default=100, help="embedding L")
    p.add_argument("--particles", type=int, default=5, help="embedding P")
    p.add_argument("--cells", type=int, default=512, help="embedding batch size")
    p.add_argument("--sweep", action="store_true",
                   help="also time a few NB tilings (rows, block_g, num_warps) on the largest case")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.warmup_ms, args.rep_ms = 10.0, 40.0
    try:
        args.cases = [parse_case(c) for c in args.cases] if args.cases else [
            (1, b, g) for b in args.batch for g in args.genes]
    except ValueError as exc:
        p.error(str(exc))
    for name in ("batch", "genes"):
        if any(v < 1 for v in getattr(args, name)):
            p.error(f"--{name} values must be >= 1")
    if any(not 0.0 <= z < 1.0 for z in args.zero_fractions):
        p.error("--zero-fractions must lie in [0, 1)")
    return args


def parse_case(text: str):
    """'5x512x8000' -> (5, 512, 8000): particles, cells, genes (each >= 1)."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise ValueError(f"--cases wants PxBxG with positive integers, e.g. 5x512x8000; got {text!r}")
    return tuple(int(p) for p in parts)


# ----------------------------------------------------------------------------- inputs

def make_counts(cells: int, genes: int, zero_fraction: float, *, generator, device="cpu"):
    """(cells, genes) float32 counts with about ``zero_fraction`` zeros: non-zeros are
    1 + Poisson(2), and 1% of them 64..1000 (past the kernel's table, like highly expressed
    genes)."""
    nonzero = torch.rand(cells, genes, generator=generator, device=device) >= zero_fraction
    values = 1.0 + torch.poisson(torch.full((cells, genes), 2.0, device=device),
                                 generator=generator)
    big = torch.rand(cells, genes, generator=generator, device=device) < 0.01
    values = torch.where(big, torch.randint(64, 1001, (cells, genes), generator=generator,
                                            device=device).float(), values)
    return torch.where(nonzero, values, torch.zeros_like(values))


def nb_inputs(cells, genes, zero_fraction, device, seed, particles=1):
    """counts (B, G) dense, logits (B, G) or (P, B, G) when particles > 1 (the counts shared by
    every particle), log_library (B,), log_theta (G,)."""
    g = torch.Generator(device=device).manual_seed(seed)
    counts = make_counts(cells, genes, zero_fraction, generator=g, device=device)
    shape = (cells, genes) if particles == 1 else (particles, cells, genes)
    logits = torch.randn(*shape, generator=g, device=device)
    log_library = torch.log(counts.sum(1) + 1.0)
    log_theta = torch.empty(genes, device=device).uniform_(-2.0, 6.0, generator=g)
    return counts, logits, log_library, log_theta


def nb_bytes(particles, cells, genes, nnz, csr: bool) -> dict:
    """Least bytes a forward-then-backward NB implementation moves (float32, int32 indices
    as the kernels take them): forward reads logits and counts and writes (P, B) values;
    backward reads them again and writes d logits."""
    logits = 4 * particles * cells * genes
    counts = (8 * nnz + 4 * (cells + 1)) if csr else 4 * cells * genes
    small = 4 * (particles * cells + 2 * genes + cells)
    return {"fwd": logits + counts + small, "fwd_bwd": 3 * logits + 2 * counts + 2 * small}


# ----------------------------------------------------------------------------- timing

def do_bench_ms(fn, args) -> float:
    """Median milliseconds of ``fn()`` by ``triton.testing.do_bench`` (CUDA events, L2 flushed
    before each call)."""
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median"))


def wall_ms(fn, args) -> float:
    """The wall time of one call, no warm-up (the CPU / interpreter dry run checks the code,
    not the figures)."""
    t0 = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - t0)


def TIMER(fn, args) -> float:  # noqa: N802 - tests of this script substitute their own
    return do_bench_ms(fn, args) if DEVICE == "cuda" else wall_ms(fn, args)


def copy_bandwidth(args) -> dict:
    """Bytes per second of a device-to-device copy (read + write) of ``--copy-mib`` MiB."""
    n = max(1, int(args.copy_mib * 2**20) // 4)
    src = torch.randn(n, device=DEVICE)
    dst = torch.empty_like(src)
    ms = TIMER(lambda: dst.copy_(src), args)
    return {"bytes": 8 * n, "ms": ms, "gb_per_s": 8 * n / ms / 1e6}


def _measure(fn, args, record: dict, key: str):
    try:
        record[key] = TIMER(fn, args)
    except Exception as exc:  # noqa: BLE001 - one failing baseline must not stop the run
        record[key] = None
        record.setdefault("errors", {})[key] = f"{type(exc).__name__}: {exc}"
        print(f"  {key} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)


def _fwd_bwd(fn, leaves):
    def run():
        for t in leaves:
            t.grad = None
        fn().sum().backward()
    return run


def _fwd(fn):
    def run():
        with torch.no_grad():
            fn()
    return run


# ----------------------------------------------------------------------------- NB benchmark

def bench_nb_case(cells, genes, zero_fraction, args, compiled, particles=1) -> dict:
    """One NB case: ``compiled`` is None (no torch.compile baselines) or
    ``{"dense": compiled nb_eager, "sparse": compiled nb_sparse_coo}``."""
    from samsvae.ops.nb.triton import nb_log_prob_triton

    counts, logits, ll, lt = nb_inputs(cells, genes, zero_fraction, DEVICE, args.seed,
                                       particles)
    csr = counts.to_sparse_csr()
    coo = R.csr_to_coo(csr)
    logits.requires_grad_()
    lt.requires_grad_()
    calls = {
        "triton_dense": lambda: nb_log_prob_triton(counts, logits, ll, lt),
        "triton_csr": lambda: nb_log_prob_triton(csr, logits, ll, lt),
        "eager": lambda: R.nb_eager(counts, logits, ll, lt),
    }
    if compiled is not None:
        calls["compile"] = lambda: compiled["dense"](counts, logits, ll, lt)
        calls["compile_sparse"] = lambda: compiled["sparse"](coo, logits, ll, lt)
    nnz = int(coo[2].numel())
    record = {"particles": particles, "cells": cells, "genes": genes,
              "zero_fraction": zero_fraction, "nnz": nnz, "fwd": {}, "fwd_bwd": {},
              "bytes": {"dense": nb_bytes(particles, cells, genes, nnz, False),
                        "csr": nb_bytes(particles, cells, genes, nnz, True)}}
    for name, call in calls.items():
        _measure(_fwd(call), args, record["fwd"], name)
        _measure(_fwd_bwd(call, (logits, lt)), args, record["fwd_bwd"], name)
    record["max_rel_err_vs_float64"] = _check_nb(counts, csr, logits.detach(), ll, lt.detach())
    return record


def bandwidth(record: dict, mode: str, copy_gbps=None):
    """(GB/s, fraction of the copy) of the faster Triton layout in ``mode``, or (None, None)."""
    best = None
    for layout in ("dense", "csr"):
        ms = record[mode].get(f"triton_{layout}")
        if ms:
            gbps = record["bytes"][layout][mode] / ms / 1e6
            best = gbps if best is None else max(best, gbps)
    if best is None:
        return None, None
    return best, (best / copy_gbps if copy_gbps else None)


def _check_nb(counts, csr, logits, ll, lt) -> dict:
    """Relative error of the Triton outputs and gradients against the float64 reference on the
    first 64 cells (a first-run sanity check on a new GPU)."""
    from samsvae.ops.nb.triton import nb_log_prob_triton

    n = min(64, counts.shape[0])
    sub_counts = counts[:n]
    logits = logits[..., :n, :]
    out = {}
    try:
        results = {}
        for name, fn, cnt, dtype in (
                ("triton_dense", nb_log_prob_triton, sub_counts, torch.float32),
                ("triton_csr", nb_log_prob_triton, sub_counts.to_sparse_csr(), torch.float32),
                ("float64", nb_log_prob_reference, sub_counts.double(), torch.float64)):
            lg = logits.to(dtype).clone().requires_grad_()
            t = lt.to(dtype).clone().requires_grad_()
            value = fn(cnt, lg, ll[:n].to(dtype), t)
            value.sum().backward()
            results[name] = (value.detach().double(), lg.grad.double(), t.grad.double())
        for name in ("triton_dense", "triton_csr"):
            out[name] = [((a - b).norm() / b.norm()).item()
                         for a, b in zip(results[name], results["float64"])]
    except Exception as exc:  # noqa: BLE001
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


def bench_nb_sweep(cells, genes, zero_fraction, args) -> list:
    """Times of a few tilings on one case, to tune ``choose_config`` on a new GPU."""
    from samsvae.ops.nb import triton as K

    counts, logits, ll, lt = nb_inputs(cells, genes, zero_fraction, DEVICE, args.seed)
    csr = counts.to_sparse_csr()
    logits.requires_grad_()
    lt.requires_grad_()
    results = []
    for rows, block_g, warps in ((8, 256, 16), (4, 512, 16), (1, 2048, 16), (8, 128, 8),
                                 (4, 256, 8), (1, 1024, 8), (2, 256, 4), (8, 512, 16)):
        cfg = K.NBConfig(rows=rows, block_g=block_g, block_nnz=256, num_warps=warps)
        record = {"rows": rows, "block_g": block_g, "num_warps": warps}
        with K.override_config(cfg):
            for layout, cnt in (("dense", counts), ("csr", csr)):
                _measure(_fwd_bwd(lambda c=cnt: K.nb_log_prob_triton(c, logits, ll, lt),
                                  (logits, lt)), args, record, f"fwd_bwd_{layout}")
        results.append(record)
        print(f"  sweep {record}", file=sys.stderr, flush=True)
    return results


# ----------------------------------------------------------------------------- embedding

def bench_embedding(args) -> dict:
    from samsvae.ops.embedding.triton import masked_embedding_sum_triton

    T, L, P, C = args.perturbations, args.latent, args.particles, args.cells
    g = torch.Generator(device=DEVICE).manual_seed(args.seed)
    # 10% control cells, the rest one or two perturbations
    n_pert = torch.randint(1, 3, (C,), generator=g, device=DEVICE)
    n_pert[torch.rand(C, generator=g, device=DEVICE) < 0.1] = 0
    dense = torch.zeros(C, T, device=DEVICE)
    for k in range(2):
        cols = torch.randint(0, T, (C,), generator=g, device=DEVICE)
        dense[torch.arange(C, device=DEVICE)[n_pert > k], cols[n_pert > k]] = 1.0
    dosage = dense.to_sparse_csr()
    loc = torch.randn(T, L, device=DEVICE, generator=g).requires_grad_()
    log_scale = (0.1 * torch.randn(T, L, device=DEVICE, generator=g) - 1).requires_grad_()
    logits = torch.randn(T, L, device=DEVICE, generator=g).requires_grad_()
    leaves = (loc, log_scale, logits)

    def dense_matmul():  # samples all T perturbations and multiplies the dense dosage
        eps = torch.randn(P, T, L, device=DEVICE)
        u = torch.rand(P, T, L, device=DEVICE).clamp(1e-6, 1 - 1e-6)
        emb = loc + log_scale.exp() * eps
        return dense @ (emb * relaxed_bernoulli_st(logits, u, 1.0))

    calls = {
        "triton": lambda: masked_embedding_sum_triton(dosage, loc, log_scale, logits,
                                                      particles=P).z_p,
        "reference": lambda: masked_embedding_sum_reference(dosage, loc, log_scale, logits,
                                                            particles=P).z_p,
        "dense_matmul": dense_matmul,
    }
    record = {"perturbations": T, "latent": L, "particles": P, "cells": C, "fwd": {},
              "fwd_bwd": {}}
    for name, call in calls.items():
        _measure(_fwd(call), args, record["fwd"], name)
        _measure(_fwd_bwd(call, leaves), args, record["fwd_bwd"], name)
    return record


# ----------------------------------------------------------------------------- encoder, head

def bench_encoder(cells, genes, zero_fraction, args) -> dict:
    """``log1p_standardize_linear``: Triton features + cuBLAS vs the reference (dense features
    then ``F.linear``), CSR counts, forward and forward + backward (to weight and bias)."""
    from samsvae.ops.encoder import log1p_standardize_linear_reference
    from samsvae.ops.encoder.triton import log1p_standardize_linear_triton

    g = torch.Generator(device=DEVICE).manual_seed(args.seed)
    counts = make_counts(cells, genes, zero_fraction, generator=g, device=DEVICE)
    csr = counts.to_sparse_csr()
    lg = torch.log1p(counts)
    mean, inv = lg.mean(0), 1.0 / (lg.std(0) + 1e-3)
    w = (0.01 * torch.randn(args.hidden, genes, generator=g, device=DEVICE)).requires_grad_()
    b = torch.zeros(args.hidden, device=DEVICE, requires_grad=True)
    calls = {"triton": lambda: log1p_standardize_linear_triton(csr, w, b, mean, inv),
             "reference": lambda: log1p_standardize_linear_reference(csr, w, b, mean, inv)}
    record = {"cells": cells, "genes": genes, "hidden": args.hidden,
              "zero_fraction": zero_fraction, "fwd": {}, "fwd_bwd": {}}
    for name, call in calls.items():
        _measure(_fwd(call), args, record["fwd"], name)
        _measure(_fwd_bwd(call, (w, b)), args, record["fwd_bwd"], name)
    with torch.no_grad():
        a, ref = calls["triton"](), calls["reference"]()
        record["max_rel_err_vs_reference"] = float((a - ref).norm() / ref.norm().clamp_min(1e-30))
    return record


def bench_head(particles, cells, genes, zero_fraction, args) -> dict:
    """The training head ``nb_log_prob_linear(recompute=False)``: ``F.linear`` with the bias in
    the GEMM epilogue and the Triton NB on CSR counts, vs the reference NB on the same logits,
    vs eager (references.nb_eager on dense counts); forward + backward to hidden, weight, bias
    and log_theta."""
    import torch.nn.functional as F

    from samsvae.ops.nb.triton import nb_log_prob_triton

    counts, _, ll, lt = nb_inputs(cells, genes, zero_fraction, DEVICE, args.seed, 1)
    csr = counts.to_sparse_csr()
    g = torch.Generator(device=DEVICE).manual_seed(args.seed + 1)
    hidden = torch.randn(particles, cells, args.hidden, generator=g, device=DEVICE)
    w = (0.05 * torch.randn(genes, args.hidden, generator=g, device=DEVICE))
    b = torch.zeros(genes, device=DEVICE)
    leaves = tuple(t.requires_grad_() for t in (hidden, w, b, lt))
    calls = {
        "triton": lambda: nb_log_prob_triton(csr, F.linear(hidden, w, b), ll, lt),
        "reference": lambda: nb_log_prob_reference(csr, F.linear(hidden, w, b), ll, lt),
        "eager": lambda: R.nb_eager(counts, F.linear(hidden, w, b), ll, lt),
    }
    record = {"particles": particles, "cells": cells, "genes": genes, "hidden": args.hidden,
              "zero_fraction": zero_fraction, "fwd": {}, "fwd_bwd": {}}
    for name, call in calls.items():
        _measure(_fwd(call), args, record["fwd"], name)
        _measure(_fwd_bwd(call, leaves), args, record["fwd_bwd"], name)
    return record


# ----------------------------------------------------------------------------- reporting

def speedup(baseline, triton):
    """baseline / triton, or None when either is missing."""
    if baseline is None or triton is None or triton <= 0:
        return None
    return baseline / triton


def _fmt(v, digits=3):
    if v is None:
        return "err"
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def _time_cell(times: dict, method: str) -> str:
    """A time in ms, "err" when the measurement failed, "-" when it was not run."""
    return _fmt(times[method]) if method in times else "-"


def _speedup_cell(times: dict, method: str, triton) -> str:
    if method not in times:
        return "-"
    return _fmt(speedup(times[method], triton), 2)


def format_nb_table(records, copy_gbps=None) -> str:
    """Markdown table: times (ms), speed-ups of the faster Triton layout over each baseline,
    its effective bandwidth (GB/s, see :func:`nb_bytes`) and that as a fraction of the copy."""
    head = ("| P | B | G | zeros | pass | triton dense | triton csr | eager | compile | "
            "compile sparse | x eager | x compile | x compile sparse | GB/s | of copy |")
    lines = [head, "|" + "---|" * 15]
    for r in records:
        for mode in ("fwd", "fwd_bwd"):
            t = r[mode]
            tri = [v for v in (t.get("triton_dense"), t.get("triton_csr")) if v is not None]
            best = min(tri) if tri else None
            cells = [str(r.get("particles", 1)), str(r["cells"]), str(r["genes"]),
                     f"{r['zero_fraction']:g}", mode.replace("_", "+")]
            cells += [_time_cell(t, m) for m in NB_METHODS]
            cells += [_speedup_cell(t, m, best) for m in ("eager", "compile", "compile_sparse")]
            gbps, frac = bandwidth(r, mode, copy_gbps) if "bytes" in r else (None, None)
            cells += ["-" if gbps is None else f"{gbps:.0f}",
                      "-" if frac is None else f"{100 * frac:.0f}%"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_pair_table(records, methods, label) -> str:
    """Markdown table of the encoder / head records: times and x = method / triton."""
    lines = [f"| {label} | pass | " + " | ".join(methods) + " | "
             + " | ".join(f"x {m}" for m in methods[1:]) + " |",
             "|" + "---|" * (2 + 2 * len(methods) - 1)]
    for r in records:
        shape = "x".join(str(r[k]) for k in ("particles", "cells", "genes", "hidden") if k in r)
        for mode in ("fwd", "fwd_bwd"):
            t = r[mode]
            lines.append("| " + " | ".join(
                [shape, mode.replace("_", "+")] + [_time_cell(t, m) for m in methods]
                + [_speedup_cell(t, m, t.get("triton")) for m in methods[1:]]) + " |")
    return "\n".join(lines)


def format_embedding_table(record) -> str:
    lines = ["| pass | triton | reference | dense matmul | x reference | x dense |",
             "|" + "---|" * 6]
    for mode in ("fwd", "fwd_bwd"):
        t = record[mode]
        lines.append("| " + " | ".join(
            [mode.replace("_", "+")] + [_time_cell(t, m) for m in EMB_METHODS]
            + [_speedup_cell(t, m, t.get("triton")) for m in ("reference", "dense_matmul")])
            + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def _compiled_baselines():
    """torch.compile of the eager and the sparsity-aware forms, shared through
    ``references.compiled`` (each shape compiles once)."""
    import torch._dynamo
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return {"dense": R.compiled(R.nb_eager), "sparse": R.compiled(R.nb_sparse_coo)}


def csv_rows(results: dict) -> list:
    """The results.csv rows: ``<mode>_ms`` per method and case (op ``nb_log_prob``, shape
    ``B,G,zeros``; op ``masked_embedding_sum``, shape ``T,L,P,C``); failed or skipped
    measurements (None) are left out."""
    out = []

    def add(op, shape, record):
        for mode in ("fwd", "fwd_bwd"):
            for method, ms in record.get(mode, {}).items():
                if isinstance(ms, (int, float)):
                    out.append(H.result(op, method, shape, f"{mode.replace('_', '')}_ms", ms))
    for r in results["nb_log_prob"]:
        add("nb_log_prob", H.shape_str(P=r.get("particles", 1), B=r["cells"], G=r["genes"],
                                       zeros=r["zero_fraction"]), r)
    for key, op in (("encoder", "log1p_standardize_linear"), ("head", "nb_log_prob_linear")):
        for r in results.get(key) or ():
            add(op, H.shape_str(**{k[0].upper(): r[k] for k in ("particles", "cells", "genes",
                                                                 "hidden") if k in r},
                                zeros=r["zero_fraction"]), r)
    emb = results.get("masked_embedding_sum")
    if emb is not None:
        add("masked_embedding_sum", H.shape_str(T=emb["perturbations"], L=emb["latent"],
                                                P=emb["particles"], C=emb["cells"]), emb)
    return out


def main(argv=None) -> int:
    global DEVICE
    args = parse_args(argv)
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("bench_triton_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); "
              "run it on a GPU machine with a CUDA build of torch and triton installed "
              "(--device cpu runs the measuring code under TRITON_INTERPRET=1).",
              file=sys.stderr)
        return 2
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        print("--device cpu needs TRITON_INTERPRET=1 (the Triton interpreter)", file=sys.stderr)
        return 2
    try:
        import triton
    except ImportError:
        print("triton is not installed: pip install triton", file=sys.stderr)
        return 2
    if DEVICE == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (Triton interpreter)"
    meta = {"device": name, "torch": torch.__version__,
            "triton": triton.__version__, "python": platform.python_version(),
            "args": vars(args), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    results = {"meta": meta, "copy": None, "nb_log_prob": [], "encoder": [], "head": [],
               "masked_embedding_sum": None, "sweep": None}
    out_path = Path(args.out)

    def save():
        out_path.write_text(json.dumps(results, indent=2))

    def step(label, fn):
        print(label, file=sys.stderr, flush=True)
        try:
            return fn()
        except Exception:  # noqa: BLE001 - keep the other cases
            traceback.print_exc()
            return None
        finally:
            save()

    results["copy"] = step("device-to-device copy", lambda: copy_bandwidth(args))
    copy_gbps = (results["copy"] or {}).get("gb_per_s")
    compiled = None
    if not args.no_compile:
        try:
            compiled = _compiled_baselines()
        except Exception as exc:  # noqa: BLE001
            print(f"torch.compile unavailable: {exc}", file=sys.stderr)
    for particles, cells, genes in args.cases:
        use = compiled if particles * cells * genes <= args.compile_max_elements else None
        for zf in args.zero_fractions:
            r = step(f"nb_log_prob P={particles} B={cells} G={genes} zeros={zf}",
                     lambda: bench_nb_case(cells, genes, zf, args, use, particles))
            if r is not None:
                results["nb_log_prob"].append(r)
    zf = args.zero_fractions[len(args.zero_fractions) // 2]
    shapes = sorted({(c, g) for p, c, g in args.cases if p * c * g <= args.compile_max_elements})
    if not args.no_encoder:
        for cells, genes in shapes:
            r = step(f"encoder B={cells} G={genes}", lambda: bench_encoder(cells, genes, zf, args))
            if r is not None:
                results["encoder"].append(r)
    if not args.no_head:
        for particles, cells, genes in args.cases:
            if particles > 1 and particles * cells * genes <= args.compile_max_elements:
                r = step(f"head P={particles} B={cells} G={genes}",
                         lambda: bench_head(particles, cells, genes, zf, args))
                if r is not None:
                    results["head"].append(r)
    if args.sweep:
        p, c, g = max(args.cases, key=lambda t: t[0] * t[1] * t[2])
        results["sweep"] = step("sweep", lambda: bench_nb_sweep(p * c, g, zf, args))
    if not args.no_embedding:
        results["masked_embedding_sum"] = step("masked_embedding_sum",
                                               lambda: bench_embedding(args))

    print(f"# Triton kernels on {meta['device']} (torch {meta['torch']}, triton "
          f"{meta['triton']}); times in ms (do_bench medians), xN = baseline time / triton time\n")
    if results["copy"]:
        c = results["copy"]
        print(f"device-to-device copy: {c['bytes'] / 2**20:.0f} MiB read + written in "
              f"{c['ms']:.3g} ms = {c['gb_per_s']:.0f} GB/s\n")
    print("## nb_log_prob\n")
    print(format_nb_table(results["nb_log_prob"], copy_gbps))
    print("\nrelative error vs float64 (loglik, d logits, d log_theta):")
    for r in results["nb_log_prob"]:
        print(f"  P={r['particles']} B={r['cells']} G={r['genes']} "
              f"zeros={r['zero_fraction']:g}: {r['max_rel_err_vs_float64']}")
    if results["encoder"]:
        print("\n## log1p_standardize_linear (encoder op, CSR counts)\n")
        print(format_pair_table(results["encoder"], ("triton", "reference"), "BxGxH"))
    if results["head"]:
        print("\n## decoder head (F.linear + NB, CSR counts)\n")
        print(format_pair_table(results["head"], ("triton", "reference", "eager"), "PxBxGxH"))
    if results["masked_embedding_sum"] is not None:
        r = results["masked_embedding_sum"]
        print(f"\n## masked_embedding_sum (T={r['perturbations']}, L={r['latent']}, "
              f"P={r['particles']}, cells={r['cells']})\n")
        print(format_embedding_table(r))
    print(f"\nJSON: {out_path.resolve()}")
    path = H.csv_path(args)
    if path and DEVICE == "cuda":
        n = H.append_results(csv_rows(results), path, machine=meta["device"])
        print(f"appended {n} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
