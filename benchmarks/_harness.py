"""Timing, peak-memory and reporting helpers shared by the benchmark scripts.

Timing: median wall time of ``repeats`` calls after ``warmup`` calls (torch.compile's first
compilation happens in the warmup and is excluded); CUDA calls are synchronised. Several
implementations are timed round-robin (:func:`time_interleaved`) so that load from other users
of a shared machine affects them alike.

Peak memory, CPU: the peak resident set size of *this process* during one call, minus the
resident size just before it (``VmHWM - VmRSS`` after resetting the high-water mark through
``/proc/self/clear_refs``). It is only faithful when freed tensors go back to the OS, so the
scripts run each configuration in a fresh worker process started with
``MALLOC_MMAP_THRESHOLD_=65536`` (glibc then maps every allocation above 64 KiB separately and
unmaps it on free, instead of pooling it); timings come from a separate worker with glibc's
default settings. Where ``clear_refs`` is not writable the value is None.
Peak memory, CUDA: ``torch.cuda.max_memory_allocated`` delta over the call.

Results: every script appends its figures to one table, ``benchmarks/results.csv``
(:func:`append_results`, columns :data:`CSV_COLUMNS`), besides printing markdown and writing
``--out JSON``. ``--csv PATH`` or ``$SAMSVAE_BENCH_CSV`` send the rows elsewhere; ``--no-csv``
(or the variable set to ``""``/``none``) writes none; under pytest nothing is written unless a
path is given, so test runs never touch the checked-in table.
"""
from __future__ import annotations

import csv
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

RESULTS_CSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.csv")
CSV_COLUMNS = ("date", "commit", "machine", "op", "implementation", "shape", "metric", "value")
CSV_ENV = "SAMSVAE_BENCH_CSV"
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def set_threads(threads: Optional[int]) -> Dict[str, object]:
    """Pin torch's intra-op threads; return what is in effect (reported with the results)."""
    if threads is not None:
        torch.set_num_threads(threads)
    return {"torch_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS")}


def worker_env(threads: Optional[int], *, for_memory: bool) -> Dict[str, str]:
    """Environment of a benchmark worker: pinned OpenMP threads, and for memory measurements
    the allocator settings above (timings use glibc's defaults, as users run)."""
    env = dict(os.environ)
    if for_memory:
        env.update(MALLOC_ENV)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def add_output_args(parser, out_default: Optional[str] = None) -> None:
    """``--out JSON``, ``--csv PATH`` and ``--no-csv`` (see :func:`csv_path`)."""
    parser.add_argument("--out", default=out_default,
                        help="write the rows and metadata as JSON here")
    parser.add_argument("--csv", default=None,
                        help=f"append the figures to this CSV (default: ${CSV_ENV}, else "
                             "benchmarks/results.csv; nothing under pytest)")
    parser.add_argument("--no-csv", action="store_true", help="append no figures to any CSV")


def add_round_robin_args(parser, *, repeats: int = 10, warmup: int = 2, block: int = 5) -> None:
    """``--repeats --warmup --block --threads`` of the round-robin CPU benchmarks, and
    :func:`add_output_args`."""
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--block", type=int, default=block)
    parser.add_argument("--threads", type=int, default=1)
    add_output_args(parser)


def add_worker_args(parser, *, repeats: int, warmup: int, compile_: bool = False) -> None:
    """``--repeats --warmup --block --in-process`` (and with ``compile_`` ``--compile-backend
    --no-compile --no-check``), :func:`add_output_args` and the hidden ``--worker`` of the
    scripts that measure in fresh worker processes (:func:`measure_both`)."""
    import argparse
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--block", type=int, default=5,
                        help="consecutive timed calls of one implementation per round (after "
                             "one untimed call); 1 = strict alternation, every call cold")
    if compile_:
        parser.add_argument("--compile-backend", default="inductor",
                            help="torch.compile backend of the compile_* baselines (aot_eager: "
                                 "no codegen)")
        parser.add_argument("--no-compile", action="store_true",
                            help="skip the torch.compile baselines")
        parser.add_argument("--no-check", action="store_true",
                            help="skip the float64 accuracy check")
    parser.add_argument("--in-process", action="store_true",
                        help="run every point in this process (no fresh workers; memory less "
                             "exact)")
    add_output_args(parser)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)


def require_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")


def merge_time_memory(time_rows: List[Dict], mem_rows: List[Dict], baseline: str) -> List[Dict]:
    """Time rows with the memory worker's ``peak_bytes`` and ``speedup_vs_<baseline>`` (the
    baseline's median over this row's, same mode; None where the baseline was not run)."""
    mem = {(r["impl"], r["mode"]): r["peak_bytes"] for r in mem_rows}
    base = {r["mode"]: r["median_s"] for r in time_rows if r["impl"] == baseline}
    return [dict(r, peak_bytes=mem.get((r["impl"], r["mode"])),
                 **{f"speedup_vs_{baseline}": base[r["mode"]] / r["median_s"]
                    if r["mode"] in base else None})
            for r in time_rows]


