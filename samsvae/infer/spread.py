"""Spreading independent evaluation items over the processes of a group, and gathering them.

``comm`` is the process group of ``samsvae.train.distributed.init_from_env`` (rank,
world_size, all_gather_object) or None for one process, where both functions are trivial.
"""
from __future__ import annotations



def my_items(n_items: int, comm=None) -> range:
    """The items of this process: ``rank, rank + world_size, ...`` (all of them alone)."""
    rank, world = (0, 1) if comm is None else (comm.rank, comm.world_size)
    return range(rank, n_items, world)


def gather_in_order(comm, local: dict, n_items: int) -> list:
    """``{item: value}`` held by each rank -> ``[value of item 0, 1, ...]`` on every rank."""
    parts = [local] if comm is None else comm.all_gather_object(local)
    merged: dict = {}
    for part in parts:
        merged.update(part)
    missing = [j for j in range(n_items) if j not in merged]
    if missing:
        raise RuntimeError(f"items {missing[:5]} were computed by no rank (internal error)")
    return [merged[j] for j in range(n_items)]
