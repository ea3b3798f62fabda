"""``samsvae bench``: time a model's training step and IWELBO per backend, against the floor of
its own dense matrix products.

    OMP_NUM_THREADS=1 samsvae bench --genes 8000 --perturbations 10000 --guide corr_both \\
        --backends reference,auto --json bench.json

What is timed, per backend (``--backends``; each backend gets its own model built from the same
seed, so the weights are identical), interleaved round by round so that machine load hits all
measurements alike (the median over ``--steps`` rounds is reported, after ``--warmup`` rounds):

* ``step``: one training step, ``loss`` (forward) + ``backward`` + ``Adam.step``;
* ``head``: the decoder's last layer fused with the NB likelihood (``nb_log_prob_linear``),
  forward + backward, on the step's (particles, cells, hidden) shape;
* ``nb``: the NB likelihood alone (``nb_log_prob`` on precomputed (P, B, G) logits), fwd + bwd;
* ``composition``: ``masked_embedding_sum`` (sampling + sparse composition), fwd + bwd;
* ``encoder``: the cell encoder (gene part + head), fwd + bwd;
* ``optimizer``: ``Adam.step`` over all parameters;

and once, shared by all backends, ``matmul_floor``: the dense matrix products of the encoder's and
decoder's Linear layers, and of the correlated-embedding guide's MLP on the batch's perturbations,
alone (forward, input gradient where the step needs it, weight gradient),
as plain ``torch.mm`` calls on the same shapes. ``step / matmul_floor`` says how much the step
spends outside its unavoidable matrix products; ``reference step / backend step`` the speed-up.

IWELBO (``--iwelbo-particles K`` on ``--iwelbo-cells`` cells, chunk ``--iwelbo-chunk``) runs in a
fresh subprocess per (backend, K): time per cell, and memory as the child's peak RSS during the
call (the kernel's ``VmHWM`` mark, reset just before the call through ``/proc/self/clear_refs``;
``resource.getrusage`` ``ru_maxrss`` where that reset is refused) minus its RSS just before the
call (``VmRSS``), i.e. what the evaluation itself adds. ``--iwelbo-memory-particles``
repeats the measurement at other K (e.g. 1000) for the auto backend to show memory is flat in K.

``--adam`` picks ``torch.optim.Adam(fused=True)`` (the default, as the Trainer uses) or torch's
default (foreach) implementation; ``--keep-freed-memory`` calls :func:`keep_freed_memory`
first; ``--profile`` adds a torch.profiler breakdown of the last backend's step (matrix products
by layer, NB kernel, composition kernel, optimizer, the rest).

The batches are synthesised (the cost of a step does not depend on the number of cells of the
screen): NB counts around gene-specific proportions and log-normal library sizes, one random
perturbation per non-control cell drawn from all T.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List

import numpy as np

from .. import ops
from ..data.simulate import synth_batch
from ..models import MODEL_GUIDES, build_model
from ..ops.backends import set_tf32
from ..ops.encoder import cpp as encoder_cpp

JSON_KEYS = ("config", "machine", "matmul_floor_s", "backends", "ratios", "iwelbo")


def add_arguments(parser) -> None:
    a = parser.add_argument
    a("--genes", type=int, required=True, help="G, genes modelled")
    a("--perturbations", type=int, required=True, help="T, perturbations (dosage columns)")
    a("--cells-per-batch", type=int, default=512, help="B, cells per training batch")
    a("--particles", type=int, default=5, help="P, guide samples per training step")
    a("--latent", type=int, default=100, help="L, latent dimension")
    a("--hidden", type=int, default=400, help="H, encoder/decoder hidden width")
    a("--model", default="sams_vae", help="model name (see samsvae.models.MODEL_GUIDES)")
    a("--guide", default="mean_field", help="guide name (mean_field, corr_both, ...)")
    a("--steps", type=int, default=5, help="timed rounds (median reported)")
    a("--warmup", type=int, default=1, help="untimed rounds first")
    a("--iwelbo-particles", type=int, default=100, help="K for IWELBO; 0 skips IWELBO")
    a("--iwelbo-cells", type=int, default=64, help="cells in the IWELBO batch")
    a("--iwelbo-chunk", type=int, default=10, help="particles per IWELBO chunk")
    a("--iwelbo-memory-particles", default="",
      help="comma-separated extra K (e.g. 1000) measured with the last backend, for memory vs K")
    a("--device", default="cpu",
      help="cpu | cuda: where the model and batch live; backends resolve for this device "
           "(auto = triton on cuda)")
    a("--tf32", action="store_true",
      help="on cuda: TF32 matrix products (torch.set_float32_matmul_precision('high'))")
    a("--backends", default="reference,auto",
      help="comma-separated backends to compare (reference, auto, cpp, triton)")
    a("--threads", type=int, default=1, help="torch intra-op threads")
    a("--components", default="step,head,nb,composition,encoder,optimizer",
      help="comma-separated parts to time (step is always timed)")
    a("--profile", action="store_true",
      help="also print a torch.profiler table of the last backend's training step")
    a("--adam", choices=("foreach", "fused"), default="fused",
      help="Adam implementation of the step (fused, as samsvae.train.Trainer uses; foreach: "
           "torch's default)")
    a("--keep-freed-memory", action="store_true",
      help="tell glibc malloc to keep freed blocks for reuse (see keep_freed_memory)")
    a("--mean-count", type=float, default=0.5,
      help="mean UMIs per gene and cell of the simulated counts (0.5: ~30%% non-zeros; "
           "0.1-0.2: ~10%%, where the cpp encoder runs its sparse kernel)")
    a("--seed", type=int, default=0)
    a("--json", dest="json_out", default=None, help="write the results as JSON here")


def keep_freed_memory(limit_bytes: int = 1 << 30) -> bool:
    """Make glibc ``malloc`` serve blocks up to ``limit_bytes`` from its heap and keep freed
    memory instead of returning it to the kernel (``mallopt`` M_MMAP_THRESHOLD and
    M_TRIM_THRESHOLD).

    By default every allocation above ~32 MiB is a fresh ``mmap`` whose pages fault on first
    touch; a training step at 8,000 genes allocates ~300 MiB of such tensors (logits, their
    gradient), i.e. ~80k page faults per step. Returns False where glibc is not available.
    Process-wide; the process keeps its peak memory.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, int(limit_bytes))
                and libc.mallopt(m_trim_threshold, int(limit_bytes)))


