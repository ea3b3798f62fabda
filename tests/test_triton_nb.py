"""Triton NB log-likelihood kernel (samsvae/ops/_triton_nb_kernels.py) against the float64
reference, forward and all gradients.

Without CUDA the kernels run on CPU tensors through the Triton interpreter (conftest.py sets
TRITON_INTERPRET=1), so shapes stay tiny; the CUDA-only tests at the end check the registered
op, opcheck and torch.compile on a GPU.

Accuracy rule (flash-attention's): the float32 kernel's error against the float64 reference is
at most twice the error of the float32 reference, plus one float32 ulp of the result's size.
Errors are Euclidean norms over all outputs of a tensor, so that single float32 roundings
(which either implementation may win by chance) do not decide the comparison.
"""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from samsvae.ops import backends  # noqa: E402
from samsvae.ops import _triton_nb_kernels as K  # noqa: E402
from samsvae.ops.nb_log_prob import nb_log_prob, nb_log_prob_reference  # noqa: E402

EPS32 = torch.finfo(torch.float32).eps
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter runs CPU tensors
# the interpreter evaluates both branches of tl.where: inf/nan in the discarded lanes are fine
pytestmark = [pytest.mark.filterwarnings("ignore:divide by zero encountered"),
              pytest.mark.filterwarnings("ignore:invalid value encountered"),
              pytest.mark.filterwarnings("ignore:overflow encountered"),
              pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")]

# small tiles so that every path runs: G = 100 is 2 gene blocks (the second partial), 13 cells
# x 2 particles = 26 rows is 4 row tiles (the last partial), rows hold several CSR blocks
CFG = K.NBConfig(rows=8, block_g=64, block_nnz=32, num_warps=4)
P, C, G = 2, 13, 100


def _inputs(seed, heavy=False):
    """(counts (C, G), logits (P, C, G), log_library (C,), log_theta (G,)) float32.

    theta spans 1e-4 .. 1e6 over the genes (both forms of the count term); row 0 is all
    zeros (an empty CSR row); row 1 holds counts around the table size and up to 1e5; row 2
    non-integer counts. ``heavy`` makes every other row a library of ~2e5."""
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(P, C, G, generator=g)
    lt = torch.linspace(math.log(1e-4), math.log(1e6), G)[torch.randperm(G, generator=g)]
    size = torch.logspace(1, 4, C)
    if heavy:
        size[::2] = 2e5
    counts = torch.poisson(torch.softmax(logits[0], -1) * size[:, None], generator=g)
    counts[0] = 0
    counts[1, :8] = torch.tensor([1e5, 3e4, 700.0, 65.0, 64.0, 63.0, 2.0, 1.0])
    counts[2, :4] = torch.tensor([2.5, 0.5, 70.25, 7.0])
    log_library = torch.log(counts.sum(1) + 1.0)
    return [t.to(DEVICE) for t in (counts, logits, log_library, lt)]


def _evaluate(fn, counts, logits, log_library, log_theta, dtype):
    """Forward and the gradients of a random projection of it: (out, dlogits, dll, dlt)."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (logits, log_library, log_theta)]
    out = fn(counts, *leaves)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.device,
                                                                                   dtype)
    (out * weight).sum().backward()
    return [out.detach()] + [t.grad for t in leaves]


def _layout(counts, layout, dtype=torch.float32):
    counts = counts.to(dtype)
    return counts.to_sparse_csr() if layout == "csr" else counts


def _assert_float32_rule(kernel, ref32, ref64, names):
    for name, k, r32, r64 in zip(names, kernel, ref32, ref64):
        err_k = (k.double() - r64).norm().item()
        err_r = (r32.double() - r64).norm().item()
        slack = EPS32 * r64.norm().item()
        assert math.isfinite(err_k), f"{name}: non-finite values"
        assert err_k <= 2 * err_r + slack, (
            f"{name}: kernel error {err_k:.3e} > 2 x float32 reference error {err_r:.3e} "
            f"+ {slack:.3e}")


NAMES = ("loglik", "d logits", "d log_library", "d log_theta")


@pytest.mark.parametrize("layout,heavy", [("dense", False), ("csr", False), ("dense", True),
                                          ("csr", True)])
def test_matches_float64_reference(layout, heavy):
    counts, logits, ll, lt = _inputs(seed=1 + heavy, heavy=heavy)
    with K.override_config(CFG):
        kernel = _evaluate(K.nb_log_prob_triton, _layout(counts, layout), logits, ll, lt,
                           torch.float32)
    ref64 = _evaluate(nb_log_prob_reference, _layout(counts, layout, torch.float64), logits,
                      ll, lt, torch.float64)
    ref32 = _evaluate(nb_log_prob_reference, _layout(counts, layout), logits, ll, lt,
                      torch.float32)
    _assert_float32_rule(kernel, ref32, ref64, NAMES)
    # the all-zero row is finite and its likelihood is -sum theta log1p(mu/theta)
    assert torch.isfinite(kernel[0]).all() and (kernel[0][:, 0] < 0).all()


def test_every_count_branch_per_element():
    """One count per row against one theta per gene: table, table edge, large-count series
    (both theta forms, mu near and far from x) and non-integer counts, each row checked."""
    xs = torch.tensor([1.0, 2.0, 63.0, 64.0, 65.0, 700.0, 3e4, 1e5, 0.5, 2.5, 63.5, 1e5])
    thetas = torch.tensor([1e-4, 0.3, 1.0, 1.5, 9.99, 10.0, 10.01, 300.0, 1e4, 1e6])
    n_rows, n_genes = xs.numel(), thetas.numel()
    counts = torch.zeros(n_rows, n_genes)
    counts[:] = xs[:, None]
    # mu equal to x for most rows (the likelihood's mode), 1000x off for the last one
    logits = torch.zeros(1, n_rows, n_genes)
    ll = torch.log(xs * n_genes)
    ll[-1] -= math.log(1000.0)
    lt = thetas.log()
    counts, logits, ll, lt = [t.to(DEVICE) for t in (counts, logits, ll, lt)]
    with K.override_config(K.NBConfig(rows=4, block_g=8, block_nnz=8, num_warps=4)):
        kernel = _evaluate(K.nb_log_prob_triton, counts, logits, ll, lt, torch.float32)
    ref64 = _evaluate(nb_log_prob_reference, counts.double(), logits, ll, lt, torch.float64)
    ref32 = _evaluate(nb_log_prob_reference, counts, logits, ll, lt, torch.float32)
    _assert_float32_rule(kernel, ref32, ref64, NAMES)
    # per row: within 2x the float32 reference's own error plus a few ulps of the row's size
    err_k = (kernel[0].double() - ref64[0]).abs()[0].cpu()
    err_r = (ref32[0].double() - ref64[0]).abs()[0].cpu()
    scale = (ref64[0].abs().cpu() + xs.double() * torch.log(xs.double() + 1))[0]
    bad = err_k > 2 * err_r + 4 * EPS32 * scale
    assert not bad.any(), (f"rows x={xs[bad].tolist()}: kernel errors {err_k[bad].tolist()}, "
                           f"float32 reference {err_r[bad].tolist()}")


def test_particles_share_counts():
    """(P, C, G) logits against (C, G) counts equal P separate single-particle calls."""
    counts, logits, ll, lt = _inputs(seed=3)
    weight = torch.randn(P, C, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    leaves = [t.clone().requires_grad_() for t in (logits, ll, lt)]
    singles = [[t.clone().requires_grad_() for t in (logits[p:p + 1], ll, lt)] for p in range(P)]
    with K.override_config(CFG):
        joint = K.nb_log_prob_triton(counts, *leaves)
        (joint * weight).sum().backward()
        outs = []
        for p, single in enumerate(singles):
            outs.append(K.nb_log_prob_triton(counts, *single))
            (outs[-1] * weight[p:p + 1]).sum().backward()
    # rows are computed independently: identical values and logit gradients
    assert torch.equal(joint.detach(), torch.cat(outs).detach())
    assert torch.equal(leaves[0].grad, torch.cat([s[0].grad for s in singles]))
    # d log_library and d log_theta sum over particles (float32 sums in another order)
    for i in (1, 2):
        total = sum(s[i].grad for s in singles)
        assert torch.allclose(leaves[i].grad, total, rtol=1e-5,
                              atol=1e-6 * total.abs().max().item())


def test_log_theta_without_grad_and_empty_batch():
    counts, logits, ll, lt = _inputs(seed=4)
    grads = []
    for theta_grad in (False, True):  # the backward skips d log_theta when not needed
        lg = logits.clone().requires_grad_()
        t = lt.clone().requires_grad_(theta_grad)
        with K.override_config(CFG):
            K.nb_log_prob_triton(counts, lg, ll, t).sum().backward()
        grads.append(lg.grad)
        assert (t.grad is not None) == theta_grad
    assert torch.equal(grads[0], grads[1])

    def zeros(*shape):
        return torch.zeros(*shape, device=DEVICE)

    empty = K.nb_log_prob_triton(zeros(0, G), zeros(3, 0, G), zeros(0), lt)
    assert empty.shape == (3, 0)
    no_genes = zeros(2, 0)
    assert torch.equal(K.nb_log_prob_triton(no_genes, no_genes, zeros(2), zeros(0)),
                       nb_log_prob_reference(no_genes, no_genes, zeros(2), zeros(0)))


def test_float64_goes_to_the_reference():
    counts, logits, ll, lt = _inputs(seed=5)
    args = (counts.double(), logits.double(), ll.double(), lt.double())
    assert torch.equal(K.nb_log_prob_triton(*args), nb_log_prob_reference(*args))


def test_tables_are_exact_sums():
    theta = torch.logspace(-4, 6, 50)
    tab, dtab = [t.cpu() for t in K.nb_tables(theta.to(DEVICE))]
    x = torch.arange(K.X_TAB, dtype=torch.float64)[:, None]
    t = theta.double()[None]
    j = torch.arange(K.X_TAB - 1, dtype=torch.float64)[:, None]
    # exact finite sums in float64 (no lgamma/digamma cancellation in the check either)
    e = torch.cat([torch.zeros(1, t.shape[1], dtype=torch.float64),
                   torch.cumsum(torch.log1p(j / t) - torch.log(j + 1), 0)])
    f = e + x * torch.log(t)
    de = torch.cat([torch.zeros(1, t.shape[1], dtype=torch.float64),
                    torch.cumsum(-j / (t + j), 0)])
    df = de + x
    big = t >= 10
    assert torch.allclose(tab[:-1].double(), torch.where(big, e, f), rtol=4 * EPS32, atol=1e-5)
    assert torch.allclose(dtab[:-1].double(), torch.where(big, de, df), rtol=4 * EPS32,
                          atol=1e-6)
    assert torch.allclose(tab[-1].double(), torch.lgamma(theta.double()), rtol=EPS32)
    assert torch.allclose(dtab[-1].double(), torch.digamma(theta.double()), rtol=EPS32)


def test_rejects_inputs_on_different_devices():
    counts, logits, ll, lt = _inputs(seed=6)
    with pytest.raises(ValueError, match="one device"):
        K.nb_log_prob_triton(counts.to("meta"), logits, ll, lt)


def test_import_samsvae_does_not_import_triton():
    code = ("import sys, samsvae; from samsvae.ops import backends; "
            "print('triton' in sys.modules, "
            "'triton' in backends._REGISTRY['nb_log_prob'], "
            "'triton' in backends._REGISTRY['masked_embedding_sum'])")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=str(Path(__file__).resolve().parents[1]), check=True).stdout.split()
    imported, nb_registered, emb_registered = out
    assert nb_registered == "True" and emb_registered == "True"
    if not torch.cuda.is_available():
        assert imported == "False"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_explicit_triton_backend_without_cuda_is_a_clear_error():
    with pytest.raises(backends.BackendUnavailableError, match="CUDA is not available"):
        backends.resolve("nb_log_prob", "triton", "cpu")
    assert backends.resolve("nb_log_prob", "auto", "cpu")[0] != "triton"


# ----------------------------------------------------------------------------- CUDA only

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("layout", ["dense", "csr"])
def test_cuda_registered_backend_matches_reference(layout):
    counts, logits, ll, lt = [t.cuda() for t in _inputs(seed=8, heavy=True)]

    def triton_fn(c, lg, l, t):
        return nb_log_prob(c, lg, l, t, backend="triton")

    kernel = _evaluate(triton_fn, _layout(counts, layout), logits, ll, lt, torch.float32)
    ref64 = _evaluate(nb_log_prob_reference, _layout(counts, layout, torch.float64), logits,
                      ll, lt, torch.float64)
    ref32 = _evaluate(nb_log_prob_reference, _layout(counts, layout), logits, ll, lt,
                      torch.float32)
    _assert_float32_rule(kernel, ref32, ref64, NAMES)


@cuda
def test_cuda_opcheck_and_compile():
    counts, logits, ll, lt = [t.cuda() for t in _inputs(seed=9)]
    lg = logits.clone().requires_grad_()
    t = lt.clone().requires_grad_()
    torch.library.opcheck(K._nb_fwd_op, (lg, ll, t, counts, None, None, None))
    csr = counts.to_sparse_csr()
    torch.library.opcheck(K._nb_fwd_op, (lg, ll, t, None, csr.crow_indices(),
                                         csr.col_indices(), csr.values()))

    def loss(lg_, t_):
        return K.nb_log_prob_triton(counts, lg_, ll, t_).sum()

    eager = loss(lg, t)
    g_eager = torch.autograd.grad(eager, (lg, t))
    compiled = torch.compile(loss, fullgraph=True)(lg, t)
    g_comp = torch.autograd.grad(compiled, (lg, t))
    assert torch.allclose(compiled, eager, rtol=1e-6)
    for a, b in zip(g_comp, g_eager):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@cuda
def test_cuda_bfloat16_logits():
    counts, logits, ll, lt = [t.cuda() for t in _inputs(seed=10)]
    lg = logits.bfloat16().requires_grad_()
    out = K.nb_log_prob_triton(counts, lg, ll, lt)
    out.sum().backward()
    ref = nb_log_prob_reference(counts.double(), lg.detach().double(), ll.double(), lt.double())
    assert out.dtype == torch.bfloat16 and lg.grad.dtype == torch.bfloat16
    assert torch.allclose(out.double(), ref, rtol=1e-2)


def test_logit_bias_is_added_before_the_kernel():
    from samsvae.ops._triton_nb import nb_log_prob_triton as wrapper
    g = torch.Generator().manual_seed(11)
    counts = torch.poisson(torch.rand(4, 16, generator=g) * 3)
    logits = torch.randn(4, 16, generator=g)
    ll, lt = torch.full((4,), 4.0), torch.randn(16, generator=g)
    bias = torch.randn(16, generator=g, requires_grad=True)
    out = wrapper(counts, logits, ll, lt, bias)
    want = nb_log_prob_reference(counts.double(), (logits + bias).double(), ll.double(),
                                 lt.double())
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-3)
    out.sum().backward()
    assert bias.grad is not None and torch.isfinite(bias.grad).all()
