"""The decoder head of a training step on the CPU: gradient in the forward pass vs the forward
and backward kernels, and vs the reference.

    OMP_NUM_THREADS=1 python benchmarks/bench_nb_train_head.py --threads 1 [--out head.json]

Per shape, one "training head" call = logits from hidden (one product), the NB log-likelihood,
and the gradients of hidden, weight, bias and log_theta for an upstream gradient that weighs
every row alike (as the ELBO does). Implementations, timed round-robin in one process
(``--block`` consecutive calls each, the first untimed):

* ``fwd_grad``: ``nb_log_prob_linear(..., recompute=False)`` on the cpp backend (one kernel pass
  computes the value and the unit-weight gradient; backward combines it);
* ``fwd_then_bwd``: the logits stored, the cpp forward kernel, then its backward kernel (the
  session-2 training path);
* ``reference``: the same on the reference (pure PyTorch) NB.

Also the kernels alone (``kernel_*`` rows: no products, no autograd), so the table shows what
the head's products cost around them. Ratios are against ``fwd_then_bwd`` of the same run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _harness as H  # noqa: E402
import references as R  # noqa: E402
from samsvae.ops import nb_log_prob, nb_log_prob_linear  # noqa: E402


def _calls(particles: int, cells: int, genes: int, hidden: int, zero_fraction: float):
    counts, _, lib, lt = R.nb_inputs(particles, cells, genes, zero_fraction)
    csr = counts.to_sparse_csr()
    g = torch.Generator().manual_seed(3)
    h = (torch.randn(particles, cells, hidden, generator=g) * 0.5).requires_grad_()
    w = (torch.randn(genes, hidden, generator=g) * 0.05).requires_grad_()
    b = torch.zeros(genes, requires_grad=True)
    lt = lt.clone().requires_grad_()
    scale = -1.0 / (particles * cells)

    def step(fn):
        def run():
            for t in (h, w, b, lt):
                t.grad = None
            (fn().sum() * scale).backward()
        return run

    calls = {
        "fwd_grad": step(lambda: nb_log_prob_linear(csr, h, w, b, lib, lt, backend="cpp",
                                                    recompute=False)),
        "fwd_then_bwd": step(lambda: nb_log_prob(csr, F.linear(h, w), lib, lt, logit_bias=b,
                                                 backend="cpp")),
        "reference": step(lambda: nb_log_prob(csr, F.linear(h, w), lib, lt, logit_bias=b,
                                              backend="reference")),
    }
    c32 = csr
    parts = (c32.crow_indices(), c32.col_indices(), c32.values())
    logits = F.linear(h, w).detach()
    buf = logits.clone()
    ltd, bd = lt.detach(), b.detach()
    out, lse = torch.ops.samsvae.nb_log_prob_fwd(*parts, logits, lib, ltd, bd)
    ones = torch.full_like(out, scale)

    def kernel_fwd_bwd():
        _, s = torch.ops.samsvae.nb_log_prob_fwd(*parts, logits, lib, ltd, bd)
        torch.ops.samsvae.nb_log_prob_bwd(ones, *parts, logits, lib, ltd, s, bd)

    def kernel_fwd_grad():
        buf.copy_(logits)  # the kernel overwrites its input; the copy is timed separately
        torch.ops.samsvae.nb_log_prob_fwd_grad(*parts, buf, lib, ltd, bd)

    calls.update(kernel_fwd_bwd=kernel_fwd_bwd, kernel_fwd_grad=kernel_fwd_grad,
                 kernel_copy_only=lambda: buf.copy_(logits))
    return calls


def csv_rows(rows, particles: int, cells: int, hidden: int, zero_fraction: float) -> list:
    """The results.csv rows (op ``nb_train_head``: the training step's decoder head; kernel_*
    rows are against kernel_fwd_bwd, the others against fwd_then_bwd)."""
    out = []
    for r in rows:
        shape = H.shape_str(P=particles, C=cells, G=r["genes"], H=hidden, zeros=zero_fraction)
        out += [H.result("nb_train_head", r["impl"], shape, "fwdbwd_ms", r["ms"]),
                H.result("nb_train_head", r["impl"], shape, "fwdbwd_speedup_vs_fwd_then_bwd"
                         if not r["impl"].startswith("kernel") else
                         "fwdbwd_speedup_vs_kernel_fwd_bwd", r["vs_fwd_then_bwd"])]
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--particles", type=int, default=5)
    p.add_argument("--cells", type=int, default=512)
    p.add_argument("--genes", type=int, nargs="+", default=[2000, 8000])
    p.add_argument("--hidden", type=int, default=400)
    p.add_argument("--zero-fraction", type=float, default=0.9)
    H.add_round_robin_args(p)
    args = p.parse_args(argv)
    H.require_cpp_extension()
    threads = H.set_threads(args.threads)
    rows = []
    for genes in args.genes:
        calls = _calls(args.particles, args.cells, genes, args.hidden, args.zero_fraction)
        res = H.time_interleaved(calls, repeats=args.repeats, warmup=args.warmup,
                                 block=args.block)
        base = res["fwd_then_bwd"]["median_s"]
        kbase = res["kernel_fwd_bwd"]["median_s"]
        for name, r in res.items():
            ref = kbase if name.startswith("kernel") else base
            rows.append({"genes": genes, "impl": name, "ms": 1e3 * r["median_s"],
                         "min_ms": 1e3 * r["min_s"], "vs_fwd_then_bwd": ref / r["median_s"]})
    text = H.markdown_table(rows, [
        ("G", "genes"), ("implementation", "impl"),
        ("median ms", lambda r: f"{r['ms']:.2f}"), ("min ms", lambda r: f"{r['min_ms']:.2f}"),
        ("speed-up vs fwd_then_bwd", lambda r: f"{r['vs_fwd_then_bwd']:.2f}x")])
    head = (f"training head, P={args.particles} C={args.cells} H={args.hidden}, zeros "
            f"{args.zero_fraction}, threads {threads['torch_threads']} "
            f"(OMP_NUM_THREADS={threads['OMP_NUM_THREADS']}), median of {args.repeats} in "
            f"blocks of {args.block}; kernel_* rows are against kernel_fwd_bwd, and "
            "kernel_fwd_grad includes a copy of the logits (timed alone as kernel_copy_only)")
    meta = {"command": " ".join([Path(sys.executable).name] + sys.argv),
            **H.device_info("cpu"), **threads, "args": vars(args)}
    return H.publish(rows, meta, head + "\n\n" + text, args,
                     csv_rows(rows, args.particles, args.cells, args.hidden, args.zero_fraction),
                     threads=threads["torch_threads"])


if __name__ == "__main__":
    main()