# -- data ---------------------------------------------------------------------------------------

def build_bench_model(args, batch):
    """The model under test, with weights fixed by ``args.seed`` (identical across backends:
    the backend is chosen per call, see :func:`on_backend`)."""
    import torch


    torch.manual_seed(args.seed)
    counts = batch.counts.to_dense()
    lg = torch.log1p(counts)
    model = build_model(args.model, args.guide, n_genes=args.genes,
                        n_perturbations=args.perturbations, n_latent=args.latent,
                        n_hidden=args.hidden, gene_log1p_mean=lg.mean(0).numpy(),
                        gene_log1p_std=lg.std(0).clamp_min(1e-3).numpy(),
                        perturbation_counts=np.full(args.perturbations, 100.0))
    return model


# -- timing -------------------------------------------------------------------------------------

def _matmul_shapes(model, args, n_batch_perturbations: int = 0,
                   dense_encoder_input: bool = True) -> List[tuple]:
    """(rows, in, out, input_grad) of the dense Linear products of one training step.

    ``n_batch_perturbations`` (U, the distinct perturbations of the batch) sizes the
    correlated-embedding guide's MLP, which runs on (particles * U) rows.
    ``dense_encoder_input=False``: without the encoder's genes -> hidden products (a backend
    whose encoder runs the sparse kernel on this batch does not run them)."""
    import torch

    P, B, L, H, G = args.particles, args.cells_per_batch, args.latent, args.hidden, args.genes
    corr_basal = bool(getattr(model, "corr_basal", False))
    shapes = [(B, G, H, False)] if dense_encoder_input else []   # encoder: genes -> hidden
    shapes += [((P * B) if corr_basal else B, H, 2 * L, True),  # encoder: hidden -> loc, scale
               (P * B, L, H, True),                       # decoder: latent -> hidden
               (P * B, H, G, True)]                       # decoder: hidden -> gene logits
    if corr_basal:
        shapes.append((P * B, L, H, True))               # encoder: z_p conditioning
    net = getattr(model, "embedding_net", None) if getattr(model, "corr_embedding", False) else None
    if net is not None and n_batch_perturbations:
        for layer in net.modules():                     # q(e_t | m_t, c_t): [m, c] -> ... -> 2L
            if isinstance(layer, torch.nn.Linear):
                shapes.append((P * n_batch_perturbations, layer.in_features,
                               layer.out_features, True))
    return shapes


