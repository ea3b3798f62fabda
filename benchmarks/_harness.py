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
"""
from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

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


def add_round_robin_args(parser, *, repeats: int = 10, warmup: int = 2, block: int = 5) -> None:
    """``--repeats --warmup --block --threads --out`` of the round-robin CPU benchmarks."""
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--block", type=int, default=block)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="write JSON here")


def require_cpp_extension() -> None:
    """Exit with the build command when the C++ extension is not built."""
    from samsvae.ops import _cpp
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


def publish(rows: List[Dict], meta: Dict, text: str, out: Optional[str]) -> Dict:
    """Print the markdown tables and write ``{"meta", "rows", "markdown"}`` JSON to ``out``."""
    print(text)
    payload = {"meta": meta, "rows": rows, "markdown": text}
    if out:
        write_json(out, payload)
    return payload
