"""Out-of-core and data-parallel training throughput on a large simulated screen (issue 6).

    python -m samsvae simulate /tmp/sim_1m.h5ad --cells 1000000 --genes 8000 \\
        --perturbations 10000 --latent 100 --seed 0
    OMP_NUM_THREADS=1 /usr/bin/time -v python benchmarks/genome_scale.py /tmp/sim_1m.h5ad \\
        --bench-dir /tmp/genome_run --steps 40
    OMP_NUM_THREADS=1 /usr/bin/time -v torchrun --standalone --nproc-per-node 2 \\
        benchmarks/genome_scale.py /tmp/sim_1m.h5ad --bench-dir /tmp/genome_run2 --steps 40
    python benchmarks/genome_scale.py /tmp/sim_200k.h5ad --bench-dir /tmp/r200k --compare-memory 2

What it runs is what ``samsvae train DATA --backed`` runs (the one-pass statistics cached in
``BENCH_DIR/data_stats.npz``, StreamingLoader shards, Trainer / DistributedTrainer), without the
validation pass, plus the test IWELBO of ``--eval-cells`` held-out cells. It prints one JSON
record (also written to ``BENCH_DIR/bench.json``): the statistics pass (seconds, bytes, MiB/s),
training cells/s after ``--warmup`` steps, the seconds an epoch would take at that rate, the
loader's read time / wait time / bytes read, the IWELBO, and each rank's peak RSS.

``--compare-memory R`` (one process, a file that fits in memory) loads the counts both ways and
trains one model alternating blocks of ``--steps`` steps from the in-memory loader and from the
backed StreamingLoader, R rounds, so that both see the same machine load; it reports the
cells/s of each (time per step including the wait for the batch) and their ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from samsvae.data import MinibatchLoader, gene_log1p_stats, load_screen, make_split  # noqa: E402
from samsvae.data.stream_stats import load_backed_screen  # noqa: E402
from samsvae.data.streaming import StreamingLoader  # noqa: E402
from samsvae.train import Trainer, TrainConfig  # noqa: E402
from samsvae.train.prepare import build_model_for_screen, split_indices  # noqa: E402
from samsvae.infer.iwelbo import cells_iwelbo  # noqa: E402
from samsvae.train.distributed import DistributedTrainer, init_from_env, shutdown  # noqa: E402


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data")
    p.add_argument("--bench-dir", required=True, help="directory for data_stats.npz and bench.json")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the rate")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--particles", type=int, default=5)
    p.add_argument("--latent", type=int, default=100)
    p.add_argument("--hidden", type=int, default=400)
    p.add_argument("--model", default="sams_vae")
    p.add_argument("--guide", default="mean_field")
    p.add_argument("--in-memory", action="store_true", help="load the counts into memory")
    p.add_argument("--chunk-rows", type=int, default=None)
    p.add_argument("--buffer-chunks", type=int, default=16)
    p.add_argument("--eval-cells", type=int, default=10000)
    p.add_argument("--eval-particles", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare-memory", type=int, default=0, metavar="ROUNDS",
                   help="alternate in-memory and backed training blocks (see the docstring)")
    args = p.parse_args(argv)
    if args.compare_memory:
        return compare_memory(args)

    comm = init_from_env("cpu")
    rank, world = (0, 1) if comm is None else (comm.rank, comm.world_size)
    say = print if rank == 0 else (lambda *a, **k: None)
    run = Path(args.bench_dir)
    run.mkdir(parents=True, exist_ok=True)
    record = {"data": args.data, "world_size": world, "mode": "memory" if args.in_memory
              else "backed", "batch_size": args.batch_size, "particles": args.particles,
              "latent": args.latent, "model": f"{args.model}/{args.guide}",
              "load_before": os.getloadavg()}

    def split_fn(screen):
        return np.asarray(make_split(screen, "random", seed=args.seed)).astype(str)

    t0 = time.perf_counter()
    if args.in_memory:
        screen = load_screen(args.data)
        split = split_fn(screen)
        train = split_indices(split, "train")
        gene_stats = gene_log1p_stats(screen, train)
        record["load_s"] = time.perf_counter() - t0
    else:
        screen, split, stats = load_backed_screen(args.data, split_fn,
                                                  cache_path=run / "data_stats.npz", comm=comm,
                                                  log=say)
        train = split_indices(split, "train")
        gene_stats = (stats.gene_log1p_mean, stats.gene_log1p_std)
        record.update(load_s=time.perf_counter() - t0, stats_pass_s=stats.seconds,
                      stats_bytes=stats.bytes_read, stats_from_cache=stats.from_cache,
                      stats_mib_s=stats.bytes_read / 2**20 / max(stats.seconds, 1e-9))
    say(f"{screen!r}: {train.size:,} training cells; loaded in {record['load_s']:.1f} s")
    record.update(n_cells=screen.n_cells, n_genes=screen.n_genes,
                  n_perturbations=screen.n_perturbations, n_train=int(train.size))

    torch.manual_seed(args.seed)
    model = build_model_for_screen(screen, train, model=args.model, guide=args.guide,
                                   n_latent=args.latent, n_hidden=args.hidden,
                                   gene_stats=gene_stats)
    if args.in_memory and world == 1:
        loader = MinibatchLoader(screen, train, args.batch_size, seed=args.seed)
    else:
        loader = StreamingLoader(screen, train, args.batch_size, seed=args.seed,
                                 chunk_rows=args.chunk_rows, buffer_chunks=args.buffer_chunks,
                                 rank=rank, world_size=world)
    config = TrainConfig(max_steps=args.steps, batch_size=args.batch_size,
                         particles=args.particles, seed=args.seed, progress=False)
    if comm is None:
        trainer = Trainer(model, loader, None, config, n_train_cells=train.size, log=None)
    else:
        trainer = DistributedTrainer(model, loader, None, config, comm=comm,
                                     n_train_cells=train.size, log=None)
    stamps = []
    step = trainer._train_step

    def timed_step(batch):
        loss = step(batch)
        stamps.append((time.perf_counter(), len(batch)))
        return loss

    trainer._train_step = timed_step
    t_fit, cpu_fit = time.perf_counter(), time.process_time()
    trainer.fit()
    fit_s = time.perf_counter() - t_fit
    cpu_s = time.process_time() - cpu_fit  # this process, all its threads
    cpu_all = [cpu_s] if comm is None else comm.all_gather_object(cpu_s)
    w = min(args.warmup, len(stamps) - 2)
    dt = stamps[-1][0] - stamps[w][0]
    local_cells = sum(n for _, n in stamps[w + 1:])
    cells_s = local_cells * world / dt  # every rank steps together on its share of the batch
    loader_stats = getattr(loader, "stats", {})
    record.update(steps=len(stamps), fit_s=fit_s, cells_per_s=cells_s,
                  cpu_s_per_rank=cpu_all, cells_per_cpu_s=len(stamps) * args.batch_size
                  / sum(cpu_all), cpu_share=sum(cpu_all) / fit_s,
                  s_per_step=dt / (len(stamps) - 1 - w),
                  epoch_s_extrapolated=train.size / cells_s,
                  final_loss=trainer.history["train"]["loss"][-1],
                  loader=dict(loader_stats),
                  load_during=os.getloadavg())
    if loader_stats.get("read_s"):
        record["loader_read_mib_s"] = loader_stats["bytes_read"] / 2**20 / loader_stats["read_s"]
    say(f"trained {len(stamps)} steps in {fit_s:.1f} s: {cells_s:,.0f} cells/s "
        f"({record['s_per_step']:.2f} s/step); loader {loader_stats}")

    if args.eval_cells > 0:
        test = split_indices(split, "test")
        rows = np.sort(np.random.default_rng(args.seed).choice(
            test, min(args.eval_cells, test.size), replace=False))
        t_eval = time.perf_counter()
        iw = cells_iwelbo(model, screen, rows, batch_size=args.batch_size,
                          particles=args.eval_particles, global_seed=args.seed, comm=comm)
        record.update(eval_cells=int(rows.size), eval_particles=args.eval_particles,
                      test_iwelbo=float(iw.mean()), eval_s=time.perf_counter() - t_eval)
        say(f"test IWELBO of {rows.size:,} cells ({args.eval_particles} particles): "
            f"{iw.mean():.2f} nats/cell in {record['eval_s']:.1f} s")

    rss = [_peak_rss_gib()] if comm is None else comm.all_gather_object(_peak_rss_gib())
    record.update(peak_rss_gib_per_rank=rss, load_after=os.getloadavg())
    if rank == 0:
        text = json.dumps(record, indent=1, default=float)
        (run / "bench.json").write_text(text + "\n")
        print(text)
    shutdown(comm)
    return 0


def compare_memory(args) -> int:
    """In-memory vs backed throughput, interleaved in one process (same load for both)."""
    run = Path(args.bench_dir)
    run.mkdir(parents=True, exist_ok=True)

    def split_fn(screen):
        return np.asarray(make_split(screen, "random", seed=args.seed)).astype(str)

    t0 = time.perf_counter()
    backed, split, stats = load_backed_screen(args.data, split_fn,
                                              cache_path=run / "data_stats.npz", log=print)
    t1 = time.perf_counter()
    memory = load_screen(args.data)
    t2 = time.perf_counter()
    train = split_indices(split, "train")
    np.testing.assert_array_equal(split, split_fn(memory))
    torch.manual_seed(args.seed)
    model = build_model_for_screen(backed, train, model=args.model, guide=args.guide,
                                   n_latent=args.latent, n_hidden=args.hidden,
                                   gene_stats=(stats.gene_log1p_mean, stats.gene_log1p_std))
    loaders = {"memory": MinibatchLoader(memory, train, args.batch_size, seed=args.seed),
               "backed": StreamingLoader(backed, train, args.batch_size, seed=args.seed,
                                         chunk_rows=args.chunk_rows,
                                         buffer_chunks=args.buffer_chunks)}
    config = TrainConfig(max_steps=1, batch_size=args.batch_size, particles=args.particles,
                         seed=args.seed, progress=False)
    trainer = Trainer(model, loaders["memory"], None, config, n_train_cells=train.size, log=None)
    iters = {k: iter(v) for k, v in loaders.items()}
    times = {k: [] for k in loaders}
    cpu = {k: [] for k in loaders}
    record = {"data": args.data, "mode": "compare", "load_before": os.getloadavg(),
              "backed_load_s": t1 - t0, "memory_load_s": t2 - t1,
              "stats_pass_s": stats.seconds, "stats_from_cache": stats.from_cache}
    for _ in range(args.compare_memory):
        for mode in ("memory", "backed"):
            for k in range(args.steps):
                t, c = time.perf_counter(), time.process_time()
                batch = next(iters[mode])
                trainer._train_step(batch)
                if k >= args.warmup:  # the first steps of a block pay for the switch
                    times[mode].append(time.perf_counter() - t)
                    cpu[mode].append(time.process_time() - c)
            print(f"{mode}: {np.mean(times[mode][-(args.steps - args.warmup):]):.3f} s/step",
                  flush=True)
    rate = {k: args.batch_size / np.mean(v) for k, v in times.items()}
    record.update(steps_timed={k: len(v) for k, v in times.items()},
                  cells_per_s=rate, median_s_per_step={k: float(np.median(v))
                                                       for k, v in times.items()},
                  backed_over_memory=rate["backed"] / rate["memory"],
                  cpu_s_per_step={k: float(np.mean(v)) for k, v in cpu.items()},
                  round_s_per_step={k: [float(np.mean(v[i:i + args.steps - args.warmup]))
                                        for i in range(0, len(v), args.steps - args.warmup)]
                                    for k, v in times.items()},
                  loader=dict(loaders["backed"].stats), load_after=os.getloadavg(),
                  peak_rss_gib=_peak_rss_gib())
    text = json.dumps(record, indent=1, default=float)
    (run / "compare.json").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
