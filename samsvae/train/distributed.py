"""Data parallelism with ``torch.distributed``: process group, DDP trainer, distributed evaluation.

Launch with torchrun (one process per GPU, or several on a CPU machine)::

    torchrun --nproc-per-node 2 -m samsvae train DATA.h5ad --out RUN_DIR [--backed]
    torchrun --nnodes 2 --node-rank R --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
             --nproc-per-node 4 -m samsvae train DATA.h5ad --out RUN_DIR   # multi-node

What each piece does:

* :func:`init_from_env` joins the group torchrun describes (``WORLD_SIZE``, ``RANK``,
  ``LOCAL_RANK``): backend gloo on CPU, NCCL on CUDA (device ``cuda:LOCAL_RANK``), with a
  timeout on every collective so a hung peer ends the job with a message instead of a hang.
* The training cells are sharded by :class:`~samsvae.data.streaming.StreamingLoader`
  (``rank``/``world_size``): disjoint pieces covering the epoch, ``--batch-size`` is the
  global batch. The model's global terms use N_t over ALL training cells (every rank computes
  the same counts from the full obs) and the loss is scaled so that DDP's gradient average is
  the gradient of the mean ELBO over the global batch, whatever the local batch sizes.
* :class:`DistributedTrainer` wraps the model in ``DistributedDataParallel``; only rank 0
  writes checkpoints, logs and progress; checkpoints carry every rank's noise generator so a
  resumed run (``--resume``, same number of processes) continues exactly.
* Evaluation takes the same ``comm`` (``samsvae.infer.evaluate_model(..., comm=comm)``): it
  deals batches of cells and label groups to the ranks round robin and gathers the results in
  order, so values and order equal the single-process evaluation of the same cells.

A rank that dies (exception, OOM kill) makes the others' next collective fail (gloo/NCCL
report the closed connection, or the timeout expires); they stop with
:class:`DistributedFailure` naming the step and how to resume, and torchrun tears the job down.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import inspect
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import load_checkpoint_with_fallback
from .trainer import Trainer, rank_seed

DEFAULT_TIMEOUT_S = 900
TIMEOUT_ENV = "SAMSVAE_DIST_TIMEOUT"


class DistributedFailure(RuntimeError):
    """A collective failed: another rank died or stopped answering."""


@dataclass
class TorchComm:
    """The process group as the data layer sees it (rank, size, object gathers, barrier)."""
    rank: int
    world_size: int
    device: torch.device
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_gather_object(self, obj) -> list:
        out = [None] * self.world_size
        with collective_guard(self, "gathering results"):
            dist.all_gather_object(out, obj)
        return out

    def barrier(self, what: str = "waiting for the other processes") -> None:
        with collective_guard(self, what):
            dist.barrier()

    def broadcast_object(self, obj, src: int = 0):
        box = [obj]
        with collective_guard(self, "broadcasting from rank 0"):
            dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        with collective_guard(self, "summing over processes"):
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor


def _is_comm_error(exc: BaseException) -> bool:
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(s in text for s in (
        "Connection closed", "Connection reset", "Timed out", "timed out", "Broken pipe",
        "NCCL", "gloo", "Gloo", "ProcessGroup", "Socket"))


@contextlib.contextmanager
def collective_guard(comm, what: str, step: Optional[int] = None):
    """Turn a failed collective into a :class:`DistributedFailure` saying what to do."""
    try:
        yield
    except DistributedFailure:
        raise
    except Exception as exc:
        if not _is_comm_error(exc):
            raise
        rank = getattr(comm, "rank", "?")
        where = f" at step {step}" if step is not None else ""
        timeout = getattr(comm, "timeout_s", DEFAULT_TIMEOUT_S)
        raise DistributedFailure(
            f"rank {rank}: lost contact with the other processes while {what}{where} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Another "
            f"rank probably died (see its error above) or stopped answering for {timeout:.0f} s "
            f"(the collective timeout, {TIMEOUT_ENV}). Fix the cause and rerun the same "
            "command with --resume: training continues from RUN_DIR/checkpoints/last.pt."
        ) from exc


# -- process group ------------------------------------------------------------------------------

def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device: str = "cpu", *, timeout_s: Optional[float] = None,
                  init_method: Optional[str] = None, rank: Optional[int] = None,
                  world_size: Optional[int] = None) -> Optional[TorchComm]:
    """Join the process group described by torchrun's environment (or the arguments).

    Returns None for a single process (``WORLD_SIZE`` unset or 1), else a :class:`TorchComm`
    whose ``device`` is ``cuda:LOCAL_RANK`` for a CUDA ``device`` and the CPU otherwise.
    ``timeout_s`` (default ``$SAMSVAE_DIST_TIMEOUT`` or 900 s) bounds every collective.
    """
    world = int(world_size if world_size is not None else world_size_from_env())
    if world <= 1:
        return None
    rank = int(rank if rank is not None else os.environ.get("RANK", "0"))
    timeout = float(timeout_s if timeout_s is not None
                    else os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but CUDA is not available here; use "
                               "--device cpu (the gloo backend)")
        local = int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count())))
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        kwargs = {"timeout": datetime.timedelta(seconds=timeout)}
        if init_method is not None:
            kwargs.update(init_method=init_method, rank=rank, world_size=world)
        dist.init_process_group(backend, **kwargs)
    return TorchComm(rank=dist.get_rank(), world_size=dist.get_world_size(), device=dev,
                     timeout_s=timeout)


def shutdown(comm: Optional[TorchComm], *, completed: bool = False) -> None:
    """Leave the process group (no-op for a single process).

    ``completed``: the work ended normally on this rank, so every rank is expected here too:
    wait for them before tearing the group down. After a failure there is no barrier: a dead
    peer would hold it until the timeout.

    Close every :class:`DistributedTrainer` first (its DDP wrapper holds the group). Why it
    matters: gloo's worker threads release a finished collective's tensors a moment after the
    caller has its result, and releasing a tensor whose Python object is gone takes the GIL.
    If the group is still alive when the interpreter finalizes, that thread is killed inside a
    destructor and the process aborts ("terminate called without an active exception",
    exit -6), seen in about 1 of 4 runs of two loaded processes. Destroying the last reference
    here joins those threads while the interpreter is still whole.
    """
    if comm is not None and dist.is_initialized():
        if completed:
            comm.barrier("leaving the process group")
        dist.destroy_process_group()
        gc.collect()  # groups kept only by reference cycles go now, not during finalization


# -- training -----------------------------------------------------------------------------------

class _LossModule(nn.Module):
    """What DDP wraps: forward = the model's loss, so gradients are reduced on backward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch, particles: int, generator):
        out = self.model.loss(batch, particles=particles, generator=generator)
        return out["loss"], out["elbo"]


