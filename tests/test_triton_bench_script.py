"""The parts of benchmarks/bench_triton_gpu.py that run without a GPU: argument checks, input
generation, the sparsity-aware baseline's value, the tables and the no-CUDA exit."""
import importlib.util
from pathlib import Path

import pytest
import torch

from samsvae.ops import nb_log_prob_reference

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_triton_gpu.py"
pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_triton_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_arguments(bench):
    args = bench.parse_args([])
    assert args.batch == [256, 2560] and args.genes == [2000, 8000]
    assert args.zero_fractions == [0.5, 0.9, 0.97]
    assert (args.perturbations, args.latent, args.particles, args.cells) == (10_000, 100, 5, 512)
    quick = bench.parse_args(["--quick", "--batch", "8", "--out", "x.json"])
    assert (quick.warmup, quick.iters, quick.batch, quick.out) == (1, 5, [8], "x.json")
    for bad in (["--zero-fractions", "1.0"], ["--batch", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def test_inputs_and_sparse_aware_baseline(bench):
    counts, logits, ll, lt = bench.nb_inputs(64, 300, 0.9, "cpu", seed=0)
    zeros = (counts == 0).double().mean().item()
    assert abs(zeros - 0.9) < 0.02 and counts.max() >= 64  # some counts past the table
    csr = counts.to_sparse_csr()
    rows = torch.repeat_interleave(torch.arange(64), csr.crow_indices().diff())
    got = bench.nb_sparse_aware(rows, csr.col_indices(), csr.values(), logits, ll, lt)
    assert torch.allclose(got, nb_log_prob_reference(counts, logits, ll, lt), rtol=1e-5)


def test_tables(bench):
    nb = {"cells": 256, "genes": 2000, "zero_fraction": 0.9,
          "fwd": {"triton_dense": 2.0, "triton_csr": 1.0, "eager": 10.0, "compile": 3.0,
                  "compile_sparse": None},
          "fwd_bwd": {"triton_dense": 4.0, "triton_csr": None, "eager": 20.0}}
    table = bench.format_nb_table([nb]).splitlines()
    assert len(table) == 4 and table[0].startswith("| B | G |")
    # speed-ups against the faster layout; "err" = failed, "-" = not run
    assert table[2].split("|")[-4:-1] == [" 10 ", " 3 ", " err "]
    assert table[3].split("|")[5:13] == [" 4 ", " err ", " 20 ", " - ", " - ", " 5 ", " - ",
                                         " - "]
    emb = {"fwd": {"triton": 0.5, "reference": 1.0, "dense_matmul": 2.0}, "fwd_bwd": {}}
    lines = bench.format_embedding_table(emb).splitlines()
    assert lines[2].split("|")[-3:-1] == [" 2 ", " 4 "]
    assert lines[3] == "| fwd+bwd | - | - | - | - | - |"
    assert bench.speedup(None, 1.0) is None and bench.speedup(3.0, 1.5) == 2.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA exit")
def test_exits_with_a_message_without_cuda(bench, capsys, tmp_path):
    assert bench.main(["--out", str(tmp_path / "r.json")]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_benchmark_logic_runs_on_cpu_through_the_interpreter(bench, monkeypatch):
    """The measuring code end to end on tiny CPU inputs: the CUDA timer is replaced by a
    call counter (no timings are checked), torch.compile baselines left out."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("the GPU run covers this")
    calls = []

    def fake_timer(fn, warmup, iters):
        fn()
        calls.append(fn)
        return 1.0

    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "TIMER", fake_timer)
    args = bench.parse_args(["--warmup", "0", "--iters", "1", "--perturbations", "40",
                             "--latent", "6", "--particles", "2", "--cells", "12"])
    record = bench.bench_nb_case(6, 40, 0.9, args, compiled=None)
    assert set(record["fwd"]) == set(record["fwd_bwd"]) == {"triton_dense", "triton_csr",
                                                            "eager"}
    assert "errors" not in record["fwd"] and "errors" not in record["fwd_bwd"]
    for name in ("triton_dense", "triton_csr"):  # the built-in float64 sanity check ran
        assert max(record["max_rel_err_vs_float64"][name]) < 1e-4
    emb = bench.bench_embedding(args)
    assert all(emb[m].get(k) == 1.0 for m in ("fwd", "fwd_bwd") for k in bench.EMB_METHODS)
    assert len(calls) == 12
    assert "| 6 | 40 | 0.9 | fwd |" in bench.format_nb_table([record])
