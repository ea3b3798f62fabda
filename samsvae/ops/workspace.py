"""A reusable output buffer for the per-step tensors that are too big for malloc to recycle.

glibc serves allocations above its mmap threshold (at most 32 MiB, and ``mallopt`` does not
reliably change that inside a process that already holds torch's heap) with fresh pages, so a
``(P * C, G)`` logits tensor allocated anew every training step page-faults its whole size
(20,000 faults and ~20-30 ms for 82 MB at 5 x 512 x 8,000 on one core) and its first write runs
~10% slower than into memory the process already touched. The training head instead writes its
logits into a buffer kept from the previous step.

Reuse is safe by construction: the buffer is handed out again only when nothing else holds its
storage (the previous step's autograd graph has released it, i.e. its backward ran or the
graph was dropped). While a graph still holds it (``retain_graph``, several forwards before
one backward) a fresh tensor is allocated and becomes the kept one, so no live result is ever
overwritten. One buffer per thread is kept, so the memory held between steps is one step's
logits.
"""
from __future__ import annotations

import threading

import torch

_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _only_held_here(buf: torch.Tensor) -> bool:
    """True when ``buf``'s storage is referenced by ``buf`` alone (its views, autograd's saved
    tensors and other tensors on the storage all add references)."""
    if _storage_use_count is None:  # private API gone: never reuse (always correct)
        return False
    storage = buf.untyped_storage()  # this Python handle adds one reference
    return _storage_use_count(storage._cdata) <= 2


class Workspace:
    """``take(shape, dtype, device)`` -> an uninitialised tensor, reused across calls when free."""

    def __init__(self):
        self._local = threading.local()

    def take(self, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        shape = torch.Size(shape)
        buf = getattr(self._local, "buf", None)
        if (buf is not None and buf.shape == shape and buf.dtype == dtype
                and buf.device == torch.device(device) and _only_held_here(buf)):
            return buf.view(shape)
        buf = torch.empty(shape, dtype=dtype, device=device)
        self._local.buf = buf
        # callers get a view: whoever keeps it holds a storage reference, which blocks reuse
        return buf.view(shape)

    def release(self) -> None:
        """Drop this thread's kept buffer (its memory returns once no graph holds it)."""
        self._local.buf = None