def csv_path(args) -> Optional[str]:
    """Where a run appends its figures: ``--no-csv`` -> nowhere; ``--csv PATH``; else
    ``$SAMSVAE_BENCH_CSV`` (``""``, ``none`` or ``0``: nowhere); else nowhere under pytest,
    :data:`RESULTS_CSV` otherwise."""
    if getattr(args, "no_csv", False):
        return None
    if getattr(args, "csv", None):
        return args.csv
    env = os.environ.get(CSV_ENV)
    if env is not None:
        return None if env.strip().lower() in ("", "none", "0") else env
    return None if "PYTEST_CURRENT_TEST" in os.environ else RESULTS_CSV


def git_commit() -> str:
    """``git rev-parse --short HEAD`` of this checkout, or ``unknown``."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10)
        return out.stdout.strip() or "unknown" if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_label() -> str:
    """``"<CPU model> (<n> vCPU)"``."""
    info = device_info("cpu")
    return f"{info.get('cpu_model', 'unknown')} ({info['cpu_count']} vCPU)"


def machine_label(device: str = "cpu", threads: Optional[int] = None) -> str:
    """``"<CPU model> (<n> vCPU) t<threads>"``, or the GPU name on CUDA."""
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{cpu_label()} t{torch.get_num_threads() if threads is None else threads}"


def shape_str(**dims) -> str:
    """``shape_str(B=256, G=8000)`` -> ``"B=256,G=8000"`` (the CSV's shape column)."""
    return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in dims.items())


def result(op: str, implementation: str, shape: str, metric: str, value, **extra) -> Dict:
    """One CSV row (date, commit and machine are filled by :func:`append_results` unless
    given in ``extra``)."""
    return {"op": op, "implementation": implementation, "shape": shape, "metric": metric,
            "value": value, **extra}


def timing_results(op: str, impl: str, shape: str, mode: str, row: Dict,
                   speedup_key: Optional[str] = None) -> List[Dict]:
    """The usual CSV rows of one timed row: ``<mode>_ms``, ``<mode>_peak_mib`` (when measured)
    and ``<mode>_<speedup_key>``; ``mode`` is ``fwd`` or ``fwd_bwd`` (written ``fwdbwd``)."""
    m = mode.replace("_", "")
    out = [result(op, impl, shape, f"{m}_ms", 1e3 * row["median_s"])]
    if row.get("peak_bytes") is not None:
        out.append(result(op, impl, shape, f"{m}_peak_mib", row["peak_bytes"] / 2**20))
    if speedup_key and row.get(speedup_key) is not None:
        out.append(result(op, impl, shape, f"{m}_{speedup_key}", row[speedup_key]))
    return out


def append_results(rows: Sequence[Dict], path: Optional[str] = RESULTS_CSV, *,
                   machine: Optional[str] = None, date: Optional[str] = None,
                   commit: Optional[str] = None) -> int:
    """Append ``rows`` (dicts with :data:`CSV_COLUMNS` keys; date, commit and machine default
    to now in UTC, :func:`git_commit` and :func:`machine_label`) to the CSV at ``path``,
    writing the header when the file is new. ``path=None`` writes nothing. Returns the count."""
    if not path or not rows:
        return 0
    defaults = {"date": date or datetime.datetime.now(datetime.timezone.utc)
                .strftime("%Y-%m-%dT%H:%MZ"),
                "commit": commit or git_commit(), "machine": machine or machine_label()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        if new:
            w.writerow(CSV_COLUMNS)
        for r in rows:
            r = {**defaults, **{k: v for k, v in r.items() if v is not None}}
            v = r["value"]
            r["value"] = f"{v:.6g}" if isinstance(v, float) else v
            w.writerow([r[c] for c in CSV_COLUMNS])
    return len(rows)


def require_cpp_extension() -> None:
    """Exit with the build command when the C++ extension is not built."""
    from samsvae.ops import cpp_extension as _cpp
    if not _cpp.ext_available():
        raise SystemExit("the C++ extension is not built: nothing to compare (build it with "
                         "SAMSVAE_BUILD_EXT=1 pip install --no-build-isolation -e .)")


def device_info(device: str) -> Dict[str, object]:
    """CPU model (from /proc/cpuinfo) or GPU name, plus versions."""
    info = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
            "cpu_count": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        info["cpu_model"] = platform.processor() or "unknown"
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], *, repeats: int, warmup: int, device: str = "cpu") -> Dict:
    """Median / min wall seconds of ``fn()`` over ``repeats`` timed calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times: List[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "repeats": repeats}


def time_interleaved(calls: Dict[str, Callable[[], object]], *, repeats: int, warmup: int,
                     device: str = "cpu", block: int = 1) -> Dict[str, Dict]:
    """:func:`time_fn` for several callables, timed round-robin so that load changes on a shared
    machine hit every implementation alike.

    ``block = 1``: one call of each per round (every call starts with caches and the allocator
    in the state the previous, different implementation left). ``block = k > 1``: each round
    runs ``k + 1`` consecutive calls of each implementation and times the last ``k`` (the
    steady state of a training loop calling the same function, which is how single-function
    benchmarks such as pytest-benchmark measure); ``repeats`` then counts timed calls and is
    rounded up to a multiple of ``k``.
    """
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: Dict[str, List[float]] = {k: [] for k in calls}
    rounds = repeats if block <= 1 else -(-repeats // block)
    for _ in range(rounds):
        for k, fn in calls.items():
            if block > 1:
                fn()  # first call of the block: untimed, absorbs the previous impl's footprint
                _sync(device)
            for _ in range(max(1, block)):
                t0 = time.perf_counter()
                fn()
                _sync(device)
                times[k].append(time.perf_counter() - t0)
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "repeats": len(v),
                "block": max(1, block)}
            for k, v in times.items()}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_memory_bytes(fn: Callable[[], object], device: str = "cpu") -> Optional[int]:
    """Extra memory at the peak of one ``fn()`` call over what was resident before it (bytes)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current RSS
        before = _status_kib("VmRSS")
    except OSError:
        return None
    fn()
    return max(0, _status_kib("VmHWM") - before) * 1024


def fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "n/a"
    return f"{n / 2**20:.1f}"


def markdown_table(rows: Sequence[Dict], columns: Sequence[tuple]) -> str:
    """``columns`` = [(header, key or callable(row) -> str)]."""
    head = "| " + " | ".join(h for h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, sep]
    for r in rows:
        cells = [(k(r) if callable(k) else str(r.get(k, ""))) for _, k in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: str, payload: Dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=1)


def run_as_worker(args, worker: Callable[[Dict], List[Dict]]) -> bool:
    """``--worker JSON``: run one configuration, print its rows as one JSON line, return True."""
    if args.worker is None:
        return False
    print(json.dumps(worker(json.loads(args.worker))))
    return True


def run_worker(script: str, config: Dict, threads: Optional[int], *, for_memory: bool) -> List[Dict]:
    """Run ``script --worker JSON`` in a fresh process; it prints one JSON list on its last line."""
    import subprocess
    proc = subprocess.run([sys.executable, script, "--worker", json.dumps(config)],
                          env=worker_env(threads, for_memory=for_memory), capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker failed for {config}:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_both(script: str, worker: Callable[[Dict], List[Dict]], cfg: Dict, args) -> tuple:
    """Run one grid point's timing and memory measurements (fresh workers unless
    ``args.in_process``); returns ``(time_rows, memory_rows)``."""
    if args.in_process:
        return worker({**cfg, "measure": "time"}), worker({**cfg, "measure": "memory"})
    return (run_worker(script, {**cfg, "measure": "time"}, args.threads, for_memory=False),
            run_worker(script, {**cfg, "measure": "memory"}, args.threads, for_memory=True))


def run_meta(name: str, argv, args, threads_info: Dict) -> Dict[str, object]:
    """The metadata block every benchmark JSON carries (command, machine, threads, methods)."""
    import os
    import sys

    from samsvae import ops
    return {"command": " ".join([os.path.basename(sys.executable)] + sys.argv)
            if argv is None else f"{name}.main({argv!r})",
            **device_info(args.device), **threads_info, "worker_threads": args.threads,
            "memory_method": ("torch.cuda.max_memory_allocated delta" if args.device == "cuda" else
                              "VmHWM - VmRSS around one call (clear_refs reset) in a fresh "
                              "worker with MALLOC_MMAP_THRESHOLD_=65536"
                              + (" (in-process: less exact)" if args.in_process else "")),
            "compile_backend": None if args.no_compile else args.compile_backend,
            "timing": f"median of {args.repeats} after {args.warmup} warmup calls; forward "
                      "under no_grad", "backends": ops.available_backends()}


def publish(rows: List[Dict], meta: Dict, text: str, args, results: Sequence[Dict] = (),
            *, device: str = "cpu", threads: Optional[int] = None) -> Dict:
    """Print the markdown tables, write ``{"meta", "rows", "markdown"}`` JSON to ``args.out``
    and append ``results`` (CSV rows) to :func:`csv_path`."""
    print(text)
    payload = {"meta": meta, "rows": rows, "markdown": text}
    if args.out:
        write_json(args.out, payload)
    path = csv_path(args)
    if path and results:
        n = append_results(results, path, machine=machine_label(device, threads))
        print(f"appended {n} rows to {path}")
    return payload
