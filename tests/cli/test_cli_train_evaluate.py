"""`samsvae train` / `samsvae evaluate` end to end on a tiny simulated screen, `train --demo`, and
the messages for the mistakes a user can make."""
import json
import math

import numpy as np
import pytest

from samsvae.cli import main
from samsvae.data import simulate_screen

TINY = ["--latent", "4", "--hidden", "32", "--batch-size", "64", "--lr", "3e-3", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_h5ad(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "tiny.h5ad"
    adata = simulate_screen(n_cells=300, n_genes=30, n_perturbations=5, n_combinations=2,
                            n_latent=4, seed=2)
    adata.obs["my_split"] = np.where(np.arange(adata.n_obs) % 5 == 0, "test",
                                     np.where(np.arange(adata.n_obs) % 5 == 1, "val", "train"))
    adata.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def trained_run(tiny_h5ad, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", str(tiny_h5ad), "--out", str(out), "--max-steps", "30", *TINY]) == 0
    return out


def _assert_png(path):
    from matplotlib.image import imread
    assert path.is_file() and path.stat().st_size > 5000, path
    img = imread(path)
    assert img.shape[0] > 200 and img.shape[1] > 200
    assert img[..., :3].std() > 0.05  # not a blank canvas


def test_train_writes_a_complete_run_directory(trained_run, capsys):
    for name in ("config.json", "split.csv", "model.pt", "history.json", "checkpoints/last.pt",
                 "checkpoints/best.pt"):
        assert (trained_run / name).is_file(), name
    config = json.loads((trained_run / "config.json").read_text())
    assert config["model"]["name"] == "sams_vae" and config["model"]["guide"] == "mean_field"
    assert len(config["genes"]) == 30 and config["perturbations"] == [f"P{i}" for i in range(5)]
    history = json.loads((trained_run / "history.json").read_text())
    assert history["train"]["step"][-1] == 30


def test_evaluate_writes_contract_metrics_and_plots(trained_run, capsys):
    rc = main(["evaluate", str(trained_run), "--iwelbo-particles", "10", "--ate-particles", "100",
               "--plots", "--min-cells", "1"])
    assert rc == 0
    metrics = json.loads((trained_run / "metrics.json").read_text())
    for key in ("test_iwelbo", "ate_pearson", "ate_pearson_top20", "mask_f1"):
        assert isinstance(metrics[key], float) and math.isfinite(metrics[key]), key
    assert metrics["split"] == "test" and metrics["n_cells"] > 0
    printed = capsys.readouterr().out
    assert "test_iwelbo" in printed and "ate_pearson_top20" in printed
    for name in ("masks.png", "ate_scatter.png", "ate_per_perturbation.png",
                 "training_curves.png", "ate_per_label.png"):
        _assert_png(trained_run / "plots" / name)


def test_evaluate_prints_baselines_and_writes_per_label_csv(trained_run, capsys):
    import pandas as pd
    from samsvae.infer import METRICS
    assert main(["evaluate", str(trained_run), "--iwelbo-particles", "4", "--ate-particles", "50",
                 "--min-cells", "1"]) == 0
    metrics = json.loads((trained_run / "metrics.json").read_text())
    b = metrics["baselines"]
    for name in ("control", "train_mean", "additive", "linear", "split_half"):
        assert set(METRICS) <= set(b[name]) and b[name]["n_labels"] >= 0, name
    assert b["n_labels"] == metrics["n_ate_labels"] > 0 and b["n_labels_left_out"] == 0
    for key in ("ate_mse_top20", "ate_sign_top20", "ate_systema_pearson", "ate_split_half"):
        assert key in metrics, key
    csv = pd.read_csv(trained_run / "ate_per_label.csv")
    assert list(csv.columns[:3]) == ["label", "n_cells_train", "n_cells_eval"]
    for row in ("model", "control", "train_mean", "additive", "linear", "split_half"):
        for m in METRICS:
            assert f"{m}_{row}" in csv.columns, (m, row)
    assert len(csv) == metrics["n_ate_labels"]
    assert np.nanmean(csv["ate_pearson_model"]) == pytest.approx(metrics["ate_pearson"], rel=1e-4, abs=1e-5)
    printed = capsys.readouterr().out
    for row in ("model", "control", "train_mean", "additive", "linear", "split_half"):
        assert f"\n  {row} " in printed, row
    assert "mse_top20: log2 units^2, 0 best" in printed
    paired = b["model_minus"]
    assert set(paired) == {"train_mean", "additive", "linear"}  # control: no Pearson
    for name, by_metric in paired.items():
        d = by_metric["ate_pearson"]
        want = np.nanmean(csv["ate_pearson_model"] - csv[f"ate_pearson_{name}"])
        assert d["diff"] == pytest.approx(want, abs=1e-5) and d["n"] == len(csv)
        assert f"\n  {name:<11}pearson {d['diff']:+.3f}" in printed, name


def test_evaluate_min_cells_leaves_out_small_labels(trained_run, tiny_h5ad, capsys):
    import anndata
    import pandas as pd
    # every cell (--split all): the simulated labels have 38 or 39 cells
    sizes = anndata.read_h5ad(tiny_h5ad).obs["perturbation"].astype(str).value_counts()
    sizes = sizes.drop("control")
    n = int(sizes.min()) + 1
    assert main(["evaluate", str(trained_run), "--iwelbo-particles", "2", "--ate-particles", "20",
                 "--split", "all", "--min-cells", str(n)]) == 0
    metrics = json.loads((trained_run / "metrics.json").read_text())
    left = int((sizes < n).sum())
    assert 0 < left < len(sizes)
    assert metrics["baselines"]["n_labels_left_out"] == left == metrics["n_ate_labels_left_out"]
    assert metrics["n_ate_labels"] == len(sizes) - left and metrics["min_cells"] == n
    csv = pd.read_csv(trained_run / "ate_per_label.csv")
    assert (csv["n_cells_eval"] >= n).all()
    assert np.nanmean(csv["ate_pearson_model"]) == pytest.approx(metrics["ate_pearson"], rel=1e-4, abs=1e-5)
    assert f"{left} label(s) with fewer than {n} cells" in capsys.readouterr().out


def test_evaluate_warns_when_the_model_predicts_larger_effects(trained_run, monkeypatch):
    import samsvae.cli.evaluate as cli_evaluate
    real = cli_evaluate.evaluate_model

    def inflated(*args, **kwargs):
        out = real(*args, **kwargs)
        out["model_ate"] = np.asarray(out["model_ate"]) * 1000.0 + 1.0
        return out

    monkeypatch.setattr(cli_evaluate, "evaluate_model", inflated)
    with pytest.warns(UserWarning, match="the model predicts larger effects than the data"):
        assert main(["evaluate", str(trained_run), "--iwelbo-particles", "2",
                     "--ate-particles", "20", "--min-cells", "1"]) == 0


def test_evaluate_on_explicit_data_and_split(trained_run, tiny_h5ad):
    assert main(["evaluate", str(trained_run), "--data", str(tiny_h5ad), "--split", "val",
                 "--iwelbo-particles", "4", "--ate-particles", "20"]) == 0
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["split"] == "val" and math.isfinite(metrics["test_iwelbo"])


def test_train_with_split_column_and_other_model(tiny_h5ad, tmp_path):
    out = tmp_path / "cpa"
    assert main(["train", str(tiny_h5ad), "--out", str(out), "--max-steps", "5",
                 "--model", "cpa_vae", "--guide", "corr_basal", "--split", "my_split",
                 "--backed", *TINY]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["backed"] and config["split"]["kind"] == "my_split"
    split = (out / "split.csv").read_text().splitlines()
    assert split[0] == "cell,split" and len(split) == 301
    assert sum(line.endswith(",test") for line in split) == 60


def test_demo_runs_small(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["train", "--demo", "--out", str(out), "--demo-cells", "300", "--demo-genes", "30",
               "--demo-perturbations", "4", "--max-steps", "10", "--no-progress"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(math.isfinite(metrics[k]) for k in ("test_iwelbo", "ate_pearson", "mask_f1"))
    assert (out / "demo.h5ad").is_file() and (out / "plots" / "masks.png").is_file()
    assert "demo done" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["train", "nope.h5ad", "--out", "x"], "data file nope.h5ad does not exist"),
    (["train", "{data}", "--out", "{tmp}/a", "--model", "sams_vae", "--guide", "corr_bad"],
     "model 'sams_vae' has no guide 'corr_bad'. Valid pairs: --model cvae --guide mean_field"),
    (["train", "{data}", "--out", "{tmp}/a", "--model", "vae"], "unknown model 'vae'"),
    (["train", "{data}", "--out", "{tmp}/a", "--split", "batchy"], "unknown split 'batchy'"),
    (["train", "{data}"], "--out RUN_DIR"),
    (["train"], "or --demo"),
    (["evaluate", "{tmp}/nothing"], "does not exist"),
])
def test_user_errors_are_explained(argv, message, tiny_h5ad, tmp_path, capsys):
    argv = [a.format(data=tiny_h5ad, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_max_steps_and_max_epochs_are_exclusive(tiny_h5ad, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", str(tiny_h5ad), "--out", "x", "--max-steps", "3", "--max-epochs", "2"])
    assert exc.value.code == 2
    assert "not allowed with argument --max-steps" in capsys.readouterr().err


def test_existing_run_needs_resume_and_resume_checks_options(trained_run, tiny_h5ad, capsys):
    assert main(["train", str(tiny_h5ad), "--out", str(trained_run), "--max-steps", "30",
                 *TINY]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main(["train", str(tiny_h5ad), "--out", str(trained_run), "--max-steps", "30",
                 "--resume", *TINY, "--latent", "8"]) == 2
    assert "--latent: run 4 vs now 8" in capsys.readouterr().err
    # same options, nothing left to do: finishes at once and keeps the weights
    assert main(["train", str(tiny_h5ad), "--out", str(trained_run), "--max-steps", "30",
                 "--resume", *TINY]) == 0
    assert "nothing to do" in capsys.readouterr().out


def _walk_keys(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from _walk_keys(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk_keys(v)


@pytest.mark.parametrize("train_backend, eval_backend",
                         [("reference", "auto"), ("auto", "reference")])
def test_backend_is_chosen_per_call_not_saved(tiny_h5ad, tmp_path, train_backend, eval_backend):
    """A run trained on one backend evaluates on another; config.json holds no backend, and the
    same weights give the same metrics whichever backend evaluates them."""
    out = tmp_path / "run"
    assert main(["train", str(tiny_h5ad), "--out", str(out), "--max-steps", "6",
                 "--backend", train_backend, *TINY]) == 0
    config = json.loads((out / "config.json").read_text())
    assert "backend" not in set(_walk_keys({k: v for k, v in config.items() if k != "cli"}))
    assert "backend" not in config["cli"]
    metrics = {}
    for backend in (eval_backend, train_backend):
        assert main(["evaluate", str(out), "--iwelbo-particles", "8", "--ate-particles", "50",
                     "--backend", backend]) == 0
        metrics[backend] = json.loads((out / "metrics.json").read_text())
    a, b = metrics.values()
    assert a["test_iwelbo"] == pytest.approx(b["test_iwelbo"], rel=1e-4)
    assert a["ate_pearson"] == pytest.approx(b["ate_pearson"], abs=1e-3)


def test_a_run_dir_with_a_stored_backend_still_loads(trained_run, tmp_path):
    """Run directories of earlier versions recorded the backend in the model config: ignored."""
    import shutil

    import torch
    old = tmp_path / "old"
    shutil.copytree(trained_run, old)
    config = json.loads((old / "config.json").read_text())
    config["model"]["config"]["backend"] = "cpp"
    (old / "config.json").write_text(json.dumps(config))
    saved = torch.load(old / "model.pt", weights_only=True)
    saved["config"]["backend"] = "cpp"
    torch.save(saved, old / "model.pt")
    assert main(["evaluate", str(old), "--iwelbo-particles", "4", "--ate-particles", "20"]) == 0
    assert json.loads((old / "metrics.json").read_text())["n_cells"] > 0


def test_evaluate_refuses_an_unavailable_backend(trained_run, capsys):
    rc = main(["evaluate", str(trained_run), "--backend", "triton"])
    assert rc == 2
    assert "triton" in capsys.readouterr().err


def test_paired_lines_say_when_the_labels_are_noise(capsys):
    from samsvae.cli.evaluate import print_paired
    diffs = {"train_mean": {"ate_pearson": {"diff": 0.06, "se": 0.02, "ahead": 7, "n": 8,
                                            "verdict": "ahead"}}}
    print_paired(diffs, noise_level=True)
    out = capsys.readouterr().out
    assert "rank nothing" in out and "train_mean pearson +0.060 +- 0.020 (7/8) ahead" in out
    print_paired(diffs)
    assert "rank nothing" not in capsys.readouterr().out
