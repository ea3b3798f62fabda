"""Smoke tests of the benchmark scripts at tiny sizes: they run, report every implementation in
both modes, and their accuracy columns agree with the float64 reference. No timing asserted."""
import csv
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import bench_embedding  # noqa: E402
import bench_encoder_input  # noqa: E402
import bench_nb  # noqa: E402
import bench_nb_linear  # noqa: E402
import bench_nb_train_head  # noqa: E402

@pytest.fixture(autouse=True)
def _results_csv_in_tmp(tmp_path, monkeypatch):
    """The scripts append to $SAMSVAE_BENCH_CSV: a temporary file, never benchmarks/results.csv."""
    path = tmp_path / "results.csv"
    monkeypatch.setenv("SAMSVAE_BENCH_CSV", str(path))
    return path


TINY_NB = ["--rows", "24", "--genes", "40", "--zero-fractions", "0.9", "--repeats", "1",
           "--warmup", "0", "--threads", "1"]


def _check_nb_rows(rows, impls):
    got = {(r["impl"], r["mode"]) for r in rows}
    assert got == {(i, m) for i in impls for m in ("fwd", "fwd_bwd")}
    for r in rows:
        assert r["median_s"] > 0 and r["speedup_vs_eager"] > 0
        if r["mode"] == "fwd":
            assert r["gelem_per_s"] > 0
            assert r["fwd_max_abs_err"] < 1e-2 and r["grad_rel_err"] < 1e-4, r["impl"]


def test_bench_nb_in_process_writes_json(tmp_path):
    out = tmp_path / "nb.json"
    payload = bench_nb.main(TINY_NB + ["--no-compile", "--in-process", "--out", str(out)])
    impls = {"eager", "scvi_formula", "reference_csr", "reference_dense"}
    assert impls <= {r["impl"] for r in payload["rows"]}
    _check_nb_rows(payload["rows"], {r["impl"] for r in payload["rows"]})
    saved = json.loads(out.read_text())
    assert saved["meta"]["torch_threads"] == 1 and "cpu_model" in saved["meta"]
    assert "reference_csr" in saved["markdown"] and "G elements/s" in saved["markdown"]


