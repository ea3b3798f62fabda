"""Streamed importance-weighted estimation: log-mean-exp over particle chunks.

    iwelbo_i = logsumexp_k log w_ik - log K

evaluated chunk by chunk with an online log-sum-exp, so memory is that of one chunk whatever K.
"""
from __future__ import annotations

import math
from typing import Callable

import torch


class OnlineLogSumExp:
    """Running ``logsumexp`` over the first dimension of successive ``(n, ...)`` chunks."""

    def __init__(self):
        self.max = None
        self.sum = None  # sum of exp(x - max)
        self.count = 0

    def update(self, chunk: torch.Tensor) -> None:
        if chunk.shape[0] == 0:
            return
        cmax = chunk.max(dim=0).values
        if self.max is None:
            new_max = cmax
            self.sum = torch.zeros_like(cmax)
        else:
            new_max = torch.maximum(self.max, cmax)
        # -inf - -inf would be NaN: treat all--inf columns as contributing zero
        safe_max = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
        if self.max is not None:
            self.sum = self.sum * torch.exp(self.max - safe_max)
        self.sum = self.sum + torch.exp(chunk - safe_max).sum(dim=0)
        self.max = safe_max
        self.count += chunk.shape[0]

    def result(self) -> torch.Tensor:
        if self.max is None:
            raise ValueError("no chunk was given")
        return self.max + torch.log(self.sum)


def iwelbo(log_weight_fn: Callable[[int, int], torch.Tensor], particles: int, chunk: int) -> torch.Tensor:
    """Importance-weighted ELBO ``logsumexp_k log w_k - log K`` streamed over particle chunks.

    Args:
        log_weight_fn: ``fn(start, n) -> (n, ...)`` log importance weights of particles
            ``start .. start + n - 1`` (e.g. ``(n, cells)``); called ``ceil(K / chunk)`` times.
        particles: K, the number of importance samples.
        chunk: particles evaluated at once; peak memory is that of one chunk.

    Returns:
        ``(...)`` the IWELBO per element (nats).
    """
    if particles < 1 or chunk < 1:
        raise ValueError(f"particles and chunk must be >= 1, got {particles}, {chunk}")
    acc = OnlineLogSumExp()
    for start in range(0, particles, chunk):
        n = min(chunk, particles - start)
        lw = log_weight_fn(start, n)
        if lw.shape[0] != n:
            raise ValueError(f"log_weight_fn({start}, {n}) returned {lw.shape[0]} particles, expected {n}")
        acc.update(lw)
    return acc.result() - math.log(particles)
