"""Backend registry: one public function per op, several implementations behind it.

Each op (``"nb_log_prob"``, ``"masked_embedding_sum"``, ...) has a ``reference`` implementation
(pure PyTorch, the spec) and optionally ``cpp`` (the compiled ``samsvae._C`` extension, CPU
tensors) and ``triton`` (CUDA tensors) implementations, registered by the modules that hold them.

Choosing: ``backend="auto"`` (the default, overridable with the ``SAMSVAE_BACKEND`` environment
variable) takes the fastest implementation available for the device of the inputs and falls back
silently to the reference; naming a backend explicitly raises :class:`BackendUnavailableError`
when it cannot run here (Liger-Kernel's rule: silent on auto, loud on request).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

BACKENDS = ("reference", "cpp", "triton")
_AUTO_ORDER = {"cpu": ("cpp", "reference"), "cuda": ("triton", "reference")}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run on this machine or on these tensors."""


@dataclass
class _Impl:
    fn: Callable
    available: Callable[[], bool]
    devices: tuple  # device types the implementation accepts ("cpu", "cuda")
    why_unavailable: Callable[[], str]


_REGISTRY: Dict[str, Dict[str, _Impl]] = {}


def register(op: str, backend: str, fn: Callable, *, devices=("cpu", "cuda"),
             available: Optional[Callable[[], bool]] = None,
             why_unavailable: Optional[Callable[[], str]] = None) -> None:
    """Register ``fn`` as the ``backend`` implementation of ``op``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _REGISTRY.setdefault(op, {})[backend] = _Impl(
        fn=fn,
        available=available or (lambda: True),
        devices=tuple(devices),
        why_unavailable=why_unavailable or (lambda: "not available"),
    )


def _requested(backend: Optional[str]) -> str:
    if backend is None or backend == "auto":
        backend = os.environ.get("SAMSVAE_BACKEND", "auto").strip().lower() or "auto"
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of 'auto', "
                         + ", ".join(repr(b) for b in BACKENDS)
                         + " (also via the SAMSVAE_BACKEND environment variable)")
    return backend


def resolve(op: str, backend: Optional[str] = "auto", device: torch.device | str = "cpu") -> tuple:
    """Return ``(backend_name, fn)`` for ``op`` on tensors living on ``device``."""
    dev = torch.device(device).type
    impls = _REGISTRY.get(op, {})
    if not impls:
        raise KeyError(f"no implementation registered for op {op!r}")
    name = _requested(backend)
    if name == "auto":
        for cand in _AUTO_ORDER.get(dev, ("reference",)):
            impl = impls.get(cand)
            if impl is not None and dev in impl.devices and impl.available():
                return cand, impl.fn
        return "reference", impls["reference"].fn
    impl = impls.get(name)
    if impl is None:
        raise BackendUnavailableError(
            f"op {op!r} has no {name!r} implementation; available: {sorted(impls)}. "
            "Use backend='auto' to pick the best available one.")
    if not impl.available():
        raise BackendUnavailableError(
            f"backend {name!r} requested for {op!r} but it is unavailable: {impl.why_unavailable()}. "
            "Use backend='auto' (or unset SAMSVAE_BACKEND) to fall back to the reference.")
    if dev not in impl.devices:
        raise BackendUnavailableError(
            f"backend {name!r} for {op!r} runs on {impl.devices} tensors, got {dev} tensors. "
            "Move the inputs or use backend='auto'.")
    return name, impl.fn


def available_backends(op: Optional[str] = None) -> list:
    """Backends usable on this machine (for ``op``, or for any op when ``op`` is None)."""
    ops = [op] if op is not None else list(_REGISTRY)
    out = []
    for b in BACKENDS:
        if any(b in _REGISTRY.get(o, {}) and _REGISTRY[o][b].available() for o in ops):
            out.append(b)
    return out


def backend_report() -> str:
    """One line per op saying which backend ``auto`` picks on CPU and on CUDA tensors."""
    lines = []
    for op in sorted(_REGISTRY):
        cpu = resolve(op, "auto", "cpu")[0]
        cuda = resolve(op, "auto", "cuda")[0] if torch.cuda.is_available() else "n/a (no CUDA)"
        lines.append(f"{op}: cpu -> {cpu}, cuda -> {cuda}")
    return "\n".join(lines)


KERNEL_OPS = ("nb_log_prob", "masked_embedding_sum", "log1p_standardize",
              "log1p_standardize_linear")  # cpp/triton tiers


def require_backend(backend: str, device: torch.device | str = "cpu") -> None:
    """Raise :class:`BackendUnavailableError` unless every kernel op can run on ``backend``.

    Composite ops (e.g. ``nb_log_prob_linear``) follow the backend of the kernels they call."""
    for op in KERNEL_OPS:
        if op in _REGISTRY:
            resolve(op, backend, device)
