"""Scientific check on a simulated screen: mask recovery and test IWELBO of the model family.

Acceptance (the issue): on a simulated screen with 20,000 cells, 1,000 genes, 50 perturbations,
mask probability 0.1 and latent dimension 10, ``sams_vae``/``corr_both`` recovers the true masks
with F1 >= 0.8 and its test IWELBO is at least that of ``cpa_vae`` and ``cvae`` trained with the
same number of steps.

    OMP_NUM_THREADS=1 python benchmarks/sim_recovery.py --lr 3e-3 --steps 4000   # acceptance
    OMP_NUM_THREADS=1 python benchmarks/sim_recovery.py                       # brief's lr 3e-4
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
* The leftover rotation is a symmetry: likelihood and basal prior do not change when the latent
  space is rotated, so gradient training turns the axes only as fast as a few nats per mask
  entry pull them. ``sparse_rotation_every=300`` rotates the axes directly to the orientation
  minimising the L1 norm of the mean effects (``samsvae/models/rotation.py``) and re-expresses
  embeddings and masks there. On the 300-gene screen (``--genes 300 --steps 1200 --lr 3e-3
  --models sams_vae:corr_both``, the options above plus ``sparse_rotation_every=300``) F1 went
  from ~0.55 to 0.74 (mask_prior_weight 0.03), 0.81 (0) and 0.88 (0.01).
* On the 1,000-gene screen two more things showed up. (1) Small true effects (|e| < 0.7) were
  missed with q(m) ~ 0: an entry switched off early has its embedding at the prior mean 0,
  where neither the embedding (gradient times the sampled m = 0) nor the mask
  (straight-through gradient times e = 0) can learn that it is needed.
  ``sparse_rotation_reopen=0.5`` raises every q(m) to 0.5 after each rotation so that such
  entries are tried again. (2) With mask_prior_weight 0.01 the model adds confident false
  entries (|mean| 0.3-1, often one "junk" axis used by most perturbations, with the control
  cells' basal mean off-centre on it) that buy likelihood the learned decoder cannot get
  otherwise; 0.03 removes them but also the small true effects (|e| < 0.7). 0.02 is the
  compromise. Rotations stop at step 3,000 (``sparse_rotation_until``) so the masks settle.
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
  sams_vae/corr_both R1  3e-3    3000   -1689.86     0.637 (0.54 / 0.77)   0.569
  cpa_vae/mean_field     3e-3    3000   -1691.47     -                     0.336
  cvae/mean_field        3e-3    3000   -1696.11     -                     0.521
  sams_vae/corr_both R2  3e-3    4000   -1690.89     0.814 (0.91 / 0.74)   0.575
  cpa_vae/mean_field     3e-3    4000   -1692.80     -                     0.356
  cvae/mean_field        3e-3    4000   -1697.06     -                     0.541
  =====================  ======  =====  ===========  ====================  ========

  The rows above R1 use the earlier options (``global_param_scale=10, basal_covariance="full",
  mask_prior_weight=0.03``). R1 adds ``sparse_rotation_every=300`` with
  ``mask_prior_weight=0.01`` (``--steps 3000 --lr 3e-3 --model-kwargs '{"sams_vae":
  {"global_param_scale": 10, "basal_covariance": "full", "mask_prior_weight": 0.01,
  "sparse_rotation_every": 300}, "cpa_vae": {"global_param_scale": 10, "basal_covariance":
  "full"}}'``, rotating until the end); R2 is ``DEFAULT_KWARGS`` below (``mask_prior_weight=0.02,
  sparse_rotation_every=300, sparse_rotation_until=3000, sparse_rotation_reopen=0.5``), the
  acceptance run (``sparse_rotation_until`` is 3/4 of ``--steps``)::

      OMP_NUM_THREADS=1 python benchmarks/sim_recovery.py --lr 3e-3 --steps 4000

  R2 meets the bar: F1 0.814 >= 0.8 and a test IWELBO above both baselines', in 276 s of
  training for sams_vae (the whole command: 12.6 and 14.0 minutes in two identical runs on one
  core, shared machine). Through the command line (``samsvae simulate acc.h5ad --cells 20000
  --genes 1000 --perturbations 50 --mask-prob 0.1 --latent 10 --seed 0``; ``samsvae train
  acc.h5ad --out RUN --guide corr_both --latent 10 --max-steps 4000 --lr 3e-3
  --global-param-scale 10 --basal-covariance full --mask-prior-weight 0.02
  --sparse-rotation-every 300 --sparse-rotation-until 3000 --sparse-rotation-reopen 0.5``) the
  last weights (``checkpoints/last.pt``) give F1 0.860 (1.00 / 0.75), but ``model.pt`` holds
  the best-validation weights of step 1,568, mid rotation phase: F1 0.793 (0.86 / 0.74), test
  IWELBO -1688.46 (``samsvae evaluate RUN --iwelbo-particles 100 --ate-particles 500``); see
  ``PerturbationModel.checkpoint_selectable``. The same options on
  another screen (``--steps 4000 --lr 3e-3 --seed 1 --models
  sams_vae:corr_both,cpa_vae:mean_field``): F1 0.833 (1.00 / 0.71), test IWELBO -1720.64
  against cpa_vae's -1721.58. Other runs on the
  acceptance screen (sams_vae only, IWELBO with 20 particles): rotations with
  mask_prior_weight 0.03, 1,500 steps: F1 0.656 (0.68 / 0.63); then 1,500 more steps at 0.01:
  0.723 (0.80 / 0.66); 0.01 with reopening, 3,000 steps: 0.671 (0.59 / 0.78); 0.03 while
  rotating until 2,400 then 0.01, 5,000 steps: 0.681 (0.62 / 0.75). The remaining misses of
  R2: 17 true entries, 16 of them with |e| <= 0.54; 5 false entries.
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
# With sparse_rotation_every and no sparse_rotation_until, rotations stop at ROTATION_PHASE of
# the steps (3,000 of 4,000) so that the masks settle before the end.
ROTATION_PHASE = 0.75
DEFAULT_KWARGS = {
    "sams_vae": {"global_param_scale": 10.0, "basal_covariance": "full",
                 "mask_prior_weight": 0.02, "sparse_rotation_every": 300,
                 "sparse_rotation_reopen": 0.5},
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
        if kwargs.get("sparse_rotation_every") and "sparse_rotation_until" not in kwargs:
            kwargs["sparse_rotation_until"] = int(ROTATION_PHASE * args.steps)
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
