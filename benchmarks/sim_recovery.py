"""Scientific check on a simulated screen: mask recovery and test IWELBO of the model family.

Acceptance (the issue): on a simulated screen with 20,000 cells, 1,000 genes, 50 perturbations,
mask probability 0.1 and latent dimension 10, ``sams_vae``/``corr_both`` recovers the true masks
with F1 >= 0.8 and its test IWELBO is at least that of ``cpa_vae`` and ``cvae`` trained with the
same number of steps.

    OMP_NUM_THREADS=1 python benchmarks/sim_recovery.py                       # brief's lr 3e-4
    OMP_NUM_THREADS=1 python benchmarks/sim_recovery.py --lr 3e-3 --steps 3000
    python benchmarks/sim_recovery.py --genes 300 --steps 800 --models sams_vae:corr_both

Each model is trained with a plain loop (Adam, lr 3e-4 unless --lr, weight decay 1e-6, batch
512, 5 particles) on a random 80/10/10 split, then evaluated on the test split with
``samsvae.infer.evaluate_model`` (IWELBO with 100 particles, ATE Pearson, mask F1). The default
options of the SAMS models are the ones the iterations below settled on (``DEFAULT_KWARGS``).

What the iterations found (1 CPU thread, shared machine):

* Paper defaults (diagonal basal guide, exact ELBO): after 1,500 steps the perturbation effects
  sit in z_basal (the encoder absorbs them), embeddings stay ~0.1 and masks ~0.5: F1 ~0.3-0.4.
  A residual correlated basal guide (mean = encoder([x, z_p]) - z_p) moves the effects into
  z_p, and ``global_param_scale=10`` lets the per-perturbation parameters move fast enough.
* Masks then come out dense in a rotated latent basis. Even an initialisation at the true masks
  drifts there. With a diagonal q(z_basal) the ELBO itself prefers the rotation: on this
  simulator the mean-field gap is 0.78 nats/cell in the true axes and 0.29 after the best
  rotation (~7,800 nats over the training split), against roughly 3,600 nats that the true
  sparse masks save. ``basal_covariance="full"`` removes that preference, and the reference
  implementation's mask-prior reweighting (``mask_prior_weight=0.03``) makes sparsity pay in
  proportion to the cells. Every true entry with |effect| > 0.9 is then found; the misses are
  small effects and leftover rotation, which shrink only slowly with training.
* Results on the acceptance screen (seed 0, test split of 2,000 cells):

  =====================  ======  =====  ===========  ====================  ========
  model/guide            lr      steps  test IWELBO  mask F1 (P / R)       ATE r
  =====================  ======  =====  ===========  ====================  ========
  sams_vae/corr_both     3e-4    1500   -1741.91     0.385 (0.26 / 0.71)   0.460
  cpa_vae/mean_field     3e-4    1500   -1741.42     -                     0.194
  cvae/mean_field        3e-4    1500   -1741.22     -                     0.192
  sams_vae/corr_both     3e-3    3000   -1690.14     0.514 (0.48 / 0.55)   0.472
  cpa_vae/mean_field     3e-3    3000   -1691.36     -                     0.337
  cvae/mean_field        3e-3    3000   -1696.07     -                     0.520
  sams_vae/corr_both     3e-3    6000   -1691.85     0.563 (0.57 / 0.55)   0.455
  =====================  ======  =====  ===========  ====================  ========

  The IWELBO part holds at 3,000 steps (at 1,500 steps with lr 3e-4 none of the models has
  trained far enough for the differences to exceed the noise). The F1 >= 0.8 bar is not met
  within a few CPU minutes; F1 still rises with the number of steps.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from samsvae.data import (MinibatchLoader, gene_log1p_stats, load_screen,  # noqa: E402
                          make_split, perturbation_cell_counts, simulate_screen, split_indices)
from samsvae.infer import evaluate_model, mask_recovery  # noqa: E402
from samsvae.models import build_model, svae_plus_labels  # noqa: E402

DEFAULT_MODELS = "sams_vae:corr_both,cpa_vae:mean_field,cvae:mean_field"
# Options found by the iterations reported in the module docstring; --model-kwargs replaces them.
DEFAULT_KWARGS = {
    "sams_vae": {"global_param_scale": 10.0, "basal_covariance": "full",
                 "mask_prior_weight": 0.03},
    "cpa_vae": {"global_param_scale": 10.0, "basal_covariance": "full"},
}


def _f1(model, screen):
    masks = model.perturbation_masks()
    if masks is None or screen.ground_truth is None:
        return float("nan")
    return mask_recovery(masks, screen.ground_truth["masks"])["f1"]


def train(model, screen, train_idx, *, steps, lr, batch_size, particles, seed, log_every):
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-6)
    loader = MinibatchLoader(screen, train_idx, batch_size=batch_size, shuffle=True, seed=seed,
                             drop_last=True)
    gen = torch.Generator().manual_seed(seed)
    step, epoch, t0 = 0, 0, time.perf_counter()
    history = []
    model.train()
    while step < steps:
        loader.set_epoch(epoch)
        for batch in loader:
            out = model.loss(batch, particles=particles, generator=gen)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            step += 1
            if step % log_every == 0 or step == steps:
                loss = float(out["loss"].detach())
                history.append((step, loss))
                print(f"    step {step:5d}  loss {loss:9.2f}  mask F1 {_f1(model, screen):.3f}  "
                      f"{time.perf_counter() - t0:6.1f} s", flush=True)
            if step >= steps:
                break
        epoch += 1
    return time.perf_counter() - t0, history


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", type=int, default=20000)
    ap.add_argument("--genes", type=int, default=1000)
    ap.add_argument("--perturbations", type=int, default=50)
    ap.add_argument("--mask-prob", type=float, default=0.1)
    ap.add_argument("--latent", type=int, default=10)
    ap.add_argument("--models", default=DEFAULT_MODELS,
                    help=f"comma-separated model:guide pairs (default {DEFAULT_MODELS})")
    ap.add_argument("--steps", type=int, default=1500, help="optimiser steps per model")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--particles", type=int, default=5)
    ap.add_argument("--iwelbo-particles", type=int, default=100)
    ap.add_argument("--ate-particles", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--model-kwargs", default=json.dumps(DEFAULT_KWARGS),
                    help="JSON {model name: {build_model option: value}} (default: "
                         f"{json.dumps(DEFAULT_KWARGS)}); '{{}}' gives the paper's defaults")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--save", default=None,
                    help="directory receiving each trained model's config and weights")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    t0 = time.perf_counter()
    adata = simulate_screen(n_cells=args.cells, n_genes=args.genes,
                            n_perturbations=args.perturbations, mask_prob=args.mask_prob,
                            n_latent=args.latent, seed=args.seed)
    screen = load_screen(adata)
    parts = split_indices(make_split(screen, "random", seed=args.seed))
    tr, te = parts["train"], parts["test"]
    mean, std = gene_log1p_stats(screen, tr)
    counts = perturbation_cell_counts(screen.dosage, tr)
    print(f"simulated {screen.n_cells} cells x {screen.n_genes} genes, {screen.n_perturbations} "
          f"perturbations, {int(np.asarray(screen.ground_truth['masks']).sum())} true mask "
          f"entries ({time.perf_counter() - t0:.1f} s); train {tr.size}, test {te.size}")

    extra_all = json.loads(args.model_kwargs)
    results = []
    for spec in args.models.split(","):
        name, guide = spec.split(":")
        kwargs = dict(extra_all.get(name, {}))
        if name == "svae_plus":
            kwargs.update(svae_plus_labels(screen.dosage[tr]))
        torch.manual_seed(args.seed)
        model = build_model(name, guide, n_genes=screen.n_genes,
                            n_perturbations=screen.n_perturbations, n_latent=args.latent,
                            gene_log1p_mean=mean, gene_log1p_std=std, perturbation_counts=counts,
                            **kwargs)
        print(f"== {name}/{guide}")
        seconds, _ = train(model, screen, tr, steps=args.steps, lr=args.lr,
                           batch_size=args.batch_size, particles=args.particles, seed=args.seed,
                           log_every=max(1, args.steps // 10))
        if args.save:
            Path(args.save).mkdir(parents=True, exist_ok=True)
            torch.save({"config": model.config, "state_dict": model.state_dict()},
                       Path(args.save) / f"{name}_{guide}.pt")
        t1 = time.perf_counter()
        metrics = evaluate_model(model, screen, te, iwelbo_particles=args.iwelbo_particles,
                                 ate_particles=args.ate_particles, seed=args.seed)
        row = {"model": name, "guide": guide, "options": kwargs if name != "svae_plus" else {},
               "steps": args.steps, "train_seconds": round(seconds, 1),
               "eval_seconds": round(time.perf_counter() - t1, 1)}
        row.update({k: metrics.get(k) for k in ("test_iwelbo", "ate_pearson", "ate_pearson_top20",
                                                 "mask_f1", "mask_precision", "mask_recall")})
        results.append(row)
        print("   ", json.dumps(row), flush=True)

    print("\nmodel/guide              test IWELBO  mask F1 (P / R)      ATE r (top20)   train s")
    for r in results:
        f1 = ("   -            " if r["mask_f1"] is None else
              f"{r['mask_f1']:.3f} ({r['mask_precision']:.2f}/{r['mask_recall']:.2f})")
        ate = (f"{r['ate_pearson']:.3f} ({r['ate_pearson_top20']:.3f})"
               if r["ate_pearson"] is not None else "-")
        print(f"{r['model'] + '/' + r['guide']:<24} {r['test_iwelbo']:11.2f}  {f1:<19}  "
              f"{ate:<15} {r['train_seconds']:7.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
