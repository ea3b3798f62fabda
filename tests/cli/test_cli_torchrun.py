"""`torchrun --nproc-per-node 2 -m samsvae train --backed` on CPU (gloo): same loss as one
process with the same global batch; a rank that dies stops the job with a clear message, and
`--resume` continues exactly where an uninterrupted run would be."""
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from samsvae.cli import main
from samsvae.data import simulate_screen

REPO = Path(__file__).resolve().parents[2]
STEPS = 100
ARGS = ["--backed", "--latent", "4", "--hidden", "32", "--batch-size", "64", "--lr", "1e-2",
        "--no-progress", "--checkpoint-every", "20", "--val-every", "50", "--chunk-rows", "32",
        "--buffer-chunks", "4", "--backend", "reference"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddp_cli") / "sim.h5ad"
    simulate_screen(1200, 40, 6, n_combinations=2, n_latent=4, seed=5).write_h5ad(path)
    return path


def _torchrun(argv, tmp, timeout=150):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SAMSVAE_DIST_TIMEOUT": "60",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "samsvae", *argv]
    return subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def two_process_run(data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run2")
    out = tmp / "run"
    proc = _torchrun(["train", str(data), "--out", str(out), "--max-steps", str(STEPS), *ARGS],
                     tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_distributed_evaluate_equals_single_process(two_process_run, tmp_path):
    out, _ = two_process_run
    argv = ["evaluate", str(out), "--iwelbo-particles", "5", "--ate-particles", "30",
            "--batch-size", "32"]
    proc = _torchrun(argv, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1  # rank 0 alone reports and writes
    two = json.loads((out / "metrics.json").read_text())
    assert main(argv) == 0
    one = json.loads((out / "metrics.json").read_text())
    assert one["n_cells"] == two["n_cells"] > 0
    for key in ("test_iwelbo", "ate_pearson", "ate_pearson_top20", "mask_f1"):
        assert two[key] == pytest.approx(one[key], rel=1e-6), key


def _final_loss(out, last=16):
    loss = json.loads((out / "history.json").read_text())["train"]["loss"]
    assert len(loss) == STEPS
    return float(np.mean(loss[:last])), float(np.mean(loss[-last:]))


def test_two_processes_reach_the_loss_of_one_process(two_process_run, data, tmp_path):
    out2, proc = two_process_run
    # rank 0 alone writes and logs: one copy of each line
    assert proc.stdout.count("data statistics: one pass") == 1
    assert "2 processes" in proc.stdout
    for name in ("config.json", "split.csv", "model.pt", "history.json", "data_stats.npz",
                 "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (out2 / name).is_file(), name
    out1 = tmp_path / "run1"
    assert main(["train", str(data), "--out", str(out1), "--max-steps", str(STEPS), *ARGS]) == 0
    first1, last1 = _final_loss(out1)
    first2, last2 = _final_loss(out2)
    assert last1 < first1 - 0.1 * abs(first1)  # both actually learned ...
    assert last2 < first2 - 0.1 * abs(first2)
    # ... to the same loss (other noise and order; across seeds it varies by ~0.2%)
    assert abs(last2 - last1) < 0.01 * abs(last1)
    v1 = json.loads((out1 / "history.json").read_text())["val"]["elbo"][-1]
    v2 = json.loads((out2 / "history.json").read_text())["val"]["elbo"][-1]
    assert abs(v2 - v1) < 0.01 * abs(v1)


def _worker(rank, tmp, tag, argv, die_at_step):
    """One rank of a 2-process `samsvae train`, joined through a file rendezvous."""
    import datetime

    import torch.distributed as dist
    torch.set_num_threads(1)
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))
    sys.stderr = open(f"{tmp}/{tag}.rank{rank}.err", "w", buffering=1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/{tag}.rdzv", rank=rank,
                            world_size=2, timeout=datetime.timedelta(seconds=60))
    if rank == 1 and die_at_step is not None:
        from samsvae.train.distributed import DistributedTrainer
        step = DistributedTrainer._train_step

        def dying_step(self, batch):
            if self.step == die_at_step:
                Path(f"{tmp}/{tag}.died").write_text(repr(time.time()))
                os._exit(17)  # as an OOM kill would: no cleanup, no message
            return step(self, batch)
        DistributedTrainer._train_step = dying_step
    rc = main(argv)
    Path(f"{tmp}/{tag}.rank{rank}.rc").write_text(f"{rc} {time.time()!r}")
    sys.stderr.flush()
    os._exit(0)


def _spawn(tmp, tag, argv, die_at_step=None, timeout=150):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, str(tmp), tag, argv, die_at_step))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.kill()
            pytest.fail(f"rank hung past {timeout} s")
    return [p.exitcode for p in procs]


def test_dead_rank_fails_clearly_and_resume_matches_uninterrupted(two_process_run, data,
                                                                  tmp_path):
    out_ref, _ = two_process_run
    out = tmp_path / "run"
    argv = ["train", str(data), "--out", str(out), "--max-steps", str(STEPS), *ARGS]
    codes = _spawn(tmp_path, "crash", argv, die_at_step=50)
    assert codes[1] == 17
    rc, ended = (tmp_path / "crash.rank0.rc").read_text().split()
    err = (tmp_path / "crash.rank0.err").read_text()
    assert rc == "1", err
    assert "lost contact with the other processes" in err and "--resume" in err
    # noticed at once (closed connection), not after the 60 s collective timeout
    assert float(ended) - float((tmp_path / "crash.died").read_text()) < 40
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    # last.pt is also written at each validation (--val-every 50): no older than step 50
    assert ckpt["step"] == 50 and len(ckpt["rank_noise"]) == 2

    codes = _spawn(tmp_path, "resume", argv + ["--resume"])
    assert codes == [0, 0], (tmp_path / "resume.rank0.err").read_text()
    # same weights as the run that was never interrupted (torchrun, same options)
    got = torch.load(out / "model.pt", weights_only=False)["state_dict"]
    ref = torch.load(out_ref / "model.pt", weights_only=False)["state_dict"]
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=0, msg=name)
    hist = json.loads((out / "history.json").read_text())["train"]
    assert hist["step"] == list(range(1, STEPS + 1))
