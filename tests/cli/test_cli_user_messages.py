"""Issue 15 (1, 5, 6, 7, 9): non-cell labels, dropped-cell counts, messages in the caller's
language, questionable input, and the small things a user sees."""
import json
import warnings

import anndata
import numpy as np
import pandas as pd
import pytest

import samsvae
from samsvae.cli import main
from samsvae.data import load_screen

TINY = ["--latent", "3", "--hidden", "8", "--batch-size", "64", "--max-steps", "2",
        "--no-progress"]


def _adata(labels, genes=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.poisson(3.0, size=(len(labels), genes)).astype(np.float32)
    obs = pd.DataFrame({"perturbation": labels}, index=[f"c{i}" for i in range(len(labels))])
    return anndata.AnnData(X=x, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(genes)]))


LABELS = ["control"] * 40 + ["A"] * 40 + ["B"] * 30 + ["unassigned"] * 12


@pytest.fixture(scope="module")
def h5ad(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "screen.h5ad"
    _adata(LABELS).write_h5ad(path)
    return path


@pytest.mark.parametrize("label", ["unassigned", "Multiplet", "NA", "nan", "None", ""])
def test_noncell_labels_refused_naming_the_options(label):
    adata = _adata(["control"] * 20 + ["A"] * 20 + [label] * 5)
    with pytest.raises(ValueError) as exc:
        load_screen(adata)
    msg = str(exc.value)
    assert f"{label!r} (5 cells)" in msg
    assert f"drop_labels=[{label!r}]" in msg and f"keep_labels=[{label!r}]" in msg
    screen = load_screen(adata, drop_labels=[label])
    assert screen.dropped == {f"drop_labels: {label}": 5}
    if label:  # an empty label cannot name a perturbation
        assert label in load_screen(adata, keep_labels=[label]).perturbations


def test_cli_refuses_noncell_labels_then_logs_and_records_drops(h5ad, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(h5ad), "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err
    assert "'unassigned' (12 cells)" in err and "--drop-labels unassigned" in err
    assert "--keep-labels unassigned" in err and "drop_labels=" not in err
    assert main(["train", str(h5ad), "--out", str(out), "--drop-labels", "unassigned",
                 *TINY]) == 0
    text = capsys.readouterr().out
    assert "dropped 12 cells (label unassigned)" in text
    assert text.splitlines()[0].startswith("kernels: ")
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["dropped_cells"] == {"drop_labels: unassigned": 12}


def test_api_names_keywords_and_cli_names_flags(h5ad, tmp_path, capsys):
    adata = _adata(["ctl"] * 20 + ["A"] * 20)
    with pytest.raises(ValueError, match=r"control_label='<label>'"):
        load_screen(adata)
    path = tmp_path / "noctl.h5ad"
    adata.write_h5ad(path)
    assert main(["train", str(path), "--out", str(tmp_path / "r"), *TINY]) == 2
    err = capsys.readouterr().err
    assert "--control-label <label>" in err and "control_label=" not in err
    assert main(["train", str(path), "--out", str(tmp_path / "r"), "--layer", "raw", *TINY]) == 2
    assert "--layer <name>" in capsys.readouterr().err
    assert main(["train", str(h5ad), "--out", str(tmp_path / "r"), "--perturbation-key", "x",
                 *TINY]) == 2
    assert "--perturbation-key <column>" in capsys.readouterr().err
    assert main(["train", str(h5ad), "--out", str(tmp_path / "r"), "--global-kl-warmup", "1.5",
                 *TINY]) == 2
    err = capsys.readouterr().err
    assert "--global-kl-warmup is a fraction" in err and "global_kl_warmup" not in err
    ok = _adata(["control"] * 20 + ["A"] * 20)
    samsvae.SAMSVAE.setup_anndata(ok)
    with pytest.raises(ValueError, match="global_kl_warmup must be a fraction"):
        samsvae.SAMSVAE(ok, n_latent=2, n_hidden=8).train(max_steps=1, global_kl_warmup=-0.1,
                                                          progress=False, log=None)


def test_all_control_and_empty_data_same_message_in_api_and_cli(tmp_path, capsys):
    for adata, message in ((_adata(["control"] * 30), "no perturbed cells"),
                           (_adata(["control"] * 30)[:0].copy(), "the data is empty")):
        with pytest.raises(ValueError, match=message):
            load_screen(adata)
        with pytest.raises(ValueError, match=message):
            samsvae.SAMSVAE.setup_anndata(adata)
            samsvae.SAMSVAE(adata)
        path = tmp_path / "x.h5ad"
        adata.write_h5ad(path)
        assert main(["train", str(path), "--out", str(tmp_path / "r"), *TINY]) == 2
        assert message in capsys.readouterr().err


def test_duplicated_genes_refused_and_few_cell_perturbations_warned():
    adata = _adata(["control"] * 20 + ["A"] * 20 + ["B"] * 4)
    adata.var_names = ["g0", "g1", "g1", "g3", "g4", "g4"]
    with pytest.raises(ValueError, match=r"adata.var_names_make_unique\(\)"):
        load_screen(adata)
    adata.var_names_make_unique()
    with pytest.warns(UserWarning, match=r"1 perturbation\(s\) carried by fewer than 10 cells "
                                         r"in the data: B \(4\)"):
        load_screen(adata)


def test_predict_on_an_untrained_model_is_refused():
    adata = _adata(["control"] * 20 + ["A"] * 20)
    samsvae.SAMSVAE.setup_anndata(adata)
    model = samsvae.SAMSVAE(adata, n_latent=2, n_hidden=8)
    with pytest.raises(RuntimeError, match="needs a trained model"):
        model.predict(["A"])
    with pytest.raises(RuntimeError, match="needs a trained model"):
        model.average_treatment_effects()


def test_help_sentence_whole_and_warnings_one_line(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "SAMS-VAE for perturbation screens: simulate, train, evaluate, benchmark." in out
    adata = _adata(["control"] * 20 + ["A"] * 20)
    adata.X[3] = 0
    path = tmp_path / "z.h5ad"
    adata.write_h5ad(path)
    from samsvae.cli import _one_line_warning
    assert _one_line_warning("dropping 1 cells", UserWarning, "/x.py", 3) == \
        "samsvae: warning: dropping 1 cells\n"
    assert main(["train", str(path), "--out", str(tmp_path / "r"), *TINY]) == 0
    assert "dropped 1 cells (zero counts)" in capsys.readouterr().out


def test_reference_fallback_warns_once(monkeypatch):
    from samsvae.ops import backends, cpp_extension
    monkeypatch.setattr(cpp_extension, "_C", None)
    monkeypatch.setattr(backends, "_WARNED_REFERENCE", False)
    monkeypatch.setitem(backends._REGISTRY, "_test_op", {})
    backends.register("_test_op", "reference", lambda: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backends.resolve("_test_op", "auto", "cpu")
        backends.resolve("_test_op", "auto", "cpu")
    text = [str(w.message) for w in caught]
    assert len(text) == 1 and "C++ extension did not build" in text[0]
    assert "pure-PyTorch reference (SLOW)" in backends.kernels_line("cpu")


def test_evaluate_defines_metrics_and_says_where_plots_went(h5ad, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(h5ad), "--out", str(out), "--drop-labels", "unassigned",
                 *TINY]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out), "--plots", "--iwelbo-particles", "2",
                 "--ate-particles", "20"]) == 0
    text = capsys.readouterr().out
    assert "test_iwelbo: importance-weighted lower bound of log p(x), nats per cell" in text
    assert "higher is better" in text and "log2(1 + 1e4 x / library)" in text
    assert f"plots (PNG) to {out / 'plots'}" in text


def test_every_model_option_flag_reaches_the_model():
    """Each flag of MODEL_OPTIONS lands on its build_model keyword (a flag whose argparse name
    differed from the keyword was once silently dropped)."""
    from samsvae.cli import build_parser
    from samsvae.cli.train import MODEL_OPTIONS, model_options
    values = {float: "0.5", int: "3", str: "full"}
    argv = ["train", "data.h5ad", "--out", "run"]
    for flag, _, kind, _ in MODEL_OPTIONS:
        argv += [flag, values[kind]]
    args = build_parser().parse_args(argv)
    got = model_options(args)
    assert set(got) == {key for _, key, _, _ in MODEL_OPTIONS}
    for flag, key, kind, _ in MODEL_OPTIONS:
        assert got[key] == kind(values[kind]), flag
