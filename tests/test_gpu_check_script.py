"""``bash benchmarks/gpu_check.sh --dry-run`` runs its CPU-side parts at tiny sizes (issue 13)."""
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout.strip().splitlines()
    for step in ("nb_table", "bench_step", "simulate", "train", "evaluate", "load_on_cpu"):
        assert any(line.startswith(step + " ") and " ok " in line for line in table), step
    assert table[-1].startswith("load_on_cpu")  # the step table comes last
    assert (tmp_path / "nb_table.json").exists() and (tmp_path / "metrics_cpu_loaded.json").exists()
    assert "| P | B | G |" in proc.stdout  # the NB table (interpreter, tiny sizes)