def test_bench_nb_appends_results_csv(tmp_path, _results_csv_in_tmp):
    import _harness as H
    bench_nb.main(TINY_NB + ["--no-compile", "--in-process", "--impls", "reference_csr"])
    bench_nb.main(TINY_NB + ["--no-compile", "--in-process", "--impls", "reference_csr",
                             "--no-csv"])
    with open(_results_csv_in_tmp, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == H.CSV_COLUMNS
    assert {r["op"] for r in rows} == {"nb_log_prob"}
    assert {r["implementation"] for r in rows} == {"eager", "reference_csr"}
    assert {r["shape"] for r in rows} == {"B=24,G=40,zeros=0.9"}
    assert {"fwd_ms", "fwdbwd_ms", "fwd_speedup_vs_eager", "fwd_gelem_per_s"} <= {
        r["metric"] for r in rows}
    assert all(float(r["value"]) >= 0 and r["machine"].endswith(" t1") for r in rows)
    n = len(rows)
    other = tmp_path / "other.csv"
    bench_nb.main(TINY_NB + ["--no-compile", "--in-process", "--impls", "reference_csr",
                             "--csv", str(other)])
    assert len(other.read_text().splitlines()) == n + 1  # header once, same rows
    assert len(_results_csv_in_tmp.read_text().splitlines()) == n + 1  # --no-csv wrote none


def test_csv_path_never_the_repo_table_under_pytest(monkeypatch):
    import argparse

    import _harness as H
    args = argparse.Namespace(csv=None, no_csv=False)
    monkeypatch.delenv("SAMSVAE_BENCH_CSV")
    assert H.csv_path(args) is None  # PYTEST_CURRENT_TEST is set
    monkeypatch.setenv("SAMSVAE_BENCH_CSV", "none")
    assert H.csv_path(args) is None
    assert H.csv_path(argparse.Namespace(csv="x.csv", no_csv=False)) == "x.csv"
    assert H.csv_path(argparse.Namespace(csv="x.csv", no_csv=True)) is None


def test_bench_train_step_rows_from_a_samsvae_bench_record():
    import bench_train_step
    t = {"median_s": 0.1, "min_s": 0.1}
    record = {"config": {"genes": 40, "perturbations": 12, "cells_per_batch": 16,
                         "particles": 2, "guide": "mean_field", "keep_freed_memory": False,
                         "threads": 1},
              "counts_density": 0.3, "matmul_floor_s": 0.05,
              "backends": {"reference": {"resolved": "nb_log_prob=reference",
                                         "times": {"step": t}},
                           "auto": {"resolved": "nb_log_prob=cpp,masked_embedding_sum=cpp",
                                    "times": {"step": t}}},
              "ratios": {"auto": {"speedup_over_reference": 1.0, "speedup_bound": 2.0}},
              "iwelbo": [{"backend": "auto", "particles": 6, "cells": 4, "ms_per_cell": 1.5,
                          "added_peak_bytes": 2**20, "peak_rss_bytes": None}]}
    rows = bench_train_step.csv_rows(record)
    got = {(r["op"], r["implementation"], r["metric"]) for r in rows}
    assert got == {("train_step", "matmul_floor", "step_ms"),
                   ("train_step", "reference", "step_ms"), ("train_step", "cpp", "step_ms"),
                   ("train_step", "cpp", "speedup_vs_reference"),
                   ("train_step", "cpp", "speedup_bound"), ("iwelbo", "cpp", "ms_per_cell"),
                   ("iwelbo", "cpp", "added_peak_mib")}
    assert rows[0]["shape"] == "G=40,T=12,C=16,P=2,guide=mean_field,nnz=0.3,alloc=default"


def test_bench_nb_worker_processes():
    payload = bench_nb.main(TINY_NB + ["--no-compile", "--impls", "reference_csr"])
    _check_nb_rows(payload["rows"], {"eager", "reference_csr"})
    assert all(r["peak_bytes"] is None or r["peak_bytes"] >= 0 for r in payload["rows"])
    assert "fresh worker" in payload["meta"]["memory_method"]


def test_bench_nb_compiled_baselines_capture():
    """The compile_* baselines trace (forward and backward) without graph breaks on sparse
    inputs; aot_eager skips code generation, which a cold inductor compile would take ~1 min."""
    payload = bench_nb.main(TINY_NB + ["--in-process", "--compile-backend", "aot_eager",
                                       "--impls", "compile_sparse_coo", "compile_eager"])
    _check_nb_rows(payload["rows"], {"eager", "compile_sparse_coo", "compile_eager"})


def test_bench_nb_rejects_unknown_impl():
    with pytest.raises(SystemExit, match="unknown or unavailable"):
        bench_nb.main(TINY_NB + ["--in-process", "--no-compile", "--impls", "no_such_impl"])


def test_bench_embedding_in_process():
    payload = bench_embedding.main(["--perturbations", "60", "--latent", "4", "--particles", "2",
                                    "--cells", "16", "--repeats", "1", "--warmup", "0",
                                    "--compile-backend", "aot_eager", "--in-process",
                                    "--threads", "1"])
    rows = payload["rows"]
    impls = {r["impl"] for r in rows}
    assert {"dense_all_t", "bag_all_t", "bag_batch_u", "index_add_batch_u", "reference",
            "compile_dense_all_t", "compile_bag_all_t", "compile_index_add_batch_u"} <= impls
    for r in rows:
        if r["mode"] == "fwd":
            assert r["max_abs_err"] < 1e-5, r["impl"]
    assert "T=60" in payload["markdown"]


def test_bench_nb_linear_in_process():
    payload = bench_nb_linear.main(["--particles", "1", "3", "--cells", "8", "--genes", "30",
                                    "--hidden", "5", "--unfused-max-particles", "1",
                                    "--chunk-rows", "5", "--repeats", "1", "--warmup", "0",
                                    "--in-process", "--threads", "1"])
    seen = {(r["impl"], r["particles"], r["mode"]) for r in payload["rows"]}
    assert seen == {("fused", 1, "fwd"), ("fused", 1, "fwd_bwd"), ("fused", 3, "fwd"),
                    ("fused", 3, "fwd_bwd"), ("unfused", 1, "fwd"), ("unfused", 1, "fwd_bwd")}
    assert all(math.isfinite(r["median_s"]) for r in payload["rows"])


def test_bench_nb_train_head_runs_every_implementation(tmp_path):
    from samsvae.ops import cpp_extension as _cpp
    if not _cpp.ext_available():
        pytest.skip("C++ extension not built")
    out = tmp_path / "head.json"
    payload = bench_nb_train_head.main(["--particles", "2", "--cells", "6", "--genes", "30",
                                        "--hidden", "5", "--repeats", "1", "--warmup", "0",
                                        "--block", "1", "--out", str(out)])
    impls = {r["impl"] for r in payload["rows"]}
    assert impls == {"fwd_grad", "fwd_then_bwd", "reference", "kernel_fwd_bwd",
                     "kernel_fwd_grad", "kernel_copy_only"}
    assert all(r["ms"] > 0 and r["vs_fwd_then_bwd"] > 0 for r in payload["rows"])
    assert json.loads(out.read_text())["meta"]["torch_threads"] >= 1


def test_bench_encoder_input_runs_every_implementation(tmp_path):
    from samsvae.ops import cpp_extension as _cpp
    if not _cpp.ext_available():
        pytest.skip("C++ extension not built")
    out = tmp_path / "enc.json"
    payload = bench_encoder_input.main(["--cells", "8", "--genes", "50", "--hidden", "6",
                                        "--mean-counts", "0.05", "0.5", "--repeats", "1",
                                        "--warmup", "0", "--block", "1", "--out", str(out)])
    rows = payload["rows"]
    assert {r["impl"] for r in rows} == {"reference", "cpp_dense", "cpp_sparse", "torch_sparse"}
    assert len({r["density"] for r in rows}) == 2
    assert all(r["ms"] > 0 and r["vs_reference"] > 0 for r in rows)
    assert json.loads(out.read_text())["meta"]["torch_threads"] >= 1