def make_matmul_floor(shapes, device="cpu") -> Callable[[], None]:
    """A function running the forward, input-gradient and weight-gradient products of
    ``shapes`` with preallocated float32 operands (what any implementation must compute)."""
    import torch

    ops = []
    kw = {"device": device}
    for rows, n_in, n_out, input_grad in shapes:
        x, w = torch.randn(rows, n_in, **kw), torch.randn(n_out, n_in, **kw) * 0.01
        dy = torch.randn(rows, n_out, **kw)
        y, dx = torch.empty(rows, n_out, **kw), torch.empty(rows, n_in, **kw)
        dw = torch.empty(n_out, n_in, **kw)
        ops.append((x, w, dy, y, dx, dw, input_grad))

    def run():
        for x, w, dy, y, dx, dw, input_grad in ops:
            torch.mm(x, w.T, out=y)
            if input_grad:
                torch.mm(dy, w, out=dx)
            torch.mm(dy.T, x, out=dw)
    return run


def _component_fns(model, batch, args, backend: str) -> Dict[str, Callable[[], None]]:
    """name -> a zero-argument function running that part of the step once (fwd + bwd)."""
    import torch


    P, B, H, L = args.particles, args.cells_per_batch, args.hidden, args.latent
    wanted = set(args.components.split(","))
    params = [p for p in model.parameters() if p.requires_grad]
    # lr / weight decay / fused Adam as samsvae.train.Trainer; "foreach" is torch's default
    opt = torch.optim.Adam(params, lr=3e-4, weight_decay=1e-6,
                           **({"fused": True} if getattr(args, "adam", "fused") == "fused" else {}))
    device = batch.library.device
    gen = torch.Generator(device).manual_seed(args.seed)
    fns = {}

    def step():
        opt.zero_grad(set_to_none=True)
        model.loss(batch, particles=P, generator=gen)["loss"].backward()
        opt.step()
    fns["step"] = step

    log_library = torch.log(batch.library.clamp_min(1.0))
    log_theta = model.likelihood.log_theta
    if "head" in wanted:
        hidden = torch.rand(P, B, H, device=device, requires_grad=True)
        out = model.decoder.out

        def head():
            value = ops.nb_log_prob_linear(batch.counts, hidden, out.weight, out.bias,
                                           log_library, log_theta, backend=backend)
            value.sum().backward()
        fns["head"] = head
    if "nb" in wanted:
        logits = (torch.randn(P, B, args.genes, device=device) * 0.5).requires_grad_(True)

        def nb():
            ops.nb_log_prob(batch.counts, logits, log_library, log_theta,
                            backend=backend).sum().backward()
        fns["nb"] = nb
    if "composition" in wanted and hasattr(model, "emb_loc_raw"):
        loc, log_scale = model.emb_loc_raw, model.emb_log_scale_raw
        mask_logits = getattr(model, "mask_logits_raw", None)
        weight = torch.randn(P, B, L, device=device)
        cgen = torch.Generator(device).manual_seed(args.seed + 1)

        def composition():
            s = ops.masked_embedding_sum(batch.dosage, loc, log_scale, mask_logits, particles=P,
                                         generator=cgen, backend=backend)
            (s.z_p * weight).sum().backward()
        fns["composition"] = composition
    if "encoder" in wanted and hasattr(model, "encoder"):
        enc = model.encoder

        def encoder():
            q = enc.posterior(enc.gene_part(batch.counts))
            (q.loc.sum() + q.scale.sum()).backward()
        fns["encoder"] = encoder
    if "optimizer" in wanted:
        def optimizer():
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            opt.step()
        fns["optimizer"] = optimizer
    return fns


