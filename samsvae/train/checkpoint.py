"""Atomic checkpoint files and the random-number-generator state they carry.

A checkpoint is written to a temporary file in the destination's directory, flushed and
fsynced, then moved over the destination with ``os.replace`` (atomic on POSIX and Windows), so
a crash or ``SIGKILL`` at any moment leaves either the old file or the new one, never a torn one.
"""
from __future__ import annotations

import os
import pickle
import random
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch


def _atomic_write(path: str | os.PathLike, mode: str, write, before_replace=None) -> Path:
    """Call ``write(file_object)`` on a temporary file next to ``path``, fsync it and move it
    over ``path``; on any failure the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; give the file the mode an ordinary open() would (umask honoured)
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def current_umask() -> int:
    """The process umask (read by setting and restoring it: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def rotate_checkpoint(obj: Any, path: str | os.PathLike) -> Path:
    """``atomic_torch_save`` that keeps the file it replaces as ``<stem>.prev.pt``.

    The new checkpoint is complete on disk before the old one moves aside, so at every moment
    ``path`` or its ``.prev`` copy holds a whole checkpoint; a reader that cannot read ``path``
    falls back to the copy (:func:`load_checkpoint_with_fallback`).
    """
    path = Path(path)
    prev = previous_checkpoint(path)

    def keep_previous():
        if path.is_file():
            os.replace(path, prev)
    return _atomic_write(path, "wb", lambda fh: torch.save(obj, fh), before_replace=keep_previous)


def previous_checkpoint(path: str | os.PathLike) -> Path:
    """``checkpoints/last.pt`` -> ``checkpoints/last.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` that never leaves a partial file at ``path``.

    The temporary file lives next to ``path`` (same filesystem, so the rename is atomic) and is
    removed if saving fails; the previous content of ``path`` survives any failure.
    """
    return _atomic_write(path, "wb", lambda fh: torch.save(obj, fh))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file (JSON, CSV) with the same all-or-nothing guarantee."""
    return _atomic_write(path, "w", lambda fh: fh.write(text))


def _fsync_dir(directory: Path) -> None:
    # makes the rename itself durable; not possible on every platform (e.g. Windows)
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class UnreadableRunFile(ValueError):
    """A file of a run directory that cannot be read (truncated, junk, foreign format); the
    message names the file and what to do. The CLI prints it without a traceback (rc 2)."""


def load_checkpoint(path: str | os.PathLike, map_location=None, *, what: Optional[str] = None) -> dict:
    """Read a checkpoint written by :func:`atomic_torch_save` (tensors and plain Python only).

    Raises FileNotFoundError when absent and :class:`UnreadableRunFile` when unreadable (never
    suggesting to turn safe loading off: the file may come from anyone)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (truncated zip), EOFError, ...
        raise UnreadableRunFile(
            f"cannot read {path}: {_reason(exc)}. {what or 'The file'} is damaged (truncated "
            "or overwritten) or was not written by samsvae; delete it and train again (samsvae "
            "train ... --out RUN_DIR, or --resume to continue from the last checkpoint)"
        ) from None
    if not isinstance(obj, dict):
        raise UnreadableRunFile(f"cannot read {path}: it holds a {type(obj).__name__}, not a "
                                "samsvae checkpoint; delete it and train again")
    return obj


def _reason(exc: BaseException) -> str:
    """A one-line cause for an unreadable file, without torch's advice to load unsafely."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, pickle.UnpicklingError) or "weights_only" in str(exc):
        return "not a file of tensors and plain values (not a samsvae checkpoint)"
    if "zip archive" in text or "central directory" in text or isinstance(exc, EOFError):
        return "the file is truncated or not a torch archive"
    return text[:200]


def load_checkpoint_with_fallback(path: str | os.PathLike, map_location=None,
                                  log=None) -> tuple:
    """``(checkpoint, path read)``: ``path``, or its ``.prev`` copy (saying so through ``log``)
    when ``path`` is missing or unreadable. Raises when neither can be read; FileNotFoundError
    when neither exists."""
    path = Path(path)
    prev = previous_checkpoint(path)
    try:
        return load_checkpoint(path, map_location=map_location), path
    except (FileNotFoundError, UnreadableRunFile) as exc:
        if not prev.is_file():
            raise
        why = "is missing" if isinstance(exc, FileNotFoundError) else "cannot be read"
        try:
            ckpt = load_checkpoint(prev, map_location=map_location)
        except UnreadableRunFile:
            raise exc from None
        if log is not None:
            log(f"warning: {path} {why}; falling back to the previous checkpoint {prev}")
        return ckpt, prev


# -- random number generators ---------------------------------------------------------------

def capture_rng_state(generators: Optional[dict] = None) -> dict:
    """Snapshot of every RNG a training step may touch.

    Returns ``{"torch": ByteTensor, "cuda": [ByteTensor per device], "numpy": {...},
    "python": tuple, "generators": {name: ByteTensor}}``. Only tensors and plain Python values,
    so it loads with ``torch.load(weights_only=True)``.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": _to_plain(random.getstate()),
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    return state


def restore_rng_state(state: dict, generators: Optional[dict] = None) -> None:
    """Inverse of :func:`capture_rng_state`; ``generators`` are restored in place by name."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    npst = state["numpy"]
    np.random.set_state((npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached"]))
    random.setstate(_to_tuple(state["python"]))
    saved = state.get("generators", {})
    for name, g in (generators or {}).items():
        if name not in saved:
            raise KeyError(f"checkpoint holds no state for generator {name!r} "
                           f"(it has {sorted(saved)})")
        g.set_state(saved[name])


def _to_plain(x):
    return [_to_plain(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, list) else x
