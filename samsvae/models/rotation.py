"""The sparsest orientation of the latent axes: an orthogonal R making ``effects @ R`` sparse.

SAMS-VAE's likelihood and its basal prior N(0, I) are unchanged when the latent space is
rotated (the decoder's first layer absorbs any orthogonal R), so only the mask prior
Bernoulli(alpha) tells the latent axes apart: it prefers the orientation in which the
perturbation effects ``e_t * m_t`` need the fewest mask entries. Gradient training finds that
orientation slowly (every network and embedding must turn together, driven by a few nats per
mask entry). :func:`sparse_rotation` finds it directly, minimising the L1 norm of the rotated
effects (the convex surrogate of the number of non-zero entries) over the orthogonal group;
:meth:`SAMSVAE.rotate_to_sparse_basis` then re-expresses embeddings and masks in that basis,
keeping the mean perturbation effects the decoder sees.

Cost: ``2 * iters`` steps of a (T, L) x (L, L) product and an (L, L) matrix exponential, in
float64 on the CPU: about a second at T = 50, L = 10, on the order of a minute at T = 10,000,
L = 100 (then rotate rarely).
"""
from __future__ import annotations

import torch

SMOOTHING = 1e-3     # |x| ~ sqrt(x^2 + (SMOOTHING * rms)^2): differentiable at 0
ROTATION_ITERS = 1500
ROTATION_LR = 0.02


def _smooth_l1(x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.sqrt(x * x + eps * eps).sum()


def varimax(effects: torch.Tensor, *, iters: int = 500, tol: float = 1e-10) -> torch.Tensor:
    """(L, L) orthogonal rotation maximising the varimax criterion of ``effects @ R``.

    Rows are normalised to unit length first (Kaiser normalisation), so every perturbation
    counts equally whatever the size of its effect. Used as a second starting point of the L1
    search.
    """
    x = effects / effects.norm(dim=1, keepdim=True).clamp_min(1e-12)
    n, k = x.shape
    rot = torch.eye(k, dtype=x.dtype, device=x.device)
    prev = 0.0
    for _ in range(iters):
        lo = x @ rot
        target = lo ** 3 - lo * (lo * lo).sum(0, keepdim=True) / n
        u, s, vt = torch.linalg.svd(x.T @ target)
        rot = u @ vt
        cur = float(s.sum())
        if cur <= prev * (1.0 + tol):
            break
        prev = cur
    return rot


def sparse_rotation(effects: torch.Tensor, *, iters: int = ROTATION_ITERS,
                    lr: float = ROTATION_LR) -> torch.Tensor:
    """Orthogonal R (L, L) minimising ``sum |effects @ R|`` (smoothed L1).

    Args:
        effects: (T, L) perturbation effects (e.g. guide means of ``e_t * m_t``), any units.
        iters, lr: Adam steps (learning rate decayed linearly to 0, so the non-smooth
            objective settles) on the rotation's skew-symmetric generator, from each of two
            starts: the current axes and the varimax rotation. The rotation with the lower L1
            norm wins, and the current axes are kept unless a start improves on them.

    Returns:
        (L, L) float64 CPU tensor, ``R @ R.T = I``. About a second at T = 50, L = 10.
    """
    x = effects.detach().to("cpu", torch.float64)
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"effects must be a non-empty (T, L) matrix, got {tuple(x.shape)}")
    L = x.shape[1]
    eps = SMOOTHING * float(x.pow(2).mean().sqrt().clamp_min(1e-12))
    best, best_loss = torch.eye(L, dtype=torch.float64), _smooth_l1(x, eps).item()
    with torch.enable_grad():
        for start in (torch.eye(L, dtype=torch.float64), varimax(x)):
            gen = torch.zeros(L, L, dtype=torch.float64, requires_grad=True)
            opt = torch.optim.Adam([gen], lr=lr)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - i / iters)
            for _ in range(iters):
                loss = _smooth_l1(x @ (start @ torch.matrix_exp(gen - gen.T)), eps)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
            u, _, vt = torch.linalg.svd((start @ torch.matrix_exp(gen - gen.T)).detach())
            rot = u @ vt                                  # re-orthogonalise (rounding)
            value = _smooth_l1(x @ rot, eps).item()
            if value < best_loss:
                best, best_loss = rot, value
    return best
