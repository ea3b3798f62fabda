"""How much of the additive baseline's score on held-out doubles is shared control noise.

The doubles' data ATE and the singles it is predicted from are both label means minus a control
mean. Measured against the same control cells, the two share that mean's noise; measured
against disjoint halves of the controls, they do not. Prints the additive baseline's
ATE-Pearson (all genes / top-20) both ways, over ``--halvings`` random halvings::

    python benchmarks/control_reference.py ../shared/data/norman2019_k562_crispra.h5ad
"""
import argparse

import numpy as np

from samsvae.data import load_screen, make_split, split_indices
from samsvae.infer import data_ate
from samsvae.infer.harness import label_metrics


def additive_scores(screen, train_perturbed, test, ref_singles, ref_doubles):
    """Mean (all genes, top-20) r of the additive baseline built against ``ref_singles``
    controls, scored against the doubles' ATE measured against ``ref_doubles`` controls."""
    singles, s_ate = data_ate(screen, np.concatenate([train_perturbed, ref_singles]))
    doubles, d_ate = data_ate(screen, np.concatenate([test, ref_doubles]))
    pos = {label: i for i, label in enumerate(singles)}
    pred = np.stack([sum(s_ate[pos[p]] for p in label.split("+")) for label in doubles])
    m = label_metrics(pred, d_ate)
    return np.nanmean(m["ate_pearson"]), np.nanmean(m["ate_pearson_top20"]), len(doubles)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data")
    ap.add_argument("--halvings", type=int, default=10)
    args = ap.parse_args(argv)
    screen = load_screen(args.data)
    parts = split_indices(make_split(screen, "ood_combinations", control_test_fraction=0.0))
    is_control = np.asarray(screen.is_control, dtype=bool)
    train_perturbed = parts["train"][~is_control[parts["train"]]]
    controls = np.flatnonzero(is_control)
    same, independent = [], []
    for seed in range(args.halvings):
        c = np.random.default_rng(seed).permutation(controls)
        a, b = c[: c.size // 2], c[c.size // 2:]
        same.append(additive_scores(screen, train_perturbed, parts["test"], b, b))
        independent.append(additive_scores(screen, train_perturbed, parts["test"], a, b))
    n = same[0][2]
    for name, rows in (("same control half", same), ("independent halves", independent)):
        r = np.mean([x[:2] for x in rows], axis=0)
        print(f"additive, {name:18s} ATE-Pearson {r[0]:.3f} top-20 {r[1]:.3f} "
              f"({n} held-out doubles, {controls.size // 2} control cells per half, "
              f"{args.halvings} halvings)")


if __name__ == "__main__":
    main()