def on_backend(fn: Callable[[], None], backend: str) -> Callable[[], None]:
    """``fn`` run with ``backend`` as the kernel backend of every op it calls."""
    def run():
        with ops.use_backend(backend):
            fn()
    return run


def time_interleaved(fns: Dict[str, Callable[[], None]], steps: int, warmup: int,
                     sync: Callable[[], None] = lambda: None) -> Dict[str, dict]:
    """Run every function once per round (``warmup`` untimed rounds, then ``steps`` timed ones);
    returns ``{name: {"median_s", "min_s", "samples_s"}}``. ``sync`` waits for the device
    (``torch.cuda.synchronize`` on a GPU) before each clock reading."""
    samples = {k: [] for k in fns}
    for r in range(warmup + steps):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            dt = time.perf_counter() - t0
            if r >= warmup:
                samples[name].append(dt)
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "samples_s": v}
            for k, v in samples.items()}


# -- profile ------------------------------------------------------------------------------------

MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm",
              "aten::matmul", "aten::addmv", "aten::addmv_", "aten::mv", "aten::_sparse_mm",
              "aten::_sparse_addmm", "aten::addmm_out"}


def _category(event, args) -> str:
    """Bucket of one profiled op by name, input shapes and enclosing optimizer step."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("Optimizer."):
            return "optimizer (Adam)"
        parent = parent.cpu_parent
    name = event.name
    if "nb_log_prob" in name:
        return "NB kernel (fwd + bwd)"
    if "masked_embedding" in name:
        return "composition kernel (fwd + bwd)"
    if "log1p_standardize_linear" in name:
        return "encoder genes -> hidden (sparse kernel, fwd + bwd)"
    if "log1p_standardize" in name:
        return "encoder input (log1p, standardise)"
    if name in MATMUL_OPS:
        dims = {d for shape in (event.input_shapes or []) for d in (shape or [])}
        rows = args.particles * args.cells_per_batch
        if args.genes in dims and rows in dims:
            return "matmul: decoder hidden -> genes"
        if args.genes in dims:
            return "matmul: encoder genes -> hidden"
        return "matmul: other layers (latent/hidden)"
    return "other (elementwise, indexing, copies, autograd)"


def profile_step(model, batch, args, backend: str) -> dict:
    """torch.profiler of ``--steps`` training steps: self CPU time per category (ms per step
    and fraction of the step) and the op table."""
    from torch.profiler import ProfilerActivity, profile

    step = on_backend(_component_fns(model, batch, args, backend)["step"], backend)
    step()
    n = max(1, args.steps)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(n):
            step()
    wall = (time.perf_counter() - t0) / n
    buckets: Dict[str, float] = {}
    for e in prof.events():
        if e.device_type.name != "CPU" or e.name.startswith(("Optimizer.", "autograd::",
                                                              "ProfilerStep")):
            continue
        if e.name.startswith(("<built-in", "torch/", "samsvae/")) or ".py(" in e.name:
            continue
        key = _category(e, args)
        buckets[key] = buckets.get(key, 0.0) + e.self_cpu_time_total / 1e3 / n
    total = sum(buckets.values())
    rows = sorted(buckets.items(), key=lambda kv: -kv[1])
    table = ["| part of the step (profiled, self CPU time) | ms / step | fraction |",
             "|---|---|---|"]
    table += [f"| {k} | {v:.1f} | {v / total:.1%} |" for k, v in rows]
    table.append(f"| total (profiled ops) | {total:.1f} | 100% |")
    ops_table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
    return {"backend": backend, "steps": n, "wall_ms_per_step_under_profiler": 1e3 * wall,
            "ms_per_step": dict(rows), "table": "\n".join(table), "ops_table": ops_table}


# -- IWELBO in a subprocess ---------------------------------------------------------------------

def _status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in bytes; 0 if absent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux >= 4.0); False if the
    kernel refuses, in which case the peak includes the set-up before the measurement."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def iwelbo_child(spec_json: str) -> None:
    """Entry point of the IWELBO subprocess: prints one JSON line with the measurement."""
    import argparse

    import torch

    spec = json.loads(spec_json)
    torch.set_num_threads(int(spec["threads"]))
    if spec["args"].get("keep_freed_memory"):
        keep_freed_memory()
    args = argparse.Namespace(**spec["args"])
    args.cells_per_batch = spec["cells"]
    batch = synth_batch(spec["cells"], args.genes, args.perturbations, seed=args.seed + 7,
                        mean_count=getattr(args, "mean_count", 0.5))
    model = build_bench_model(args, batch)
    model.eval()
    device = torch.device(getattr(args, "device", "cpu"))
    model, batch = model.to(device), batch.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    K, chunk = int(spec["particles"]), int(spec["chunk"])
    with ops.use_backend(spec["backend"]):
        model.iwelbo(batch, particles=min(K, chunk), chunk=chunk)   # warm-up (allocator, caches)
        rss0 = _status_bytes("VmRSS")
        reset = _reset_peak_rss()
        sync()
        t0 = time.perf_counter()
        value = model.iwelbo(batch, particles=K, chunk=chunk)
        sync()
        dt = time.perf_counter() - t0
    if reset:
        peak, method = _status_bytes("VmHWM"), "VmHWM after clear_refs"
    else:
        peak, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ru_maxrss"
    print(json.dumps({"backend": spec["backend"], "particles": K, "chunk": chunk,
                      "cells": spec["cells"], "seconds": dt, "ms_per_cell": 1e3 * dt / spec["cells"],
                      "rss_before_bytes": rss0, "peak_rss_bytes": peak, "peak_method": method,
                      "added_peak_bytes": max(0, peak - rss0),
                      "iwelbo_mean_nats": float(value.mean())}))


def run_iwelbo(args, backend: str, particles: int) -> dict:
    """One IWELBO measurement in a fresh interpreter (so peak RSS is this measurement's)."""
    spec = {"args": {k: v for k, v in vars(args).items() if k not in ("func",)},
            "backend": backend, "particles": particles, "chunk": args.iwelbo_chunk,
            "cells": args.iwelbo_cells, "threads": args.threads}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    code = "import sys; from samsvae.cli.bench import iwelbo_child; iwelbo_child(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"IWELBO subprocess ({backend}, K={particles}) failed:\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- report -------------------------------------------------------------------------------------

def _encoder_runs_sparse(backend: str, density: float, device: str = "cpu") -> bool:
    """Whether ``backend``'s encoder input layer takes the sparse kernel on a CSR batch with
    this fraction of stored entries (then the step runs no dense genes -> hidden product)."""
    if ops.backends.resolve("log1p_standardize_linear", backend, device)[0] != "cpp":
        return False
    return density <= encoder_cpp.SPARSE_BELOW


def _check_args(args) -> None:
    for name in ("genes", "perturbations", "cells_per_batch", "particles", "latent", "hidden",
                 "steps", "threads", "iwelbo_cells", "iwelbo_chunk"):
        if getattr(args, name) < 1:
            raise SystemExit(f"samsvae bench: --{name.replace('_', '-')} must be >= 1, "
                             f"got {getattr(args, name)}")
    if not args.mean_count > 0:
        raise SystemExit(f"samsvae bench: --mean-count must be > 0, got {args.mean_count}")
    if args.warmup < 0 or args.iwelbo_particles < 0:
        raise SystemExit("samsvae bench: --warmup and --iwelbo-particles must be >= 0")
    if args.model not in MODEL_GUIDES or args.guide not in MODEL_GUIDES[args.model]:
        pairs = ", ".join(f"{m}/{g}" for m, gs in MODEL_GUIDES.items() for g in gs)
        raise SystemExit(f"samsvae bench: unknown --model/--guide {args.model}/{args.guide}; "
                         f"valid pairs: {pairs}")


def _fmt_ms(s: float) -> str:
    return f"{1e3 * s:.1f}"


def markdown_report(result: dict) -> str:
    cfg = result["config"]
    floor = result["matmul_floor_s"]
    names = list(result["backends"])
    comps = [c for c in ("step", "head", "nb", "composition", "encoder", "optimizer")
             if any(c in result["backends"][b]["times"] for b in names)]
    lines = [f"{cfg['model']}/{cfg['guide']}, {cfg['genes']} genes x {cfg['perturbations']} "
             f"perturbations, B={cfg['cells_per_batch']}, P={cfg['particles']}, "
             f"L={cfg['latent']}, H={cfg['hidden']}, threads={cfg['threads']}, Adam {cfg['adam']}, "
             f"keep freed memory {'on' if cfg['keep_freed_memory'] else 'off'}, counts "
             f"{result.get('counts_density', float('nan')):.1%} non-zero; median of "
             f"{cfg['steps']} rounds (ms)", "",
             "| backend (resolved) | " + " | ".join(comps)
             + " | step / matmul floor | (fastest runs) |",
             "|---" * (len(comps) + 3) + "|"]
    for b in names:
        r = result["backends"][b]
        cells = [_fmt_ms(r["times"][c]["median_s"]) if c in r["times"] else "-" for c in comps]
        sparse = (" [encoder input: sparse kernel]"
                  if r.get("floor") == "matmul_floor_sparse_input" else "")
        lines.append(f"| {b} ({r['resolved']}){sparse} | " + " | ".join(cells)
                     + f" | {result['ratios'][b]['step_over_matmul_floor']:.2f} | "
                     f"{result['ratios'][b]['step_over_matmul_floor_min']:.2f} |")
    lines.append(f"| matmul floor | {_fmt_ms(floor)} |" + " |" * (len(comps) + 1))
    if "matmul_floor_sparse_input_s" in result:
        lines.append(f"| matmul floor without the encoder's genes -> hidden products (the "
                     f"floor of the rows marked sparse kernel) | "
                     f"{_fmt_ms(result['matmul_floor_sparse_input_s'])} |"
                     + " |" * (len(comps) + 1))
    for key, v in result["ratios"].items():
        if "speedup_over_reference" in v:
            lines.append(f"\nstep speed-up of {key} over reference: "
                         f"{v['speedup_over_reference']:.2f}x (medians), "
                         f"{v['speedup_over_reference_min']:.2f}x (fastest runs); "
                         f"bound {v['speedup_bound']:.2f}x (reference step / the matmul floor "
                         f"of {key}: a step made of its dense products alone)")
    if result["iwelbo"]:
        lines += ["", "| IWELBO backend | K | cells | ms / cell | added peak RSS (MiB) | "
                  "peak RSS (MiB) | mean IWELBO (nats) |", "|---|---|---|---|---|---|---|"]
        for m in result["iwelbo"]:
            lines.append(f"| {m['backend']} | {m['particles']} | {m['cells']} | "
                         f"{m['ms_per_cell']:.2f} | {m['added_peak_bytes'] / 2**20:.0f} | "
                         f"{m['peak_rss_bytes'] / 2**20:.0f} | {m['iwelbo_mean_nats']:.2f} |")
    return "\n".join(lines)


def run(args) -> int:
    _check_args(args)
    import torch


    torch.set_num_threads(args.threads)
    if args.keep_freed_memory and not keep_freed_memory():
        print("samsvae bench: --keep-freed-memory needs glibc; ignored", file=sys.stderr)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    device = torch.device(getattr(args, "device", "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("samsvae bench: --device cuda needs a CUDA GPU and a CUDA build of torch")
    set_tf32(getattr(args, "tf32", False), device)
    for b in backends:
        ops.backends.resolve("masked_embedding_sum", b, device)   # raises early on a bad name
    batch = synth_batch(args.cells_per_batch, args.genes, args.perturbations, seed=args.seed,
                        mean_count=args.mean_count)
    models = {b: build_bench_model(args, batch).to(device) for b in backends}
    batch = batch.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    first = models[backends[0]]
    n_batch_perturbations = int(torch.unique(batch.dosage.col_indices()).numel())
    shapes = _matmul_shapes(first, args, n_batch_perturbations)
    density = batch.counts.values().numel() / batch.counts.numel()
    sparse_input = {b: _encoder_runs_sparse(b, density, device) for b in backends}

    fns = {"matmul_floor": make_matmul_floor(shapes, device)}
    if any(sparse_input.values()):
        fns["matmul_floor_sparse_input"] = make_matmul_floor(
            _matmul_shapes(first, args, n_batch_perturbations, dense_encoder_input=False),
            device)
    for b in backends:
        for name, fn in _component_fns(models[b], batch, args, b).items():
            fns[f"{b}/{name}"] = on_backend(fn, b)
    times = time_interleaved(fns, args.steps, args.warmup, sync)
    floor = times["matmul_floor"]["median_s"]

    result = {"config": {k: v for k, v in vars(args).items() if k not in ("func", "json_out")},
              "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                          "loadavg": list(os.getloadavg()), "cpu_count": os.cpu_count(),
                          "matmul_shapes": shapes},
              "counts_density": density,
              "matmul_floor_s": floor, "backends": {}, "ratios": {}, "iwelbo": []}
    if "matmul_floor_sparse_input" in times:
        result["matmul_floor_sparse_input_s"] = times["matmul_floor_sparse_input"]["median_s"]
    for b in backends:
        resolved = {op: ops.backends.resolve(op, b, device)[0]
                    for op in ("nb_log_prob", "masked_embedding_sum", "perturbation_sum",
                               "log1p_standardize_linear")}
        t = {name.split("/", 1)[1]: v for name, v in times.items() if name.startswith(b + "/")}
        key = "matmul_floor_sparse_input" if sparse_input[b] else "matmul_floor"
        result["backends"][b] = {"resolved": ",".join(f"{k}={v}" for k, v in resolved.items()),
                                 "times": t, "encoder_input": "sparse kernel" if sparse_input[b]
                                 else "dense product", "floor": key}
        floor, floor_min = times[key]["median_s"], times[key]["min_s"]
        ratios = {"step_over_matmul_floor": t["step"]["median_s"] / floor,
                  "step_over_matmul_floor_min": t["step"]["min_s"] / floor_min}
        if "reference" in backends and b != "reference":
            ratios["speedup_over_reference"] = (times["reference/step"]["median_s"]
                                                / t["step"]["median_s"])
            ratios["speedup_over_reference_min"] = (times["reference/step"]["min_s"]
                                                    / t["step"]["min_s"])
            # what any step running this backend's products could reach: reference / floor
            ratios["speedup_bound"] = times["reference/step"]["median_s"] / floor
        result["ratios"][b] = ratios

    if args.iwelbo_particles:
        for b in backends:
            result["iwelbo"].append(run_iwelbo(args, b, args.iwelbo_particles))
        extra = [int(k) for k in args.iwelbo_memory_particles.split(",") if k.strip()]
        for k in extra:
            result["iwelbo"].append(run_iwelbo(args, backends[-1], k))

    if args.profile:
        result["profile"] = profile_step(models[backends[-1]], batch, args, backends[-1])
        print(result["profile"]["table"])

    print(markdown_report(result))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)
    return 0