class DistributedTrainer(Trainer):
    """:class:`~samsvae.train.Trainer` under ``torch.distributed`` (one instance per rank).

    Takes the Trainer's arguments plus ``comm`` (from :func:`init_from_env`); ``rank`` and
    ``world_size`` come from it. ``train_loader``/``val_loader`` must be this rank's shards
    (StreamingLoader with ``rank``/``world_size``), with the same number of training batches on
    every rank. Pass ``n_train_cells`` = the GLOBAL number of training cells.
    """

    def __init__(self, model, train_loader, val_loader=None, config=None, *, comm: TorchComm,
                 **kwargs):
        kwargs.update(rank=comm.rank, world_size=comm.world_size)
        super().__init__(model, train_loader, val_loader, config, **kwargs)
        self.comm = comm
        lengths = comm.all_gather_object(len(train_loader))
        if len(set(lengths)) != 1:
            raise ValueError(f"the ranks' training loaders give different numbers of batches "
                             f"per epoch ({lengths}); shard with StreamingLoader(rank=, "
                             "world_size=, even_batches=True)")
        from torch.nn.parallel import DistributedDataParallel as DDP
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # weights start as rank 0's; buffers (gene statistics, N_t) are identical by
        # construction, so they are not broadcast before every step
        sync = ({"forward_sync_buffers": False}
                if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
                else {"broadcast_buffers": False})
        with collective_guard(comm, "broadcasting the initial weights"):
            self.model = DDP(_LossModule(self.raw_model), device_ids=device_ids,
                             find_unused_parameters=True, **sync)
        self._rank_noise: Optional[list] = None

    def close(self) -> None:
        """Drop the DDP wrapper (and with it this trainer's hold on the process group); call
        before :func:`shutdown`. The trained weights stay in ``raw_model``; training again
        afterwards raises."""
        self.model = None

    def fit(self, resume: bool = False) -> dict:
        try:
            return super().fit(resume)
        except DistributedFailure:
            raise
        except Exception as exc:
            if not _is_comm_error(exc):
                raise
            with collective_guard(self.comm, "training", step=self.step + 1):
                raise exc

    def _train_step(self, batch) -> torch.Tensor:
        if self.model is None:
            raise RuntimeError("this DistributedTrainer was closed (its process group is being "
                               "shut down); create a new one to train again")
        loss, elbo = self.model(batch, self.config.particles, self.noise)
        n_local = int(elbo.shape[0])
        tally = torch.stack([loss.detach().to(torch.float64) * n_local,
                             torch.tensor(float(n_local), dtype=torch.float64,
                                          device=loss.device)])
        with collective_guard(self.comm, "summing the batch loss", self.step + 1):
            dist.all_reduce(tally, op=dist.ReduceOp.SUM)
        # DDP averages gradients over ranks: weight each rank by its share of the global batch
        scale = (n_local * self.world_size / tally[1]).to(loss.dtype)
        self.optimizer.zero_grad(set_to_none=True)
        with collective_guard(self.comm, "reducing gradients", self.step + 1):
            (loss * scale).backward()
        if self.config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        return (tally[0] / tally[1]).to(torch.float32)  # the global batch's mean loss

    def save_checkpoint(self, name: str = "last"):
        if self.checkpoint_dir is None:
            return None
        # every rank reaches this point at the same step (the loop is the same on all ranks)
        self._rank_noise = self.comm.all_gather_object(self.noise.get_state())
        return super().save_checkpoint(name)

    def _state(self, include_best: bool = True) -> dict:
        state = super()._state(include_best)
        state["world_size"] = self.world_size
        state["rank_noise"] = self._rank_noise
        return state

    def _resume(self) -> None:
        super()._resume()
        path = None if self.checkpoint_dir is None else self.checkpoint_dir / "last.pt"
        if path is None:
            return
        try:  # the file the base class resumed from (last.pt, or its .prev fallback)
            ckpt, _ = load_checkpoint_with_fallback(path, map_location="cpu")
        except FileNotFoundError:
            return
        states = ckpt.get("rank_noise")
        if states is not None and ckpt.get("world_size") == self.world_size:
            self.noise.set_state(states[self.rank])
        else:  # other world size: a fresh, distinct stream per rank (not bit-exact any more)
            self.noise.manual_seed(rank_seed(self.config.seed + self.step, self.rank))
            self._say(f"the checkpoint was written by {ckpt.get('world_size', 1)} process(es), "
                      f"this run has {self.world_size}: the data order and noise differ from an "
                      "uninterrupted run from here on")
