"""Figures for a trained run: perturbation x latent masks, model vs data ATE, training curves.

Each function returns a :class:`matplotlib.figure.Figure` (shown inline in Jupyter) and writes
a PNG when ``path`` is given. Figures are built without ``pyplot``, so nothing here changes the
user's matplotlib backend and everything works headless (rendering goes through Agg).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .ate import pearson
from .masks import UNTRAINED_MASK_TOLERANCE, masks_untrained


def _figure(width: float, height: float):
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), layout="constrained")


def _save(fig, path) -> None:
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)


def mask_order(masks: np.ndarray):
    """Row and column order that makes a mask matrix readable.

    Rows (perturbations) follow the leaf order of an average-linkage clustering of their mask
    probabilities, so perturbations using the same latent dimensions sit together; columns
    (latent dimensions) are sorted by the first row that uses them (q > 0.5), then by how many
    rows use them, which gives the block-diagonal look of the paper's Figure 2.
    """
    masks = np.asarray(masks, dtype=np.float64)
    rows = np.arange(masks.shape[0])
    if masks.shape[0] > 2:
        from scipy.cluster.hierarchy import leaves_list, linkage, optimal_leaf_ordering
        from scipy.spatial.distance import pdist
        dist = pdist(masks, metric="euclidean")
        if np.all(np.isfinite(dist)) and dist.max() > 0:
            tree = linkage(dist, method="average")
            rows = leaves_list(optimal_leaf_ordering(tree, dist))
    active = masks[rows] > 0.5
    first = np.where(active.any(axis=0), active.argmax(axis=0), masks.shape[0])
    cols = np.lexsort((-active.sum(axis=0), first))
    return rows, cols


def plot_mask_heatmap(masks, perturbations: Sequence[str], *, path=None, title=None,
                      max_labels: int = 60):
    """Heatmap of the guide's mask probabilities q(m_tk = 1).

    Args:
        masks: (T, L) probabilities in [0, 1] (perturbations x latent dimensions).
        perturbations: (T,) names of the rows.
        path: PNG to write (optional).
        max_labels: row names are printed when T is at most this.
    """
    masks = np.asarray(masks, dtype=np.float64)
    if masks.ndim != 2 or masks.shape[0] != len(perturbations):
        raise ValueError(f"masks must be (perturbations, latent) = ({len(perturbations)}, L), "
                         f"got {masks.shape}")
    rows, cols = mask_order(masks)
    n_t, n_l = masks.shape
    fig = _figure(min(3.5 + 0.12 * n_l, 16), min(2.0 + 0.18 * n_t, 20))
    ax = fig.add_subplot()
    im = ax.imshow(masks[rows][:, cols], aspect="auto", interpolation="nearest",
                   cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xlabel("latent dimension (sorted)")
    ax.set_ylabel("perturbation (clustered)")
    if n_t <= max_labels:
        ax.set_yticks(np.arange(n_t), [str(perturbations[r]) for r in rows], fontsize=7)
    if n_l <= 40:
        ax.set_xticks(np.arange(n_l), [str(c) for c in cols], fontsize=7)
    fig.colorbar(im, ax=ax, label="q(mask = 1)", shrink=0.8)
    active = (masks > 0.5).sum(axis=1)
    if title is None:
        title = (f"Perturbation masks\n{n_t} perturbations x {n_l} latent dims, median "
                 f"{np.median(active):.0f} dims with q(m) > 0.5 per perturbation")
        if masks_untrained(masks):
            title += (f"\nmasks untrained: every q(m) within {UNTRAINED_MASK_TOLERANCE} of its "
                      "initial 0.5")
    ax.set_title(title, fontsize=9, color="tab:red" if masks_untrained(masks) else "black")
    _save(fig, path)
    return fig


# -- average treatment effects --------------------------------------------------------------

def plot_ate_scatter(model_ate, data_ate, labels: Sequence[str], *, path=None,
                     per_perturbation: bool = False, max_panels: int = 12):
    """Model vs data average treatment effect, one point per (perturbation, gene).

    Args:
        model_ate: (n_labels, G) model ATE (log2 normalised expression, vs control).
        data_ate: (n_labels, G) empirical ATE of held-out cells.
        labels: (n_labels,) perturbation labels.
        per_perturbation: one panel per label (the ``max_panels`` with the largest data
            effect) instead of one pooled panel.
    """
    model_ate = np.asarray(model_ate, dtype=np.float64)
    data_ate = np.asarray(data_ate, dtype=np.float64)
    if model_ate.shape != data_ate.shape or model_ate.shape[0] != len(labels):
        raise ValueError(f"model_ate {model_ate.shape} and data_ate {data_ate.shape} must both "
                         f"be (n_labels={len(labels)}, genes)")
    if not per_perturbation:
        fig = _figure(5.0, 4.6)
        ax = fig.add_subplot()
        _ate_panel(ax, model_ate, data_ate, s=4)
        per_label = [pearson(m, d) for m, d in zip(model_ate, data_ate)]
        mean_r = np.nanmean(per_label) if np.isfinite(per_label).any() else float("nan")
        ax.set_title(f"ATE of {len(labels)} perturbations: mean per-perturbation r = "
                     f"{mean_r:.3f} (ate_pearson)\npooled r over all points = "
                     f"{pearson(model_ate, data_ate):.3f}", fontsize=9)
        _save(fig, path)
        return fig
    strength = np.nanmean(np.abs(data_ate), axis=1)
    order = np.argsort(-np.nan_to_num(strength, nan=-1.0))[:max_panels]
    n = len(order)
    ncol = min(4, max(n, 1))
    nrow = max(1, -(-n // ncol))
    fig = _figure(3.0 * ncol, 2.8 * nrow)
    axes = fig.subplots(nrow, ncol, squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.set_axis_off()
    for ax, i in zip(axes.ravel(), order):
        _ate_panel(ax, model_ate[i], data_ate[i], s=6)
        ax.set_title(f"{labels[i]}: r = {pearson(model_ate[i], data_ate[i]):.2f}", fontsize=8)
    fig.suptitle("Model vs data ATE per perturbation (largest effects)", fontsize=9)
    _save(fig, path)
    return fig


def _ate_panel(ax, model_ate, data_ate, *, s):
    x, y = np.ravel(data_ate), np.ravel(model_ate)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    ax.scatter(x, y, s=s, alpha=0.35, linewidths=0, color="tab:blue", rasterized=True)
    if x.size:
        lo = float(min(x.min(), y.min()))
        hi = float(max(x.max(), y.max()))
        pad = 0.05 * (hi - lo) if hi > lo else 0.1
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.5", lw=0.8, ls="--")
    ax.axhline(0, color="0.85", lw=0.6, zorder=0)
    ax.axvline(0, color="0.85", lw=0.6, zorder=0)
    ax.set_xlabel("data ATE (log2 norm. expr.)", fontsize=8)
    ax.set_ylabel("model ATE", fontsize=8)
    ax.tick_params(labelsize=7)


def plot_label_metrics(per_label, *, metric: str = "ate_pearson", rows: Sequence[str] = (),
                       path=None, max_labels: int = 60):
    """Per-label ``metric`` of the model and each baseline: one column of points per label.

    Args:
        per_label: DataFrame indexed by label with columns ``{metric}_{row}`` (as
            ``samsvae.infer.harness.compare_with_baselines`` returns).
        rows: the rows to draw (default: every ``{metric}_*`` column).
    """
    cols = [f"{metric}_{r}" for r in rows] if rows else \
        [c for c in per_label.columns if c.startswith(f"{metric}_")
         and not c[len(metric) + 1:].startswith("top")]
    names = [c[len(metric) + 1:] for c in cols]
    labels = [str(l) for l in per_label.index][:max_labels]
    n = len(labels)
    fig = _figure(min(max(6.0, 4.0 + 0.35 * n), 18), 4.2)
    ax = fig.add_subplot()
    x = np.arange(n)
    markers = "o^sDvP*X"
    width = 0.6 / max(len(cols), 1)
    for k, (col, name) in enumerate(zip(cols, names)):
        y = np.asarray(per_label[col], dtype=np.float64)[:n]
        big = name == "model"
        ax.scatter(x + (k - (len(cols) - 1) / 2) * width, y, s=36 if big else 20,
                   marker=markers[k % len(markers)], label=name, zorder=3 if big else 2,
                   color="black" if big else None, alpha=1.0 if big else 0.8)
    ax.axhline(0, color="0.8", lw=0.6, zorder=0)
    ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(metric)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax.set_title(f"{metric} per label, model vs baselines ({n} labels)\n(split_half: the data "
                 "against itself, the noise ceiling)", fontsize=9)
    _save(fig, path)
    return fig


# -- training curves ------------------------------------------------------------------------

def plot_training_curves(history: dict, *, path=None, smooth: Optional[int] = None):
    """Training loss (negative ELBO per cell) and validation ELBO against the step.

    Args:
        history: ``{"train": {"step": [...], "loss": [...]}, "val": {"step": [...],
            "elbo": [...]}}`` as written to ``history.json``.
        smooth: moving-average window for the training loss (default: about 1/50 of the run).
    """
    train = history.get("train") or {}
    val = history.get("val") or {}
    steps = np.asarray(train.get("step", []), dtype=np.float64)
    loss = np.asarray(train.get("loss", []), dtype=np.float64)
    if steps.size == 0:
        raise ValueError("the history holds no training step; nothing to plot")
    fig = _figure(9.0, 3.4)
    ax_train, ax_val = fig.subplots(1, 2)
    window = smooth or max(1, steps.size // 50)
    ax_train.plot(steps, loss, color="tab:blue", alpha=0.25 if window > 1 else 1.0, lw=0.8,
                  label="per step")
    if window > 1 and steps.size >= window:
        kernel = np.ones(window) / window
        ax_train.plot(steps[window - 1:], np.convolve(loss, kernel, mode="valid"),
                      color="tab:blue", lw=1.5, label=f"mean of {window}")
        ax_train.legend(fontsize=7)
    ax_train.set_xlabel("step")
    ax_train.set_ylabel("training loss (-ELBO, nats/cell)")
    _robust_ylim(ax_train, loss)
    ax_train.set_title("Training loss", fontsize=9)
    vsteps = np.asarray(val.get("step", []), dtype=np.float64)
    velbo = np.asarray(val.get("elbo", []), dtype=np.float64)
    if vsteps.size:
        ax_val.plot(vsteps, velbo, marker="o", ms=3, color="tab:orange", lw=1.2)
        best = int(np.nanargmax(velbo))
        ax_val.axvline(vsteps[best], color="0.6", lw=0.8, ls="--")
        ax_val.set_title(f"Validation ELBO (best {velbo[best]:.2f} at step "
                         f"{int(vsteps[best])})", fontsize=9)
        _robust_ylim(ax_val, velbo)
    else:
        ax_val.text(0.5, 0.5, "no validation", ha="center", va="center",
                    transform=ax_val.transAxes)
        ax_val.set_title("Validation ELBO", fontsize=9)
    ax_val.set_xlabel("step")
    ax_val.set_ylabel("ELBO (nats/cell)")
    _save(fig, path)
    return fig


def _robust_ylim(ax, values):
    # the first steps' loss is orders of magnitude above the rest: keep the curve readable
    v = values[np.isfinite(values)]
    if v.size < 10:
        return
    lo, hi = np.percentile(v, [1, 99])
    last = v[-max(1, v.size // 10):]
    lo, hi = min(lo, last.min()), max(hi, last.max())
    if hi > lo:
        pad = 0.05 * (hi - lo)
        ax.set_ylim(lo - pad, hi + pad)
