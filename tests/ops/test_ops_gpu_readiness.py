"""GPU-path checks that run on the CPU (issue 13):

* a broken Triton install falls back to the reference with the reason, and ``samsvae info``
  prints that reason;
* a NaN mask logit gives a NaN mask (never a hard 0) in the Triton embedding kernel (under the
  interpreter) and in the reference, and a model with one fails loudly in training;
* ``--tf32`` / ``set_tf32``: TF32 only for a CUDA device, never on the CPU, never saved;
* ``check_counts`` reads nothing back to the host for valid counts and still refuses bad ones.
"""
import json
import sys

import numpy as np
import pytest
import torch

from samsvae.ops import backends, triton_support
from samsvae.ops.embedding.reference import masked_embedding_sum_reference
from samsvae.ops.encoder.reference import check_counts


# ------------------------------------------------------------------ (a) broken Triton install

@pytest.fixture
def broken_triton(monkeypatch):
    """CUDA present, triton installed, but ``import triton`` fails (a broken install)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(triton_support, "triton_installed", lambda: True)
    for name in [m for m in sys.modules if m == "triton" or m.startswith("triton.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton -> ImportError
    error = triton_support.triton_import_error.__wrapped__()  # the uncached check, run now
    monkeypatch.setattr(triton_support, "triton_import_error", lambda: error)
    return error


def test_broken_triton_falls_back_to_the_reference_with_the_reason(broken_triton):
    assert broken_triton.split(":")[0].endswith("Error")  # ModuleNotFoundError here
    assert triton_support.triton_cuda_available() is False
    why = triton_support.why_triton_unavailable()
    assert "does not load" in why and broken_triton in why and "reinstall" in why
    for op in ("nb_log_prob", "masked_embedding_sum", "log1p_standardize_linear"):
        assert backends.resolve(op, "auto", "cuda")[0] == "reference"
    with pytest.raises(backends.BackendUnavailableError, match="does not load"):
        backends.resolve("nb_log_prob", "triton", "cuda")  # explicit request: raise, with why


def test_info_prints_why_triton_is_unavailable(broken_triton, capsys):
    from samsvae.cli import info
    assert info.run(None) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("Triton GPU kernels")]
    assert len(line) == 1 and "does not load" in line[0] and broken_triton in line[0]


def test_working_detection_reports_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(triton_support, "triton_installed", lambda: True)
    monkeypatch.setattr(triton_support, "triton_import_error", lambda: "")
    assert triton_support.triton_cuda_available() and \
        triton_support.why_triton_unavailable() == "available"


# ------------------------------------------------------------------ (b) NaN mask logits

def _embedding_inputs():
    torch.manual_seed(0)
    dense = torch.tensor([[1.0, 0, 0], [0, 1.0, 1.0], [0, 0, 0], [1.0, 0, 1.0]])
    loc, log_scale = torch.randn(3, 5), 0.1 * torch.randn(3, 5)
    logits = torch.randn(3, 5)
    logits[0, 2] = float("nan")
    return dense.to_sparse_csr(), loc, log_scale, logits


@pytest.mark.parametrize("tier", ["reference", "triton"])
def test_nan_mask_logit_gives_a_nan_mask_not_zero(tier):
    dosage, loc, log_scale, logits = _embedding_inputs()
    if tier == "triton":
        pytest.importorskip("triton")
        from samsvae.ops.embedding.triton import masked_embedding_sum_triton as fn
    else:
        fn = masked_embedding_sum_reference
    out = fn(dosage, loc, log_scale, logits, particles=2,
             generator=torch.Generator().manual_seed(1))
    u = int((out.index == 0).nonzero()[0, 0])  # perturbation 0 among the batch's U
    mask = out.mask[:, u, 2]
    assert torch.isnan(mask).all(), f"{tier}: NaN logit gave mask {mask.tolist()}"
    # cells 0 and 3 carry perturbation 0: their latent dimension 2 is NaN, nothing else is
    assert torch.isnan(out.z_p[:, [0, 3], 2]).all()
    assert torch.isfinite(out.z_p[:, [1, 2]]).all()
    assert torch.isfinite(out.z_p[:, :, [0, 1, 3, 4]]).all()


def test_model_with_a_nan_mask_logit_fails_loudly_in_training():
    from samsvae.data import load_screen, make_split, simulate_screen
    from samsvae.train import Trainer, TrainConfig
    from samsvae.train.prepare import build_model_for_screen, make_loaders, split_indices

    screen = load_screen(simulate_screen(n_cells=120, n_genes=20, n_perturbations=4,
                                         n_latent=3, seed=2))
    split = make_split(screen, "random", seed=0)
    torch.manual_seed(0)
    model = build_model_for_screen(screen, split_indices(split, "train"), model="sams_vae",
                                   n_latent=3, n_hidden=8)
    with torch.no_grad():
        model.mask_logits_raw[:, 0] = float("nan")
    config = TrainConfig(batch_size=32, max_steps=12, progress=False)
    train, val = make_loaders(screen, split, batch_size=32, seed=0)
    batch = next(iter(train))
    assert not torch.isfinite(model.loss(batch, particles=2)["loss"])  # NaN, not a silent 0
    with pytest.raises(FloatingPointError, match="step"):
        Trainer(model, train, val, config).fit()


# ------------------------------------------------------------------ (c) --tf32

@pytest.fixture
def restore_precision():
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


def test_tf32_only_on_cuda(restore_precision):
    assert backends.set_tf32(True, "cpu") is False
    assert torch.get_float32_matmul_precision() == "highest"
    assert not torch.backends.cuda.matmul.allow_tf32
    assert backends.set_tf32(True, "cuda") is True  # the setting is process-wide, no GPU needed
    assert torch.get_float32_matmul_precision() == "high"
    assert backends.set_tf32(False, "cuda") is False
    assert torch.get_float32_matmul_precision() == "highest"


def test_cli_tf32_on_cpu_leaves_float32_and_is_not_saved(tmp_path, restore_precision):
    from samsvae.cli import main
    from samsvae.data import simulate_screen
    path = tmp_path / "s.h5ad"
    simulate_screen(n_cells=80, n_genes=12, n_perturbations=3, n_latent=2, seed=0).write_h5ad(path)
    run = tmp_path / "run"
    rc = main(["train", str(path), "--out", str(run), "--device", "cpu", "--tf32",
               "--max-steps", "2", "--batch-size", "16", "--latent", "2", "--hidden", "8",
               "--no-progress"])
    assert rc in (0, None)
    assert torch.get_float32_matmul_precision() == "highest"
    def keys(obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                yield str(k)
                yield from keys(v)
        elif isinstance(obj, list):
            for v in obj:
                yield from keys(v)
    config = json.loads((run / "config.json").read_text())
    assert not [k for k in keys(config) if "tf32" in k.lower() or "precision" in k.lower()]
    assert "tf32" not in json.dumps(config).lower().replace(str(tmp_path).lower(), "")


# ------------------------------------------------------------------ (d) check_counts, no sync

def test_check_counts_reads_nothing_back_for_valid_counts(monkeypatch):
    values = torch.tensor([0.0, 1.0, 7.0, 1e5])

    def no_sync(*args, **kwargs):
        raise AssertionError("check_counts synchronised with the host")
    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__int__", "__bool__", "__float__"):
            m.setattr(torch.Tensor, name, no_sync)
        check_counts(values)          # valid: one torch._assert_async, nothing read back
        check_counts(values[:0])      # empty
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite and non-negative; found 1 invalid"):
            check_counts(torch.tensor([1.0, bad, 2.0]))


def test_check_counts_is_asynchronous_by_construction(monkeypatch):
    """The check is a device-side assertion: ``torch._assert_async`` gets a tensor, not a bool
    (on a GPU the stream is not waited on)."""
    seen = []
    real = torch._assert_async

    def spy(cond, *args):
        seen.append(cond)
        return real(cond, *args)
    monkeypatch.setattr(torch, "_assert_async", spy)
    check_counts(torch.ones(5))
    assert len(seen) == 1 and isinstance(seen[0], torch.Tensor)


def test_counts_are_checked_without_sync_in_the_triton_encoder(monkeypatch):
    pytest.importorskip("triton")
    from samsvae.ops.encoder.triton import log1p_standardize_triton
    x = torch.tensor(np.array([[0, 2, 0], [1, 0, 5]], dtype=np.float32))
    calls = []
    import samsvae.ops.encoder.triton as enc
    monkeypatch.setattr(enc, "check_counts", lambda v: calls.append(v.shape))
    log1p_standardize_triton(x.to_sparse_csr(), torch.zeros(3), torch.ones(3))
    log1p_standardize_triton(x, torch.zeros(3), torch.ones(3))
    assert calls == [torch.Size([3]), torch.Size([2, 3])]
