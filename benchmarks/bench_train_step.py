"""Training step and IWELBO (``samsvae bench``) into benchmarks/results.csv.

    OMP_NUM_THREADS=1 python benchmarks/bench_train_step.py --genes 8000 --perturbations 10000 \
        --guide mean_field --steps 9 --threads 1 --iwelbo-particles 100 \
        --iwelbo-memory-particles 1000 [--keep-freed-memory] [--out run.json]

Every argument this script does not know goes to ``python -m samsvae bench`` (which times the
reference and fused steps round-robin, the matmul floor and IWELBO; see its ``--help``); its
JSON record is then turned into CSV rows: op ``train_step`` (``step_ms`` per backend and for the
``matmul_floor``, ``step_over_matmul_floor``, ``speedup_vs_reference``, ``speedup_bound``, and
the component times) and op ``iwelbo`` (``ms_per_cell``, ``added_peak_mib``, ``peak_rss_mib``
per backend and K). ``--from-json FILE...`` converts records written earlier instead.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402


def _backend_name(name: str, record: Dict) -> str:
    """``auto`` -> the NB backend it resolved to (``cpp``), else the name."""
    resolved = dict(kv.split("=", 1) for kv in record.get("resolved", "").split(",") if "=" in kv)
    return resolved.get("nb_log_prob", name) if name == "auto" else name


def csv_rows(result: Dict) -> List[Dict]:
    """The results.csv rows of one ``samsvae bench --json`` record."""
    cfg = result["config"]
    alloc = "keep" if cfg.get("keep_freed_memory") else "default"
    dims = dict(G=cfg["genes"], T=cfg["perturbations"], C=cfg["cells_per_batch"],
                P=cfg["particles"], guide=cfg["guide"], nnz=round(result["counts_density"], 3))
    shape = H.shape_str(**dims, alloc=alloc)
    out = [H.result("train_step", "matmul_floor", shape, "step_ms",
                    1e3 * result["matmul_floor_s"])]
    for name, rec in result["backends"].items():
        impl = _backend_name(name, rec)
        for part, t in rec["times"].items():
            out.append(H.result("train_step", impl, shape, f"{part}_ms", 1e3 * t["median_s"]))
        ratios = result.get("ratios", {}).get(name, {})
        for key, metric in (("step_over_matmul_floor", "step_over_matmul_floor"),
                            ("speedup_over_reference", "speedup_vs_reference"),
                            ("speedup_bound", "speedup_bound")):
            if ratios.get(key) is not None:
                out.append(H.result("train_step", impl, shape, metric, ratios[key]))
    backends = {n: _backend_name(n, r) for n, r in result["backends"].items()}
    for r in result.get("iwelbo", []):
        ishape = H.shape_str(**dims, cells=r["cells"], K=r["particles"])
        impl = backends.get(r["backend"], r["backend"])
        out.append(H.result("iwelbo", impl, ishape, "ms_per_cell", r["ms_per_cell"]))
        for key, metric in (("added_peak_bytes", "added_peak_mib"),
                            ("peak_rss_bytes", "peak_rss_mib")):
            if r.get(key) is not None:
                out.append(H.result("iwelbo", impl, ishape, metric, r[key] / 2**20))
    return out


def append_record(result: Dict, path: Optional[str], *, machine: Optional[str] = None,
                  date: Optional[str] = None, commit: Optional[str] = None) -> int:
    threads = result["config"].get("threads") or result.get("machine", {}).get("threads")
    return H.append_results(csv_rows(result), path, date=date, commit=commit,
                            machine=machine or H.machine_label("cpu", threads))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    H.add_output_args(ap)
    ap.add_argument("--from-json", nargs="+", default=None,
                    help="convert these samsvae bench JSON records instead of running it")
    ap.add_argument("--date", default=None, help="with --from-json: the runs' date")
    ap.add_argument("--machine", default=None, help="with --from-json: the runs' machine")
    args, bench_args = ap.parse_known_args(argv)
    path = H.csv_path(args)
    if args.from_json:
        n = sum(append_record(json.loads(Path(f).read_text()), path, machine=args.machine,
                              date=args.date, commit="unknown") for f in args.from_json)
        print(f"appended {n} rows to {path}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or os.path.join(tmp, "bench.json")
        rc = subprocess.run([sys.executable, "-m", "samsvae", "bench", *bench_args, "--json", out],
                            env=H.worker_env(None, for_memory=False)).returncode
        if rc != 0:
            return rc
        n = append_record(json.loads(Path(out).read_text()), path)
    if path:
        print(f"appended {n} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
