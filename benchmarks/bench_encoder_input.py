"""The encoder's first layer on a CSR count batch, forward + backward, by density.

    OMP_NUM_THREADS=1 python benchmarks/bench_encoder_input.py --threads 1 [--out enc.json]

``log1p_standardize_linear(counts, W, b, mean, inv_std)`` = standardised log1p features @ W.T
+ b, with the gradients of W and b (what a training step needs; the counts are data).
Implementations, timed round-robin in one process (``--block`` consecutive calls each, the
first untimed) on simulated NB batches whose mean count sets the fraction of stored entries:

* ``reference``: dense features (PyTorch) and ``F.linear`` (the spec; the baseline of the
  ratios);
* ``cpp_dense``: the C++ features and one dense product (the ``cpp`` backend above
  ``SPARSE_BELOW`` stored entries);
* ``cpp_sparse``: the C++ sparse kernel (the ``cpp`` backend at or below ``SPARSE_BELOW``);
* ``torch_sparse``: ``torch.sparse.mm`` on the CSR log1p values with the weight rescaled by
  1/std and the mean folded into the bias (what the encoder ran below 15 % stored entries
  before the kernel existed).
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
from samsvae.data import synth_batch  # noqa: E402
from samsvae.ops import log1p_standardize_linear  # noqa: E402


def _torch_sparse(counts, w, b, mean, inv_std):
    logs = torch.sparse_csr_tensor(counts.crow_indices(), counts.col_indices(),
                                   torch.log1p(counts.values()), size=counts.shape,
                                   check_invariants=False)
    ws = w * inv_std                                        # (H, G)
    return torch.sparse.mm(logs, ws.T) + (b - ws @ mean)


def _calls(cells: int, genes: int, hidden: int, mean_count: float):
    batch = synth_batch(cells, genes, 10, seed=0, mean_count=mean_count)
    counts = batch.counts
    lg = torch.log1p(counts.to_dense())
    mean, inv_std = lg.mean(0), 1.0 / lg.std(0).clamp_min(1e-3)
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(hidden, genes, generator=g) * 0.01).requires_grad_()
    b = torch.zeros(hidden, requires_grad=True)
    go = torch.randn(cells, hidden, generator=g)

    def step(fn):
        def run():
            w.grad = b.grad = None
            fn().backward(go)
        return run

    from samsvae.ops.encoder import cpp as _cpp_encoder  # needs the built extension

    def cpp(sparse: bool):
        def fn():
            old = _cpp_encoder.SPARSE_BELOW
            _cpp_encoder.SPARSE_BELOW = 1.0 if sparse else -1.0
            try:
                return log1p_standardize_linear(counts, w, b, mean, inv_std, backend="cpp")
            finally:
                _cpp_encoder.SPARSE_BELOW = old
        return fn

    density = counts.values().numel() / counts.numel()
    return density, {
        "reference": step(lambda: log1p_standardize_linear(counts, w, b, mean, inv_std,
                                                           backend="reference")),
        "cpp_dense": step(cpp(False)),
        "cpp_sparse": step(cpp(True)),
        "torch_sparse": step(lambda: _torch_sparse(counts, w, b, mean, inv_std)),
    }


def csv_rows(rows, cells: int, genes: int, hidden: int) -> list:
    """The results.csv rows (op ``log1p_standardize_linear``, forward + backward)."""
    out = []
    for r in rows:
        shape = H.shape_str(C=cells, G=genes, H=hidden, density=round(r["density"], 3))
        out += [H.result("log1p_standardize_linear", r["impl"], shape, "fwdbwd_ms", r["ms"]),
                H.result("log1p_standardize_linear", r["impl"], shape,
                         "fwdbwd_speedup_vs_reference", r["vs_reference"])]
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=512)
    p.add_argument("--genes", type=int, default=8000)
    p.add_argument("--hidden", type=int, default=400)
    p.add_argument("--mean-counts", type=float, nargs="+", default=[0.04, 0.12, 0.25, 0.5],
                   help="mean UMIs per gene and cell of the simulated batches (sets density)")
    H.add_round_robin_args(p)
    args = p.parse_args(argv)
    H.require_cpp_extension()
    from samsvae.ops.encoder import cpp as _cpp_encoder
    threads = H.set_threads(args.threads)
    rows = []
    for mean_count in args.mean_counts:
        density, calls = _calls(args.cells, args.genes, args.hidden, mean_count)
        res = H.time_interleaved(calls, repeats=args.repeats, warmup=args.warmup,
                                 block=args.block)
        base = res["reference"]["median_s"]
        for name, r in res.items():
            rows.append({"density": density, "impl": name, "ms": 1e3 * r["median_s"],
                         "min_ms": 1e3 * r["min_s"], "vs_reference": base / r["median_s"]})
    text = H.markdown_table(rows, [
        ("stored entries", lambda r: f"{r['density']:.3f}"), ("implementation", "impl"),
        ("median ms", lambda r: f"{r['ms']:.2f}"), ("min ms", lambda r: f"{r['min_ms']:.2f}"),
        ("speed-up vs reference", lambda r: f"{r['vs_reference']:.2f}x")])
    head = (f"encoder input layer fwd + bwd, C={args.cells} G={args.genes} H={args.hidden}, "
            f"threads {threads['torch_threads']} (OMP_NUM_THREADS={threads['OMP_NUM_THREADS']}), "
            f"median of {args.repeats} in blocks of {args.block}; the cpp backend switches "
            f"to the sparse kernel at <= {_cpp_encoder.SPARSE_BELOW} stored entries")
    meta = {"command": " ".join([Path(sys.executable).name] + sys.argv),
            **H.device_info("cpu"), **threads, "args": vars(args)}
    return H.publish(rows, meta, head + "\n\n" + text, args,
                     csv_rows(rows, args.cells, args.genes, args.hidden),
                     threads=threads["torch_threads"])


if __name__ == "__main__":
    main()
