"""``samsvae bench`` at tiny dimensions: it runs, prints its table and writes the JSON record."""
import json

import pytest

from samsvae.cli import main


def _bench(tmp_path, *extra):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--genes", "40", "--perturbations", "12", "--cells-per-batch", "16",
               "--particles", "2", "--latent", "4", "--hidden", "8", "--steps", "1",
               "--warmup", "0", "--json", str(out), *extra])
    assert rc == 0
    return json.loads(out.read_text())


def test_bench_writes_expected_json(tmp_path, capsys):
    result = _bench(tmp_path, "--guide", "corr_both", "--iwelbo-particles", "6",
                    "--iwelbo-cells", "4", "--iwelbo-chunk", "4",
                    "--iwelbo-memory-particles", "12")
    from samsvae.cli.bench import JSON_KEYS
    assert set(JSON_KEYS) <= set(result)
    assert result["config"]["guide"] == "corr_both"
    assert result["matmul_floor_s"] > 0
    assert list(result["backends"]) == ["reference", "auto"]
    for name, rec in result["backends"].items():
        assert {"step", "head", "nb", "composition", "encoder", "optimizer"} <= set(rec["times"])
        assert all(t["median_s"] > 0 and len(t["samples_s"]) == 1 for t in rec["times"].values())
        assert result["ratios"][name]["step_over_matmul_floor"] > 0
    assert "speedup_over_reference" in result["ratios"]["auto"]
    floor_key = result["backends"]["auto"]["floor"]
    assert result["ratios"]["auto"]["speedup_bound"] == pytest.approx(
        result["backends"]["reference"]["times"]["step"]["median_s"]
        / result[floor_key + "_s"])
    # the corr_basal part of the guide adds the z_p conditioning layer to the floor, the
    # corr_embedding part the layers of q(e | m, c) on particles x batch perturbations rows
    shapes = result["machine"]["matmul_shapes"]
    n_mlp = len(shapes) - 5
    assert n_mlp >= 2
    assert all(rows % 2 == 0 and rows > 0 for rows, *_ in shapes[5:])  # 2 particles x U
    ks = [(m["backend"], m["particles"]) for m in result["iwelbo"]]
    assert ks == [("reference", 6), ("auto", 6), ("auto", 12)]
    for m in result["iwelbo"]:
        assert m["ms_per_cell"] > 0 and m["peak_rss_bytes"] > 0 and m["cells"] == 4
    # same weights and same evaluation noise: both backends estimate the same IWELBO
    assert result["iwelbo"][0]["iwelbo_mean_nats"] == pytest.approx(
        result["iwelbo"][1]["iwelbo_mean_nats"], rel=1e-4)
    table = capsys.readouterr().out
    assert "step / matmul floor" in table and "IWELBO backend" in table
    assert "bound" in table


def test_bench_skips_iwelbo_and_selects_components(tmp_path):
    result = _bench(tmp_path, "--iwelbo-particles", "0", "--components", "step",
                    "--backends", "auto")
    assert result["iwelbo"] == []
    assert set(result["backends"]["auto"]["times"]) == {"step"}
    assert "speedup_over_reference" not in result["ratios"]["auto"]


@pytest.mark.parametrize("argv, message", [
    (["--guide", "no_such_guide"], "valid pairs"),
    (["--particles", "0"], "--particles must be >= 1"),
])
def test_bench_rejects_bad_arguments(tmp_path, argv, message):
    with pytest.raises(SystemExit, match=message):
        main(["bench", "--genes", "10", "--perturbations", "3", *argv])


def test_bench_rejects_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend"):
        main(["bench", "--genes", "10", "--perturbations", "3", "--backends", "fast",
              "--iwelbo-particles", "0"])


def test_sparse_counts_get_the_floor_of_the_sparse_encoder(tmp_path, capsys):
    """At a density where the cpp encoder runs its sparse kernel, that backend's step is put
    against the products it runs (no dense genes -> hidden pair), the reference against all."""
    from samsvae.ops import cpp_extension as _cpp
    result = _bench(tmp_path, "--iwelbo-particles", "0", "--mean-count", "0.02",
                    "--components", "step")
    assert 0 < result["counts_density"] <= 0.15
    assert result["backends"]["reference"]["floor"] == "matmul_floor"
    if not _cpp.ext_available():
        assert "matmul_floor_sparse_input_s" not in result
        return
    auto = result["backends"]["auto"]
    assert auto["floor"] == "matmul_floor_sparse_input"
    assert auto["encoder_input"] == "sparse kernel"
    assert 0 < result["matmul_floor_sparse_input_s"]
    assert result["ratios"]["auto"]["step_over_matmul_floor"] == pytest.approx(
        auto["times"]["step"]["median_s"] / result["matmul_floor_sparse_input_s"])
    assert "without the encoder's genes -> hidden products" in capsys.readouterr().out


def test_bench_rejects_a_non_positive_mean_count():
    with pytest.raises(SystemExit, match="--mean-count must be > 0"):
        main(["bench", "--genes", "10", "--perturbations", "3", "--mean-count", "0"])
