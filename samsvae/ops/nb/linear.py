"""The recomputing form of :func:`samsvae.ops.nb_log_prob_linear`: the decoder's last linear
layer fused with the NB log-likelihood, without storing the logits.

    nb_log_prob_linear_chunked(counts, hidden, weight, bias, log_library, log_theta, nb_fn)
        == nb_fn(counts, hidden @ weight.T + bias, log_library, log_theta)

``nb_fn`` is the resolved ``nb_log_prob`` implementation of any tier (this module is
backend-agnostic).

With P importance particles, C cells and G genes the unfused form keeps the (P, C, G) logits and
several same-sized intermediates alive for backward (at P=100, C=512, G=8000 that is 1.6 GB per
float32 tensor). Here the rows are processed in chunks: forward computes one chunk's logits,
evaluates the NB op on them under no_grad and keeps only the per-row results; backward
recomputes each chunk's logits, runs the NB op's own backward with the upstream per-row gradient
and accumulates the gradients of hidden, weight, bias, log_library and log_theta. Peak memory is
that of one chunk, whatever P.

Unlike a fused linear cross-entropy (Liger-Kernel), the gradients cannot be finished in the
forward pass: the weight gradient is ``sum_r g_r * outer(dlogits_r, hidden_r)`` and the per-row
upstream gradient ``g_r`` is only known after all particles are evaluated (e.g. IWELBO weights),
hence the recompute. Cost: one extra logits matmul and NB forward per backward.
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch

from .reference import check_nb_inputs

DEFAULT_CHUNK_BYTES = 32 * 2**20  # one chunk's logits on a CPU (cache-sized); NB
# intermediates add a few times this
GPU_CHUNK_BYTES = 512 * 2**20  # on a GPU: enough rows per launch to fill every SM


def default_chunk_rows(n_genes: int, dtype: torch.dtype, device=None) -> int:
    """Rows per chunk so that a chunk's ``(rows, n_genes)`` logits take ~32 MiB on a CPU
    (``DEFAULT_CHUNK_BYTES``) or ~512 MiB on a GPU (``GPU_CHUNK_BYTES``)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    on_gpu = device is not None and torch.device(device).type == "cuda"
    budget = GPU_CHUNK_BYTES if on_gpu else DEFAULT_CHUNK_BYTES
    return max(1, budget // max(1, n_genes * itemsize))


def _chunks(particles: int, cells: int, chunk_rows: int) -> Iterator[Tuple[int, int, int, int]]:
    """Yield ``(p0, p1, c0, c1)`` blocks of at most ``chunk_rows`` logit rows.

    A block is several whole particles over all cells when ``chunk_rows >= cells`` (the counts
    are then used whole), otherwise a slice of cells of one particle.
    """
    if chunk_rows >= cells:
        step = max(1, chunk_rows // max(1, cells))
        for p0 in range(0, particles, step):
            yield p0, min(particles, p0 + step), 0, cells
    else:
        for p in range(particles):
            for c0 in range(0, cells, chunk_rows):
                yield p, p + 1, c0, min(cells, c0 + chunk_rows)


def _row_slice(counts: torch.Tensor, c0: int, c1: int) -> torch.Tensor:
    """Rows ``c0:c1`` of dense or CSR counts, as views (no copy of the values)."""
    if c0 == 0 and c1 == counts.shape[0]:
        return counts
    if counts.layout != torch.sparse_csr:
        return counts[c0:c1]
    crow = counts.crow_indices()
    # two host reads per chunk of cells; only when a chunk holds fewer rows than the batch has
    # cells (never in a training step, whose logits are stored)
    start, end = int(crow[c0]), int(crow[c1])
    return torch.sparse_csr_tensor(crow[c0:c1 + 1] - start, counts.col_indices()[start:end],
                                   counts.values()[start:end], size=(c1 - c0, counts.shape[1]),
                                   check_invariants=False)


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """(k, n, H) hidden -> (k, n, G) logits."""
    h2 = h.reshape(-1, h.shape[-1])
    out = h2 @ weight.T if bias is None else torch.addmm(bias, h2, weight.T)
    return out.view(h.shape[0], h.shape[1], weight.shape[0])


class _NBLinearFunction(torch.autograd.Function):
    """Chunked fused linear + NB; see the module docstring. ``hidden`` is (P, C, H) here."""

    @staticmethod
    def forward(ctx, counts, hidden, weight, bias, log_library, log_theta, nb_fn, chunk_rows):
        P, C, _ = hidden.shape
        out = hidden.new_empty(P, C)
        for p0, p1, c0, c1 in _chunks(P, C, chunk_rows):
            logits = _chunk_logits(hidden[p0:p1, c0:c1], weight, bias)
            out[p0:p1, c0:c1] = nb_fn(_row_slice(counts, c0, c1), logits,
                                      log_library[c0:c1], log_theta)
        ctx.save_for_backward(counts, hidden, weight, bias, log_library, log_theta)
        ctx.nb_fn, ctx.chunk_rows = nb_fn, chunk_rows
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        counts, hidden, weight, bias, log_library, log_theta = ctx.saved_tensors
        _, need_h, need_w, need_b, need_lib, need_theta = ctx.needs_input_grad[:6]
        need_logits = need_h or need_w or need_b
        P, C, H = hidden.shape
        G = weight.shape[0]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b else None
        grad_lib = torch.zeros_like(log_library) if need_lib else None
        grad_theta = torch.zeros_like(log_theta) if need_theta else None

        for p0, p1, c0, c1 in _chunks(P, C, ctx.chunk_rows):
            h = hidden[p0:p1, c0:c1]
            logits = _chunk_logits(h, weight, bias).detach().requires_grad_(need_logits)
            lib = log_library[c0:c1].detach().requires_grad_(need_lib)
            lt = log_theta.detach().requires_grad_(need_theta)
            wrt = [t for t in (logits, lib, lt) if t.requires_grad]
            with torch.enable_grad():
                value = ctx.nb_fn(_row_slice(counts, c0, c1), logits, lib, lt)
                grads = iter(torch.autograd.grad(value, wrt, grad_out[p0:p1, c0:c1],
                                                 allow_unused=True))
            d_logits = next(grads) if need_logits else None
            d_lib = next(grads) if need_lib else None
            d_theta = next(grads) if need_theta else None
            if d_logits is not None:
                d2 = d_logits.reshape(-1, G)
                if need_h:
                    grad_h[p0:p1, c0:c1] = (d2 @ weight).view(p1 - p0, c1 - c0, H)
                if need_w:
                    grad_w.addmm_(d2.T, h.reshape(-1, H))
                if need_b:
                    grad_b += d2.sum(0)
            if d_lib is not None:
                grad_lib[c0:c1] += d_lib
            if d_theta is not None:
                grad_theta += d_theta
        return None, grad_h, grad_w, grad_b, grad_lib, grad_theta, None, None


def check_linear_inputs(counts, hidden, weight, bias, log_library, log_theta, chunk_rows) -> None:
    """Raise ValueError / TypeError naming the argument of ``nb_log_prob_linear`` that is wrong."""
    if counts.dim() != 2:
        raise ValueError(f"counts must be (cells, genes), got shape {tuple(counts.shape)}")
    cells, genes = counts.shape
    if hidden.dim() not in (2, 3) or hidden.shape[-2] != cells:
        raise ValueError(f"hidden must be (cells, H) or (particles, cells, H) with cells={cells} "
                         f"(the rows of counts); got {tuple(hidden.shape)}")
    if not hidden.is_floating_point():
        raise TypeError(f"hidden must be floating point, got {hidden.dtype}")
    n_hidden = hidden.shape[-1]
    if weight.dim() != 2 or tuple(weight.shape) != (genes, n_hidden):
        raise ValueError(f"weight must be (genes, H) = ({genes}, {n_hidden}) like nn.Linear(H, G)"
                         f".weight; got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (genes,):
        raise ValueError(f"bias must be ({genes},) or None, got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != hidden.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but hidden has {hidden.dtype}; "
                            f"cast them to one dtype (e.g. hidden.to({name}.dtype))")
    for name, t in (("counts", counts), ("weight", weight), ("bias", bias),
                    ("log_library", log_library), ("log_theta", log_theta)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}; "
                             "move all inputs to one device")
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int)
                                   or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive int or None (automatic), got {chunk_rows!r}")
    # the NB inputs proper, with logits shape standing in for what hidden @ weight.T would give
    check_nb_inputs(counts, torch.empty(hidden.shape[:-1] + (genes,), device="meta",
                                         dtype=hidden.dtype),
                     log_library, log_theta)


def nb_log_prob_linear_chunked(counts, hidden, weight, bias, log_library, log_theta, nb_fn,
                               chunk_rows: Optional[int] = None):
    """``nb_fn(counts, F.linear(hidden, weight, bias), log_library, log_theta)`` evaluated
    ``chunk_rows`` logit rows at a time (default :func:`default_chunk_rows`: ~32 MiB of logits),
    logits recomputed in backward. hidden ``(C, H)`` or ``(P, C, H)`` -> ``hidden.shape[:-1]``
    nats; first-order gradients in hidden, weight, bias, log_library and log_theta."""
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(weight.shape[0], hidden.dtype, hidden.device)
    h3 = hidden.unsqueeze(0) if hidden.dim() == 2 else hidden
    out = _NBLinearFunction.apply(counts, h3, weight, bias, log_library, log_theta,
                                  nb_fn, chunk_rows)
    return out.squeeze(0) if hidden.dim() == 2 else out
