"""Reproducible noise for evaluation: the same particle k always sees the same globals.

IWELBO draws the global variables "once as K particles, reused for every cell": the noise of
perturbation t in particle k must not depend on the batch (which other perturbations are
present, batch size) nor on how the K particles are chunked. The global noise is therefore a
counter-based hash of ``(seed, particle k, perturbation id t, latent index l, stream)``
(murmur3's 32-bit finaliser, chained): a batch computes only its U perturbations' numbers,
vectorised over (particles, U, latent), with no generator per particle or id range and no
(K, T, latent) tensor ever held. Local (per-cell) noise uses one seeded ``torch.Generator``
per particle and batch.
"""
from __future__ import annotations

import numpy as np
import torch

from ..ops.embedding import UNIFORM_EPS

# Perturbation ids are independent streams; BLOCK is the id range tests use to check that ids
# far apart (other blocks of the former block-wise generator) are keyed independently too.
BLOCK = 1024
_GLOBAL, _LOCAL = 0, 1
_EPS_A, _EPS_B, _MASK_U = 0x3C6EF372, 0x1B873593, 0x5BD1E995   # stream constants
_M32 = 0xFFFFFFFF


def _generator(device, *key: int) -> torch.Generator:
    state = np.random.SeedSequence([int(k) & 0xFFFFFFFFFFFF for k in key]).generate_state(2, np.uint32)
    g = torch.Generator(device=device)
    g.manual_seed((int(state[0]) << 31) ^ int(state[1]))
    return g


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for int64 tensors holding uint32 values, without int64 overflow
    (the product is split into 16-bit halves of x)."""
    lo = (x & 0xFFFF) * c
    hi = ((x >> 16) * c) & 0xFFFF
    return (lo + (hi << 16)) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's finaliser: a bijective avalanche mix of uint32 values (held in int64)."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _uniform(key: torch.Tensor, stream: int) -> torch.Tensor:
    """float64 uniforms in (0, 1) (never 0 or 1) from uint32 keys, one stream per constant."""
    h = _fmix32(_fmix32(key ^ stream) ^ 0x68E31DA4)
    return (h.to(torch.float64) + 0.5) * (1.0 / 2 ** 32)


def _keys(seed: int, start: int, n: int, index: torch.Tensor, latent: int) -> torch.Tensor:
    """(n, U, latent) uint32 keys of (seed, particle, perturbation id, latent index)."""
    device = index.device
    k = torch.arange(start, start + n, device=device, dtype=torch.int64)
    base = _fmix32((k & _M32) ^ _fmix32(torch.full_like(k, (int(seed) * 0x9E3779B1 + _GLOBAL) & _M32)))
    t = _fmix32(index.to(torch.int64) & _M32)
    pk = _fmix32(base[:, None] ^ t[None, :])                                    # (n, U)
    l = _fmix32(torch.arange(latent, device=device, dtype=torch.int64) + 0x632BE5AB)
    return pk[:, :, None] ^ l[None, None, :]


def global_noise(seed: int, start: int, n: int, index: torch.Tensor, latent: int, *,
                 dtype, masked: bool):
    """Noise of particles ``start .. start+n-1`` for the perturbation ids ``index`` (U,).

    Returns ``eps`` (n, U, latent) standard normal (Box-Muller on two hashed uniforms) and
    ``u`` (n, U, latent) uniform in (1e-6, 1 - 1e-6) (None when ``masked`` is False), laid out
    like :func:`samsvae.ops.draw_noise` so the model's sampling code can consume either. Each
    number depends only on ``(seed, particle, perturbation id, latent index)``.
    """
    device = index.device
    if index.numel() == 0:
        eps = torch.empty(n, 0, latent, dtype=dtype, device=device)
        return eps, (torch.empty_like(eps) if masked else None)
    key = _keys(seed, start, n, index, latent)
    radius = torch.sqrt(-2.0 * torch.log(_uniform(key, _EPS_A)))
    eps = (radius * torch.cos((2.0 * np.pi) * _uniform(key, _EPS_B))).to(dtype)
    u = None
    if masked:
        u = _uniform(key, _MASK_U).clamp(UNIFORM_EPS, 1.0 - UNIFORM_EPS).to(dtype)
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
