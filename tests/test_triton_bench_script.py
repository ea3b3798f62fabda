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
    assert args.cases == [(1, 256, 2000), (1, 256, 8000), (1, 2560, 2000), (1, 2560, 8000)]
    quick = bench.parse_args(["--quick", "--batch", "8", "--out", "x.json"])
    assert (quick.warmup_ms, quick.rep_ms, quick.batch, quick.out) == (10.0, 40.0, [8], "x.json")
    assert bench.parse_args(["--cases", "5x512x7993"]).cases == [(5, 512, 7993)]
    for bad in (["--zero-fractions", "1.0"], ["--batch", "0"], ["--cases", "5x512"],
                ["--cases", "0x1x2"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def test_inputs_and_baselines_from_references(bench):
    counts, logits, ll, lt = bench.nb_inputs(64, 300, 0.9, "cpu", seed=0, particles=3)
    zeros = (counts == 0).double().mean().item()
    assert abs(zeros - 0.9) < 0.02 and counts.max() >= 64  # some counts past the table
    assert logits.shape == (3, 64, 300) and counts.shape == (64, 300)  # counts shared
    want = nb_log_prob_reference(counts, logits, ll, lt)
    coo = bench.R.csr_to_coo(counts.to_sparse_csr())
    assert torch.allclose(bench.R.nb_sparse_coo(coo, logits, ll, lt), want, rtol=1e-5)
    assert torch.allclose(bench.R.nb_eager(counts, logits, ll, lt), want, rtol=1e-5)
    assert not hasattr(bench, "nb_sparse_aware")  # each baseline exists once, in references.py


def test_bytes_and_bandwidth(bench):
    b = bench.nb_bytes(5, 512, 8000, nnz=1000, csr=True)
    logits = 4 * 5 * 512 * 8000
    assert b["fwd"] > logits and b["fwd_bwd"] > 3 * logits
    r = {"fwd": {"triton_dense": 2.0, "triton_csr": 1.0}, "fwd_bwd": {},
         "bytes": {"dense": {"fwd": 4e6}, "csr": {"fwd": 3e6}}}
    gbps, frac = bench.bandwidth(r, "fwd", copy_gbps=6.0)
    assert gbps == pytest.approx(3.0) and frac == pytest.approx(0.5)  # csr: 3e6 B in 1 ms
    assert bench.bandwidth(r, "fwd_bwd", 6.0) == (None, None)


def test_tables(bench):
    nb = {"cells": 256, "genes": 2000, "zero_fraction": 0.9,
          "fwd": {"triton_dense": 2.0, "triton_csr": 1.0, "eager": 10.0, "compile": 3.0,
                  "compile_sparse": None},
          "fwd_bwd": {"triton_dense": 4.0, "triton_csr": None, "eager": 20.0}}
    table = bench.format_nb_table([nb]).splitlines()
    assert len(table) == 4 and table[0].startswith("| P | B | G |")
    # speed-ups against the faster layout; "err" = failed, "-" = not run; no bytes: no GB/s
    assert table[2].split("|")[-6:-1] == [" 10 ", " 3 ", " err ", " - ", " - "]
    assert table[3].split("|")[6:14] == [" 4 ", " err ", " 20 ", " - ", " - ", " 5 ", " - ",
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

    def fake_timer(fn, args):
        fn()
        calls.append(fn)
        return 1.0

    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "TIMER", fake_timer)
    args = bench.parse_args(["--perturbations", "40", "--hidden", "8",
                             "--latent", "6", "--particles", "2", "--cells", "12"])
    record = bench.bench_nb_case(6, 37, 0.9, args, compiled=None, particles=2)
    assert set(record["fwd"]) == set(record["fwd_bwd"]) == {"triton_dense", "triton_csr",
                                                            "eager"}
    assert "errors" not in record["fwd"] and "errors" not in record["fwd_bwd"]
    for name in ("triton_dense", "triton_csr"):  # the built-in float64 sanity check ran
        assert max(record["max_rel_err_vs_float64"][name]) < 1e-4
    emb = bench.bench_embedding(args)
    assert all(emb[m].get(k) == 1.0 for m in ("fwd", "fwd_bwd") for k in bench.EMB_METHODS)
    assert len(calls) == 12
    assert "| 2 | 6 | 37 | 0.9 | fwd |" in bench.format_nb_table([record], copy_gbps=1.0)
    enc = bench.bench_encoder(6, 37, 0.9, args)
    head = bench.bench_head(2, 6, 37, 0.9, args)
    assert set(enc["fwd_bwd"]) == {"triton", "reference"} and enc["max_rel_err_vs_reference"] < 1e-5
    assert set(head["fwd_bwd"]) == {"triton", "reference", "eager"}
    assert "| 2x6x37x8 | fwd+bwd |" in bench.format_pair_table([head], ("triton", "reference",
                                                                      "eager"), "PxBxGxH")
