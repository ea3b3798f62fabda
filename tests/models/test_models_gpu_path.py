"""The ``--device cuda`` training path, checked on a CUDA-less machine (issue 13).

* ``auto`` on CUDA tensors resolves every op to its Triton tier (``backends.auto_plan``);
* one training step (and IWELBO chunks) of every model and guide calls only Triton tiers when
  the Triton tiers are made usable on CPU tensors (the interpreter, ``TRITON_INTERPRET=1``),
  and makes no host synchronisation: ``.item()``, ``.tolist()``, ``int/float/bool`` of a tensor,
  ``torch.unique``, ``nonzero`` and ``repeat_interleave`` without ``output_size`` raise inside
  the step (on a GPU each of them waits for the device).
"""
import contextlib

import numpy as np
import pytest
import torch

from samsvae import ops
from samsvae.data import MinibatchLoader, load_screen, perturbation_cell_counts, simulate_screen
from samsvae.models import MODEL_GUIDES, build_model, svae_plus_labels
from samsvae.ops import backends

pytest.importorskip("triton")

KERNEL_OPS = {"nb_log_prob", "nb_log_prob_linear", "masked_embedding_sum", "perturbation_sum",
              "log1p_standardize", "log1p_standardize_linear"}


def test_auto_on_cuda_resolves_every_op_to_triton():
    plan = backends.auto_plan("cuda")
    assert KERNEL_OPS <= set(plan)
    assert {op: b for op, b in plan.items() if b != "triton"} == {}
    # and on the CPU nothing changes: the C++ tier where built, else the reference
    assert set(backends.auto_plan("cpu").values()) <= {"cpp", "reference"}


class HostSync(AssertionError):
    pass


def _raiser(name):
    def f(*args, **kwargs):
        raise HostSync(f"{name} called inside the training step (a host synchronisation on a GPU)")
    return f


@contextlib.contextmanager
def no_host_sync(monkeypatch):
    """Inside the block every Python-level call that reads device data back raises."""
    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__int__", "__bool__", "__float__", "nonzero", "unique"):
            m.setattr(torch.Tensor, name, _raiser(f"Tensor.{name}"))
        m.setattr(torch, "unique", _raiser("torch.unique"))
        m.setattr(torch, "nonzero", _raiser("torch.nonzero"))
        original = torch.repeat_interleave

        def repeat_interleave(*args, **kwargs):
            if kwargs.get("output_size") is None:
                raise HostSync("repeat_interleave without output_size")
            return original(*args, **kwargs)
        m.setattr(torch, "repeat_interleave", repeat_interleave)
        yield


@pytest.fixture
def triton_on_cpu(monkeypatch):
    """Make ``auto`` on CPU tensors pick the Triton tiers (run by the interpreter) and record
    every resolution: what ``--device cuda`` would run."""
    calls = []
    for op, impls in backends._REGISTRY.items():
        if "triton" in impls:
            impl = impls["triton"]
            monkeypatch.setitem(impls, "triton", backends._Impl(
                impl.target, lambda: True, ("cpu", "cuda"), impl.why_unavailable))
    monkeypatch.setitem(backends._AUTO_ORDER, "cpu", ("triton", "reference"))
    resolve = backends.resolve

    def recording(op, backend="auto", device="cpu"):
        name, fn = resolve(op, backend, device)
        calls.append((op, name))
        return name, fn
    monkeypatch.setattr(backends, "resolve", recording)
    return calls


@pytest.fixture(scope="module")
def screen():
    adata = simulate_screen(n_cells=40, n_genes=24, n_perturbations=5, n_combinations=2,
                            n_latent=3, seed=3)
    return load_screen(adata)


def _model(screen, model, guide):
    idx = np.arange(screen.n_cells)
    kw = {}
    if model == "svae_plus":
        kw = svae_plus_labels(screen.dosage[idx])
    lg = np.log1p(screen.counts.toarray())
    torch.manual_seed(0)
    return build_model(model, guide, n_genes=screen.n_genes,
                       n_perturbations=screen.n_perturbations, n_latent=3, n_hidden=8,
                       gene_log1p_mean=lg.mean(0), gene_log1p_std=lg.std(0) + 1e-3,
                       perturbation_counts=perturbation_cell_counts(screen.dosage, idx), **kw)


PAIRS = [(m, g) for m, gs in MODEL_GUIDES.items() for g in gs]


@pytest.mark.parametrize("model,guide", PAIRS)
def test_training_step_runs_on_triton_without_host_sync(screen, model, guide, triton_on_cpu,
                                                        monkeypatch):
    net = _model(screen, model, guide)
    batch = next(iter(MinibatchLoader(screen, np.arange(16), batch_size=16, shuffle=False)))
    gen = torch.Generator().manual_seed(1)
    net.loss(batch, particles=2, generator=gen)  # first call: one-time checks may read flags
    triton_on_cpu.clear()
    with no_host_sync(monkeypatch):
        out = net.loss(batch, particles=2, generator=gen)
        out["loss"].backward()
    assert torch.isfinite(out["loss"].detach()).all()
    used = {op for op, _ in triton_on_cpu}
    assert {"nb_log_prob", "log1p_standardize_linear"} <= used  # the head resolves nb_log_prob
    if model in ("sams_vae", "cpa_vae"):
        assert used & {"masked_embedding_sum", "perturbation_sum"}
    assert {(op, b) for op, b in triton_on_cpu if b != "triton"} == set()


@pytest.mark.parametrize("model,guide", [("sams_vae", "mean_field"),
                                         ("sams_vae", "corr_embedding"), ("svae_plus", "mean_field")])
def test_iwelbo_chunks_run_on_triton(screen, model, guide, triton_on_cpu):
    net = _model(screen, model, guide).eval()
    batch = next(iter(MinibatchLoader(screen, np.arange(8), batch_size=8, shuffle=False)))
    value = net.iwelbo(batch, particles=4, chunk=2)
    assert torch.isfinite(value).all()
    used = {op for op, _ in triton_on_cpu}
    assert "nb_log_prob" in used
    if model == "sams_vae":
        assert "perturbation_sum" in used
    assert {(op, b) for op, b in triton_on_cpu if b != "triton"} == set()


def test_perturbation_sum_triton_matches_reference():
    from samsvae.ops.embedding.reference import perturbation_sum_reference
    from samsvae.ops.embedding.triton import perturbation_sum_triton
    torch.manual_seed(0)
    dense = (torch.rand(7, 5) < 0.4).float() * torch.rand(7, 5)
    dosage = dense.to_sparse_csr()
    index = torch.unique(dosage.col_indices())
    values = torch.randn(3, index.numel(), 4, dtype=torch.float32, requires_grad=True)
    got = perturbation_sum_triton(dosage, index, values)
    ref = perturbation_sum_reference(dosage, index, values.double())
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6)
    w = torch.randn_like(got)
    g = torch.autograd.grad((got * w).sum(), values)[0]
    g_ref = torch.autograd.grad((ref * w.double()).sum(), values)[0]
    torch.testing.assert_close(g.double(), g_ref.double(), rtol=1e-6, atol=1e-6)
