"""Mask recovery on simulated screens: how well learned masks match the true sparse structure.

Latent dimensions are identifiable only up to a permutation, so learned dimensions are first
matched one-to-one to true dimensions (Hungarian matching,
``scipy.optimize.linear_sum_assignment``)
maximising the number of perturbations on which the binary masks agree (both 1 or both 0);
precision, recall and F1 are then computed on the matched pairs. True dimensions left unmatched
(when the model has fewer latent dimensions) count as missed; learned dimensions left unmatched
(when it has more) are ignored.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


def _as_numpy(a) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def mask_recovery(learned, true) -> dict:
    """Compare learned mask probabilities with true binary masks.

    Args:
        learned: (T, L) probabilities q(m = 1) (binarised at > 0.5). Rows holding NaN (e.g. an
            SVAE+ perturbation seen only in combinations) are left out of the comparison.
        true: (T, L_true) true masks (non-zero = active), rows aligned with ``learned``.

    Returns:
        ``{"f1", "precision", "recall", "tp", "fp", "fn", "matching": [(learned_dim,
        true_dim), ...], "n_perturbations": rows compared}``. Precision is 0 when nothing is
        predicted active; recall is 0 when nothing is truly active.
    """
    lp, tm = _as_numpy(learned), _as_numpy(true)
    if lp.ndim != 2 or tm.ndim != 2 or lp.shape[0] != tm.shape[0]:
        raise ValueError(f"learned (T, L) and true (T, L_true) masks need the same number of rows "
                         f"(perturbations in the same order), got {lp.shape} and {tm.shape}")
    keep = ~np.isnan(lp).any(axis=1)
    lb = (lp[keep] > 0.5).astype(np.float64)
    tb = (tm[keep] != 0).astype(np.float64)
    agreement = lb.T @ tb + (1.0 - lb).T @ (1.0 - tb)              # (L, L_true)
    rows, cols = linear_sum_assignment(agreement, maximize=True)
    tp = float(sum(lb[:, j] @ tb[:, k] for j, k in zip(rows, cols)))
    fp = float(sum(lb[:, j] @ (1.0 - tb[:, k]) for j, k in zip(rows, cols)))
    fn = float(tb.sum() - tp)
    precision = tp / (tp + fp) if tp + fp > 0 else 0.0
    recall = tp / (tp + fn) if tp + fn > 0 else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"f1": f1, "precision": precision, "recall": recall, "tp": int(tp), "fp": int(fp),
            "fn": int(fn), "matching": [(int(j), int(k)) for j, k in zip(rows, cols)],
            "n_perturbations": int(keep.sum())}


UNTRAINED_MASK_TOLERANCE = 0.1


def masks_untrained(masks, *, initial: float = 0.5,
                    tol: float = UNTRAINED_MASK_TOLERANCE) -> bool:
    """True when every mask probability q(m = 1) is still within ``tol`` of its initial value
    ``initial`` (the guide starts at 0.5): the masks have not been trained, so counts such as
    "q(m) > 0.5" say nothing about the perturbations."""
    q = _as_numpy(masks)
    return bool(q.size) and bool(np.all(np.abs(q - initial) <= tol))
