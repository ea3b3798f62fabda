"""Reproducible noise for evaluation: the same particle k always sees the same globals.

IWELBO draws the global variables "once as K particles, reused for every cell": the noise of
perturbation t in particle k must not depend on the batch (which other perturbations are
present, batch size) nor on how the K particles are chunked. Each particle k and each block of
``BLOCK`` consecutive perturbation ids gets its own ``torch.Generator`` seeded from
``(seed, k, block)``; a batch draws only the blocks holding its perturbations and keeps their
rows. Cost per particle: (blocks present x BLOCK x latent) numbers, at most T x latent, with no
(K, T, latent) tensor ever held.
"""
from __future__ import annotations

import numpy as np
import torch

from ..ops.masked_embedding import _UNIFORM_EPS

BLOCK = 1024
_GLOBAL, _LOCAL = 0, 1


def _generator(device, *key: int) -> torch.Generator:
    state = np.random.SeedSequence([int(k) & 0xFFFFFFFFFFFF for k in key]).generate_state(2, np.uint32)
    g = torch.Generator(device=device)
    g.manual_seed((int(state[0]) << 31) ^ int(state[1]))
    return g


def global_noise(seed: int, start: int, n: int, index: torch.Tensor, latent: int, *,
                 dtype, masked: bool):
    """Noise of particles ``start .. start+n-1`` for the perturbation ids ``index`` (U,).

    Returns ``eps`` (n, U, latent) standard normal and ``u`` (n, U, latent) uniform in
    (1e-6, 1 - 1e-6) (None when ``masked`` is False), laid out like
    :func:`samsvae.ops.draw_noise` so the model's sampling code can consume either.
    """
    device = index.device
    U = index.numel()
    eps = torch.empty(n, U, latent, dtype=dtype, device=device)
    u = torch.empty(n, U, latent, dtype=dtype, device=device) if masked else None
    if U == 0:
        return eps, u
    blocks = torch.div(index, BLOCK, rounding_mode="floor")
    present = torch.unique(blocks).tolist()
    positions = [torch.nonzero(blocks == b, as_tuple=True)[0] for b in present]
    rows = [index[pos] - b * BLOCK for b, pos in zip(present, positions)]
    for j in range(n):
        k = start + j
        for b, pos, r in zip(present, positions, rows):
            g = _generator(device, seed, _GLOBAL, k, b)
            block_eps = torch.randn(BLOCK, latent, dtype=dtype, device=device, generator=g)
            eps[j, pos] = block_eps[r]
            if masked:
                block_u = torch.rand(BLOCK, latent, dtype=dtype, device=device, generator=g)
                u[j, pos] = block_u[r].clamp(_UNIFORM_EPS, 1.0 - _UNIFORM_EPS)
    return eps, u


def local_noise(seed: int, start: int, n: int, cell_key: int, cells: int, latent: int, *,
                dtype, device) -> torch.Tensor:
    """(n, cells, latent) standard normal noise of particles ``start .. start+n-1`` for a batch.

    ``cell_key`` (e.g. the screen row of the batch's first cell) varies the noise between
    batches; the noise of particle k does not depend on the chunking of the particles.
    """
    out = torch.empty(n, cells, latent, dtype=dtype, device=device)
    for j in range(n):
        g = _generator(device, seed, _LOCAL, start + j, cell_key, cells)
        out[j] = torch.randn(cells, latent, dtype=dtype, device=device, generator=g)
    return out
