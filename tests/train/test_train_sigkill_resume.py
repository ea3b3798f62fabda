"""A `samsvae train` killed with SIGKILL and rerun with --resume ends exactly where an
uninterrupted run ends: same loss curve, weights, validation and evaluation metrics."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from samsvae.cli import main
from samsvae.data import simulate_screen

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")

REPO = Path(__file__).resolve().parents[2]
TRAIN_ARGS = ["--max-steps", "100", "--latent", "4", "--hidden", "32", "--batch-size", "64",
              "--lr", "3e-3", "--checkpoint-every", "3", "--val-every", "10", "--seed", "7",
              "--guide", "corr_both", "--no-progress"]


def _command(data, out, *extra):
    return [sys.executable, "-m", "samsvae", "train", str(data), "--out", str(out),
            *TRAIN_ARGS, *extra]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _run(cmd):
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    data = tmp_path / "tiny.h5ad"
    simulate_screen(n_cells=400, n_genes=40, n_perturbations=6, n_combinations=2, n_latent=4,
                    seed=1).write_h5ad(data)
    full, killed = tmp_path / "full", tmp_path / "killed"
    _run(_command(data, full))

    proc = subprocess.Popen(_command(data, killed), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    last = killed / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    try:
        while not last.exists():
            assert proc.poll() is None, "training ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint appeared in time"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "model.pt").exists(), "the run finished before it was killed"

    out = _run(_command(data, killed, "--resume"))
    assert "resumed from" in out  # e.g. "at step 3 (epoch 0, batch 3 of 5)": mid-epoch

    hist_full = json.loads((full / "history.json").read_text())
    hist_res = json.loads((killed / "history.json").read_text())
    assert hist_res == hist_full
    assert len(hist_full["train"]["loss"]) == 100 and len(hist_full["val"]["elbo"]) == 10

    for name in ("model.pt", "checkpoints/last.pt"):
        a = torch.load(full / name, weights_only=True)
        b = torch.load(killed / name, weights_only=True)
        sa, sb = a.get("state_dict", a.get("model_state")), b.get("state_dict", b.get("model_state"))
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)
    assert not list((killed / "checkpoints").glob("*.tmp"))

    metrics = []
    for run in (full, killed):
        assert main(["evaluate", str(run), "--iwelbo-particles", "8", "--ate-particles", "50"]) == 0
        metrics.append(json.loads((run / "metrics.json").read_text()))
    for key in ("test_iwelbo", "ate_pearson", "ate_pearson_top20", "mask_f1"):
        assert metrics[0][key] == pytest.approx(metrics[1][key], rel=1e-6, abs=1e-9)
