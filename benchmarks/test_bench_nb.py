"""pytest-benchmark versions of bench_nb.py / bench_embedding.py / bench_nb_linear.py.

    OMP_NUM_THREADS=1 pytest benchmarks/ --benchmark-enable --benchmark-group-by=param:mode

Under the project's default ``--benchmark-disable`` each case runs once (a smoke run), so the
sizes stay small: B = 640 rows (5 particles x 128 cells), G = 2000, 90% zeros. The scripts
produce the published tables; this suite is for quick A/B comparisons while editing a kernel.
"""
import pytest
import torch

import references as R
from bench_embedding import make_impls as embedding_impls
from bench_embedding import make_inputs as embedding_inputs
from bench_nb import make_impls as nb_impls
from samsvae import ops
from samsvae.ops import nb_log_prob_linear

NB_IMPLS = ["eager", "scvi_formula", *R.optional_nb_baselines(), "compile_eager",
            "compile_sparse_coo", "reference_csr", "reference_dense"]
NB_IMPLS += [f"cpp_{lay}" for lay in ("csr", "dense") if "cpp" in ops.available_backends("nb_log_prob")]


@pytest.fixture(scope="module")
def nb_case():
    counts, logits, lib, lt = R.nb_inputs(5, 128, 2000, 0.9)
    return counts, logits, lib, lt, nb_impls(counts, "cpu", compile_=True)


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl", NB_IMPLS)
def test_nb(benchmark, nb_case, impl, mode):
    counts, logits, lib, lt, impls = nb_case
    fn = impls[impl]
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(logits, lib, lt)
    else:
        def run():
            lg, t = logits.detach().requires_grad_(), lt.detach().requires_grad_()
            return torch.autograd.grad(fn(lg, lib, t).sum(), (lg, t))
    run()  # torch.compile's first compilation stays out of the timings
    out = benchmark(run)
    assert out is not None


EMB_CFG = {"perturbations": 10_000, "latent": 100, "cells": 512, "max_per_cell": 2}
EMB_IMPLS = ["dense_all_t", "bag_all_t", "bag_batch_u", "index_add_batch_u",
             "compile_index_add_batch_u", *[b for b in ("reference", "cpp")
                                            if b in ops.available_backends("masked_embedding_sum")]]


@pytest.fixture(scope="module")
def emb_case():
    dosage, *params = embedding_inputs(EMB_CFG, "cpu")
    return params, embedding_impls(dosage, "cpu", compile_=True)


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl", EMB_IMPLS)
def test_embedding(benchmark, emb_case, impl, mode):
    params, impls = emb_case
    fn = impls[impl]

    def run():
        if mode == "fwd":
            with torch.no_grad():
                return fn(*params, 5)
        leaves = [p.detach().requires_grad_() for p in params]
        return torch.autograd.grad(fn(*leaves, 5).sum(), leaves)
    run()
    assert benchmark(run) is not None


@pytest.mark.parametrize("particles", [5, 20])
def test_nb_linear_fused_fwd_bwd(benchmark, particles):
    g = torch.Generator().manual_seed(0)
    counts = R.make_counts(128, 2000, 0.9).to_sparse_csr()
    hidden = torch.randn(particles, 128, 128, generator=g)
    weight = torch.randn(2000, 128, generator=g) / 128 ** 0.5
    bias, log_theta = torch.zeros(2000), torch.zeros(2000)
    log_lib = torch.full((128,), 7.0)

    def run():
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        out = nb_log_prob_linear(counts, h, w, bias, log_lib, log_theta)
        return torch.autograd.grad(out.sum(), (h, w))
    assert benchmark(run) is not None
