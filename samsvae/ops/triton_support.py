"""Availability checks and launch helpers shared by the Triton backends.

This module must stay importable without importing triton: ``import samsvae`` imports the
backend modules on every machine, and on a CPU-only one importing triton costs time and would
pin ``TRITON_INTERPRET`` before the tests set it. Only the ``<op>/triton.py`` modules import
triton, on an op's first call on the ``triton`` backend.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

try:  # torch >= 2.6: kernels launched through wrap_triton are traceable by torch.compile
    from torch.library import triton_op, wrap_triton  # (importing these does not import triton)
except ImportError:  # pragma: no cover - older torch: the tiers use a plain autograd.Function
    triton_op = None

    def wrap_triton(kernel):
        """Identity: without ``torch.library.wrap_triton`` kernels are launched directly."""
        return kernel


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    """True when the ``triton`` package can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=None)
def triton_import_error() -> str:
    """'' when ``import triton`` and its GPU backend load, else the error (checked once, and
    only where CUDA is present: importing triton on a CPU-only machine is not needed)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
        from triton.runtime import driver
        driver.active.get_current_target()  # fails on a broken install / missing backend
    except Exception as exc:  # noqa: BLE001 - any failure means: fall back, with the reason
        return f"{type(exc).__name__}: {exc}"
    return ""


def triton_cuda_available() -> bool:
    """True when the Triton GPU kernels can run here: CUDA is present, triton is installed
    and imports with a working GPU backend (a broken install falls back to the reference with
    :func:`why_triton_unavailable` saying why, instead of failing in the first step)."""
    return torch.cuda.is_available() and triton_installed() and triton_import_error() == ""


def why_triton_unavailable() -> str:
    """Human-readable reason why :func:`triton_cuda_available` is False, with the fix."""
    if not torch.cuda.is_available():
        return ("CUDA is not available (the Triton kernels need an NVIDIA GPU and a CUDA build of "
                "torch); use backend='auto' to run the reference or C++ kernels on CPU")
    if not triton_installed():
        return "triton is not installed; install it with: pip install 'samsvae[gpu]'"
    if triton_import_error():
        return (f"triton is installed but does not load ({triton_import_error()}); reinstall "
                "the triton matching this torch (pip install --force-reinstall triton)")
    return "available"


def interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= max(n, 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def multiprocessor_count(device: torch.device) -> int:
    """Number of streaming multiprocessors of a CUDA device (a small constant elsewhere, so
    that grid heuristics stay cheap under the CPU interpreter)."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4
