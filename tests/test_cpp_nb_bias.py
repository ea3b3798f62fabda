"""The optional ``logit_bias`` of ``nb_log_prob``: a decoder's last bias added inside the kernel.

The float64 reference computes ``nb_log_prob(counts, logits + logit_bias, ...)``; the C++ kernel
must match it (value and every gradient, the bias gradient included) in float64, stay within
twice the float32 reference's error in float32, pass ``opcheck`` and run under
``torch.compile``.
"""
import pytest
import torch

from samsvae.ops import _cpp, nb_log_prob, nb_log_prob_reference

from conftest import CPU_ISAS as ISAS
from test_cpp_nb import make_inputs

pytestmark = pytest.mark.skipif(not _cpp.ext_available(), reason="C++ extension not built")

NAMES = ("loglik", "d_logits", "d_log_library", "d_log_theta", "d_logit_bias")


def _bias(genes, dtype=torch.float64, seed=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(genes, generator=g, dtype=torch.float64) * 2.0).to(dtype)


def _value_and_grads(backend, counts, logits, log_library, log_theta, bias, *, csr):
    leaves = [t.detach().clone().requires_grad_() for t in (logits, log_library, log_theta, bias)]
    c = counts.to_sparse_csr() if csr else counts
    out = nb_log_prob(c, *leaves[:3], logit_bias=leaves[3], backend=backend)
    w = torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64).reshape(out.shape)
    (out * w.to(out.dtype)).sum().backward()
    return [out.detach()] + [t.grad for t in leaves]


CASES = {
    "typical": dict(cells=24, genes=203),
    "particles": dict(cells=9, genes=77, particles=3),
    "genes_odd": dict(cells=7, genes=17, particles=2, zero_fraction=0.5),
    "counts_to_1e5": dict(cells=10, genes=50, max_count=100_000, zero_fraction=0.5),
}


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("csr", [True, False], ids=["csr", "dense"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_bias_float64_matches_reference(isa, csr, case):
    inputs = make_inputs(**CASES[case], seed=len(case))
    bias = _bias(inputs[0].shape[1])
    want = _value_and_grads("reference", *inputs, bias, csr=csr)
    got = _value_and_grads("cpp", *inputs, bias, csr=csr)
    for name, a, b in zip(NAMES, got, want):
        scale = b.abs().max().item()
        assert (a - b).abs().max().item() <= 1e-8 * scale + 1e-9, name


@pytest.mark.parametrize("csr", [True, False], ids=["csr", "dense"])
def test_bias_float32_error_at_most_twice_the_float32_reference(csr):
    inputs = [t.float() for t in make_inputs(cells=16, genes=301, particles=2, seed=3)]
    bias = _bias(301, torch.float32)
    judge = _value_and_grads("reference", *[t.double() for t in inputs], bias.double(), csr=csr)
    ref32 = _value_and_grads("reference", *inputs, bias, csr=csr)
    got32 = _value_and_grads("cpp", *inputs, bias, csr=csr)
    for name, k, r, j in zip(NAMES, got32, ref32, judge):
        err_k = (k.double() - j).abs().max().item()
        err_r = (r.double() - j).abs().max().item()
        assert err_k <= 2 * err_r + 1e-6 * j.abs().max().item(), (name, err_k, err_r)


def test_bias_equals_adding_it_to_the_logits():
    counts, logits, log_library, log_theta = make_inputs(cells=12, genes=40, particles=2)
    bias = _bias(40)
    with_bias = nb_log_prob(counts.to_sparse_csr(), logits, log_library, log_theta,
                            logit_bias=bias, backend="cpp")
    added = nb_log_prob(counts.to_sparse_csr(), logits + bias, log_library, log_theta,
                        backend="cpp")
    torch.testing.assert_close(with_bias, added, rtol=1e-12, atol=1e-9)


def test_bias_of_the_wrong_shape_names_the_fix():
    counts, logits, log_library, log_theta = make_inputs(cells=3, genes=5)
    with pytest.raises(ValueError, match=r"logit_bias must be \(5,\)"):
        nb_log_prob(counts, logits, log_library, log_theta, logit_bias=torch.zeros(4),
                    backend="cpp")


def _op_args():
    counts, logits, log_library, log_theta = make_inputs(4, 9, particles=2, zero_fraction=0.5)
    c = counts.to_sparse_csr()
    parts = (c.crow_indices().clone(), c.col_indices().clone(), c.values().clone())
    diff = tuple(t.requires_grad_() for t in (logits, log_library, log_theta))
    return counts, parts, diff, _bias(9).requires_grad_()


def test_opcheck_with_bias():
    dense, parts, diff, bias = _op_args()
    torch.library.opcheck(torch.ops.samsvae.nb_log_prob_fwd.default, (*parts, *diff, bias))
    torch.library.opcheck(torch.ops.samsvae.nb_log_prob_dense_fwd.default, (dense, *diff, bias))
    plain = tuple(t.detach() for t in diff)
    _, lse = torch.ops.samsvae.nb_log_prob_fwd(*parts, *plain, bias.detach())
    grad = torch.randn(lse.shape, dtype=torch.float64)
    torch.library.opcheck(torch.ops.samsvae.nb_log_prob_bwd.default,
                          (grad, *parts, *plain, lse, bias.detach()))
    torch.library.opcheck(torch.ops.samsvae.nb_log_prob_dense_bwd.default,
                          (grad, dense, *plain, lse, bias.detach()))


def test_gradcheck_with_bias():
    dense, _, diff, bias = _op_args()
    assert torch.autograd.gradcheck(
        lambda lg, lib, lt, b: nb_log_prob(dense.to_sparse_csr(), lg, lib, lt, logit_bias=b,
                                           backend="cpp"), (*diff, bias))


def test_torch_compile_with_bias_matches_eager():
    counts, logits, log_library, log_theta = (t.float() for t in make_inputs(6, 20, seed=2))
    bias = _bias(20, torch.float32)

    def f(lg, b):
        return nb_log_prob(counts, lg, log_library, log_theta, logit_bias=b, backend="cpp")

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(logits, bias), f(logits, bias))


def test_reference_backend_takes_the_bias_too():
    counts, logits, log_library, log_theta = make_inputs(cells=5, genes=11)
    bias = _bias(11)
    torch.testing.assert_close(
        nb_log_prob(counts, logits, log_library, log_theta, logit_bias=bias,
                    backend="reference"),
        nb_log_prob_reference(counts, logits + bias, log_library, log_theta))


@pytest.mark.parametrize("csr", [True, False], ids=["csr", "dense"])
def test_bias_gradient_adds_up_across_threads(csr):
    # each thread accumulates its rows' bias gradient in its own row; the rows must add up
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        inputs = make_inputs(3, 3000, particles=7, zero_fraction=0.8, seed=9)
        bias = _bias(3000)
        want = _value_and_grads("reference", *inputs, bias, csr=csr)
        got = _value_and_grads("cpp", *inputs, bias, csr=csr)
    finally:
        torch.set_num_threads(before)
    for name, a, b in zip(NAMES, got, want):
        assert (a - b).abs().max().item() <= 1e-8 * b.abs().max().item() + 1e-9, name
