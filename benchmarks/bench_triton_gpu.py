"""GPU benchmark of the Triton kernels against PyTorch baselines (needs CUDA).

    python benchmarks/bench_triton_gpu.py --out bench_triton.json
    python benchmarks/bench_triton_gpu.py --batch 2560 --genes 8000 --zero-fractions 0.9 --quick

nb_log_prob, forward and forward+backward (d logits and d log_theta), for every
(cells B, genes G, zero fraction) of the grid:

    triton_dense / triton_csr   the Triton kernel with dense or CSR counts
    eager                       nb_log_prob_reference (dense counts), plain PyTorch
    compile                     torch.compile of that same reference
    compile_sparse              torch.compile of a sparsity-aware form: the x = 0 term over all
                                genes, lgamma terms only on the non-zeros (given as index lists)

masked_embedding_sum (T perturbations, latent L, P particles, a batch of cells with one or
two perturbations each): triton vs the reference vs the dense ``D @ (E * M)`` that samples
all T embeddings.

Times are medians over CUDA-event-timed iterations after warm-up, in milliseconds. A
markdown table of times and speed-ups (baseline time / triton time) goes to stdout, and
everything, including any error per measurement, to the JSON file given by --out.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as H  # noqa: E402

from samsvae.ops.embedding import (masked_embedding_sum_reference,  # noqa: E402
                                   relaxed_bernoulli_st)
from samsvae.ops.nb import lgamma_ratio, nb_log_prob_reference  # noqa: E402

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
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="warmup 1, iters 5")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    p.add_argument("--no-embedding", action="store_true")
    p.add_argument("--perturbations", type=int, default=10_000, help="embedding T")
    p.add_argument("--latent", type=int, default=100, help="embedding L")
    p.add_argument("--particles", type=int, default=5, help="embedding P")
    p.add_argument("--cells", type=int, default=512, help="embedding batch size")
    p.add_argument("--sweep", action="store_true",
                   help="also time a few NB tilings (rows, block_g, num_warps) on the largest case")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.warmup, args.iters = 1, 5
    for name in ("batch", "genes"):
        if any(v < 1 for v in getattr(args, name)):
            p.error(f"--{name} values must be >= 1")
    if any(not 0.0 <= z < 1.0 for z in args.zero_fractions):
        p.error("--zero-fractions must lie in [0, 1)")
    return args


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


def nb_inputs(cells, genes, zero_fraction, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    counts = make_counts(cells, genes, zero_fraction, generator=g, device=device)
    logits = torch.randn(cells, genes, generator=g, device=device)
    log_library = torch.log(counts.sum(1) + 1.0)
    log_theta = torch.empty(genes, device=device).uniform_(-2.0, 6.0, generator=g)
    return counts, logits, log_library, log_theta


def nb_sparse_aware(rows, cols, vals, logits, log_library, log_theta):
    """NB log-likelihood with the lgamma terms on the non-zeros only (the form a careful
    PyTorch user writes; torch.compile baseline)."""
    theta = log_theta.exp()
    log_mu = log_library.unsqueeze(-1) + torch.log_softmax(logits, dim=-1)
    s = torch.nn.functional.softplus(log_mu - log_theta)
    zero_part = -(theta * s).sum(-1)
    a, sv = log_mu[rows, cols], s[rows, cols]
    term = (lgamma_ratio(vals, theta[cols], log_theta[cols]) - torch.lgamma(vals + 1.0)
            + vals * (a - sv))
    return zero_part + torch.zeros_like(zero_part).index_add(0, rows, term)


# ----------------------------------------------------------------------------- timing

def cuda_time_ms(fn, warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` CUDA-event-timed calls after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


TIMER = cuda_time_ms  # tests of this script substitute a CPU clock


def _measure(fn, args, record: dict, key: str):
    try:
        record[key] = TIMER(fn, args.warmup, args.iters)
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

def bench_nb_case(cells, genes, zero_fraction, args, compiled) -> dict:
    from samsvae.ops.nb.triton import nb_log_prob_triton

    counts, logits, ll, lt = nb_inputs(cells, genes, zero_fraction, DEVICE, args.seed)
    csr = counts.to_sparse_csr()
    rows = torch.repeat_interleave(torch.arange(cells, device=DEVICE),
                                   csr.crow_indices().diff())
    cols, vals = csr.col_indices(), csr.values()
    logits.requires_grad_()
    lt.requires_grad_()
    calls = {
        "triton_dense": lambda: nb_log_prob_triton(counts, logits, ll, lt),
        "triton_csr": lambda: nb_log_prob_triton(csr, logits, ll, lt),
        "eager": lambda: nb_log_prob_reference(counts, logits, ll, lt),
    }
    if compiled is not None:
        calls["compile"] = lambda: compiled["dense"](counts, logits, ll, lt)
        calls["compile_sparse"] = lambda: compiled["sparse"](rows, cols, vals, logits, ll, lt)
    record = {"cells": cells, "genes": genes, "zero_fraction": zero_fraction,
              "nnz": int(vals.numel()), "fwd": {}, "fwd_bwd": {}}
    for name, call in calls.items():
        _measure(_fwd(call), args, record["fwd"], name)
        _measure(_fwd_bwd(call, (logits, lt)), args, record["fwd_bwd"], name)
    record["max_rel_err_vs_float64"] = _check_nb(counts, csr, logits.detach(), ll, lt.detach())
    return record


def _check_nb(counts, csr, logits, ll, lt) -> dict:
    """Relative error of the Triton outputs and gradients against the float64 reference on the
    first 64 cells (a first-run sanity check on a new GPU)."""
    from samsvae.ops.nb.triton import nb_log_prob_triton

    n = min(64, counts.shape[0])
    sub_counts = counts[:n]
    out = {}
    try:
        results = {}
        for name, fn, cnt, dtype in (
                ("triton_dense", nb_log_prob_triton, sub_counts, torch.float32),
                ("triton_csr", nb_log_prob_triton, sub_counts.to_sparse_csr(), torch.float32),
                ("float64", nb_log_prob_reference, sub_counts.double(), torch.float64)):
            lg = logits[:n].to(dtype).clone().requires_grad_()
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


def format_nb_table(records) -> str:
    """Markdown table: times (ms) and speed-ups of the faster Triton layout over each baseline."""
    head = ("| B | G | zeros | pass | triton dense | triton csr | eager | compile | "
            "compile sparse | x eager | x compile | x compile sparse |")
    lines = [head, "|" + "---|" * 12]
    for r in records:
        for mode in ("fwd", "fwd_bwd"):
            t = r[mode]
            tri = [v for v in (t.get("triton_dense"), t.get("triton_csr")) if v is not None]
            best = min(tri) if tri else None
            cells = [str(r["cells"]), str(r["genes"]), f"{r['zero_fraction']:g}",
                     mode.replace("_", "+")]
            cells += [_time_cell(t, m) for m in NB_METHODS]
            cells += [_speedup_cell(t, m, best) for m in ("eager", "compile", "compile_sparse")]
            lines.append("| " + " | ".join(cells) + " |")
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
    import torch._dynamo
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return {"dense": torch.compile(nb_log_prob_reference, dynamic=False),
            "sparse": torch.compile(nb_sparse_aware, dynamic=True)}


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
        add("nb_log_prob", H.shape_str(B=r["cells"], G=r["genes"], zeros=r["zero_fraction"]), r)
    emb = results.get("masked_embedding_sum")
    if emb is not None:
        add("masked_embedding_sum", H.shape_str(T=emb["perturbations"], L=emb["latent"],
                                                P=emb["particles"], C=emb["cells"]), emb)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_triton_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); "
              "run it on a GPU machine with a CUDA build of torch and triton installed.",
              file=sys.stderr)
        return 2
    try:
        import triton
    except ImportError:
        print("triton is not installed: pip install triton", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "python": platform.python_version(),
            "args": vars(args), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    results = {"meta": meta, "nb_log_prob": [], "masked_embedding_sum": None, "sweep": None}
    out_path = Path(args.out)

    def save():
        out_path.write_text(json.dumps(results, indent=2))

    compiled = None
    if not args.no_compile:
        try:
            compiled = _compiled_baselines()
        except Exception as exc:  # noqa: BLE001
            print(f"torch.compile unavailable: {exc}", file=sys.stderr)
    for cells in args.batch:
        for genes in args.genes:
            for zf in args.zero_fractions:
                print(f"nb_log_prob B={cells} G={genes} zeros={zf}", file=sys.stderr, flush=True)
                try:
                    results["nb_log_prob"].append(bench_nb_case(cells, genes, zf, args,
                                                                compiled))
                except Exception:  # noqa: BLE001 - keep the other cases
                    traceback.print_exc()
                save()
    if args.sweep:
        results["sweep"] = bench_nb_sweep(max(args.batch), max(args.genes),
                                          args.zero_fractions[len(args.zero_fractions) // 2],
                                          args)
        save()
    if not args.no_embedding:
        print("masked_embedding_sum", file=sys.stderr, flush=True)
        try:
            results["masked_embedding_sum"] = bench_embedding(args)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
        save()

    print(f"# Triton kernels on {meta['device']} (torch {meta['torch']}, triton "
          f"{meta['triton']}); times in ms, xN = baseline time / triton time\n")
    print("## nb_log_prob\n")
    print(format_nb_table(results["nb_log_prob"]))
    errs = {f"B={r['cells']} G={r['genes']} zeros={r['zero_fraction']:g}":
            r["max_rel_err_vs_float64"] for r in results["nb_log_prob"]}
    print("\nrelative error vs float64 (loglik, d logits, d log_theta):")
    for key, val in errs.items():
        print(f"  {key}: {val}")
    if results["masked_embedding_sum"] is not None:
        r = results["masked_embedding_sum"]
        print(f"\n## masked_embedding_sum (T={r['perturbations']}, L={r['latent']}, "
              f"P={r['particles']}, cells={r['cells']})\n")
        print(format_embedding_table(r))
    print(f"\nJSON: {out_path.resolve()}")
    path = H.csv_path(args)
    if path:
        n = H.append_results(csv_rows(results), path, machine=meta["device"])
        print(f"appended {n} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
