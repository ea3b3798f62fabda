"""The training head's kept logits buffer (``samsvae.ops.workspace``): reused only when free.

A reused buffer must never overwrite a tensor some autograd graph (or caller) still holds:
two heads in one graph, a graph kept with ``retain_graph`` and a new shape must all get a
fresh buffer, and the gradients must equal the reference's.
"""
import pytest
import torch

from samsvae.ops import cpp_extension, nb_log_prob_linear
from samsvae.ops.workspace import Workspace


def test_a_released_buffer_is_reused():
    ws = Workspace()
    a = ws.take((4, 6), torch.float32, "cpu")
    ptr = a.data_ptr()
    del a
    b = ws.take((4, 6), torch.float32, "cpu")
    assert b.data_ptr() == ptr


def test_a_held_buffer_is_not_handed_out_again():
    ws = Workspace()
    a = ws.take((4, 6), torch.float32, "cpu")
    a.fill_(3.0)
    b = ws.take((4, 6), torch.float32, "cpu")
    assert b.data_ptr() != a.data_ptr()
    b.fill_(5.0)
    assert torch.all(a == 3.0)
    view = b[1:]           # a view of the kept buffer also holds it
    del b
    c = ws.take((4, 6), torch.float32, "cpu")
    assert c.data_ptr() != view.data_ptr() - view.storage_offset() * view.element_size()


def test_another_shape_or_dtype_gets_a_fresh_buffer():
    ws = Workspace()
    a = ws.take((4, 6), torch.float32, "cpu")
    ptr = a.data_ptr()
    del a
    b = ws.take((4, 7), torch.float32, "cpu")
    assert b.shape == (4, 7) and b.data_ptr() != ptr
    del b
    c = ws.take((4, 7), torch.float64, "cpu")
    assert c.dtype == torch.float64 and c.shape == (4, 7)
    ws.release()
    assert ws.take((4, 7), torch.float64, "cpu").data_ptr() != c.data_ptr()


def _head_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    counts = torch.poisson(torch.rand(6, 11, generator=g, dtype=torch.float64) * 2, generator=g)
    hidden = torch.randn(3, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, generator=g, dtype=torch.float64, requires_grad=True)
    lib = torch.log(counts.sum(1) + 1)
    lt = torch.randn(11, generator=g, dtype=torch.float64, requires_grad=True)
    return counts.to_sparse_csr(), hidden, weight, bias, lib, lt


def _grads(backend, calls):
    """Gradients of the sum of ``calls`` heads on one graph (each with its own hidden)."""
    counts, hidden, weight, bias, lib, lt = _head_inputs(0)
    hs = [(hidden * (1 + 0.3 * i)) for i in range(calls)]
    total = sum(nb_log_prob_linear(counts, h, weight, bias, lib, lt, backend=backend,
                                   recompute=False).sum() for h in hs)
    total.backward()
    return [t.grad.clone() for t in (hidden, weight, bias, lt)]


@pytest.mark.skipif(not cpp_extension.ext_available(), reason="C++ extension not built")
def test_two_heads_in_one_graph_get_their_own_buffers():
    got = _grads("cpp", 2)
    want = _grads("reference", 2)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(not cpp_extension.ext_available(), reason="C++ extension not built")
def test_a_retained_graph_keeps_its_buffer_through_the_next_step():
    counts, hidden, weight, bias, lib, lt = _head_inputs(1)
    first = nb_log_prob_linear(counts, hidden, weight, bias, lib, lt, backend="cpp",
                               recompute=False).sum()
    first.backward(retain_graph=True)
    g1 = weight.grad.clone()
    # a second head of the same shape while the first graph (and its U) is still alive
    nb_log_prob_linear(counts, hidden * 2, weight, bias, lib, lt, backend="cpp",
                       recompute=False).sum().backward()
    weight.grad = None
    first.backward()  # the first graph's saved U must be intact
    torch.testing.assert_close(weight.grad, g1, rtol=0, atol=0)
