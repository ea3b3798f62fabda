"""Backend registry: one public function per op, several implementations behind it.

Each op (``"nb_log_prob"``, ``"masked_embedding_sum"``, ...) has a ``reference`` implementation
(pure PyTorch, the spec) and optionally ``cpp`` (the compiled ``samsvae._C`` extension, CPU
tensors) and ``triton`` (CUDA tensors) implementations, registered by the modules that hold them.

Choosing, per call, first match wins: an explicit ``backend=`` argument other than ``"auto"``;
the innermost :func:`use_backend` block of this thread / task; the ``SAMSVAE_BACKEND``
environment variable; ``"auto"``, which takes the fastest implementation available for the
device of the inputs and falls back silently to the reference. Naming a backend explicitly (by
any of the three) raises :class:`BackendUnavailableError` when it cannot run here
(Liger-Kernel's rule: silent on auto, loud on request).

A composite op (``nb_log_prob_linear``) has no implementations of its own: it is declared with
:func:`follow` and resolves to the backend of the op whose kernels it calls.

Optional tiers register themselves when imported; :func:`load_tier` imports one without letting
a failure break ``import samsvae`` (the error is kept in ``LOAD_ERRORS`` for ``samsvae info``).
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional, Union

import torch

BACKENDS = ("reference", "cpp", "triton")
_AUTO_ORDER = {"cpu": ("cpp", "reference"), "cuda": ("triton", "reference")}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run on this machine or on these tensors."""


@dataclass
class _Impl:
    target: Union[Callable, str]  # the function, or "module:function" imported on first use
    available: Callable[[], bool]
    devices: tuple  # device types the implementation accepts ("cpu", "cuda")
    why_unavailable: Callable[[], str]

    @property
    def fn(self) -> Callable:
        if isinstance(self.target, str):
            module, name = self.target.split(":")
            self.target = getattr(importlib.import_module(module), name)
        return self.target


_REGISTRY: Dict[str, Dict[str, _Impl]] = {}
_FOLLOWS: Dict[str, str] = {}  # composite op -> the op whose backend it uses
LOAD_ERRORS: Dict[str, str] = {}  # optional tier module -> why it failed to import
_DEFAULT = contextvars.ContextVar("samsvae_backend", default=None)


def register(op: str, backend: str, fn: Union[Callable, str], *, devices=("cpu", "cuda"),
             available: Optional[Callable[[], bool]] = None,
             why_unavailable: Optional[Callable[[], str]] = None) -> None:
    """Register ``fn`` as the ``backend`` implementation of ``op``.

    ``fn`` may be a ``"package.module:function"`` string, imported on the first call: the
    Triton tiers are registered this way so that ``import samsvae`` never imports triton."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if op in _FOLLOWS:
        raise ValueError(f"op {op!r} follows {_FOLLOWS[op]!r} and has no implementations")
    _REGISTRY.setdefault(op, {})[backend] = _Impl(
        target=fn,
        available=available or (lambda: True),
        devices=tuple(devices),
        why_unavailable=why_unavailable or (lambda: "not available"),
    )


def follow(op: str, kernel_op: str) -> None:
    """Declare ``op`` a composite that runs on whichever backend ``kernel_op`` resolves to."""
    if op in _REGISTRY:
        raise ValueError(f"op {op!r} already has implementations of its own")
    _FOLLOWS[op] = kernel_op


def load_tier(module: str, *, needs: Optional[Callable[[], bool]] = None) -> None:
    """Import the optional tier ``module`` (which registers itself) unless ``needs()`` is False.

    A failure is recorded in ``LOAD_ERRORS`` instead of raised: the reference stays in charge."""
    if needs is not None and not needs():
        return
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - a broken optional backend must not break import
        LOAD_ERRORS[module] = f"{type(exc).__name__}: {exc}"


def _check_name(backend: str, source: str) -> str:
    backend = backend.strip().lower() or "auto"
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} ({source}); choose one of 'auto', "
                         + ", ".join(repr(b) for b in BACKENDS))
    return backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Within the block, ops called with ``backend="auto"`` use ``name`` (``"auto"`` |
    ``"reference"`` | ``"cpp"`` | ``"triton"``) instead of the ``SAMSVAE_BACKEND`` environment
    variable; an explicit ``backend=`` argument still wins. Per thread and per asyncio task;
    blocks nest."""
    token = _DEFAULT.set(_check_name(name, "use_backend"))
    try:
        yield
    finally:
        _DEFAULT.reset(token)


def _requested(backend: Optional[str]) -> str:
    """The backend name in force: the argument, else use_backend(), else the environment."""
    if backend is not None and backend != "auto":
        return _check_name(backend, "backend= argument")
    if _DEFAULT.get() is not None:
        return _DEFAULT.get()
    return _check_name(os.environ.get("SAMSVAE_BACKEND", "auto"),
                       "the SAMSVAE_BACKEND environment variable")


def resolve(op: str, backend: Optional[str] = "auto", device: torch.device | str = "cpu") -> tuple:
    """Return ``(backend_name, fn)`` for ``op`` on tensors living on ``device``.

    For a composite op (see :func:`follow`) this is the resolution of the op it follows."""
    op = _FOLLOWS.get(op, op)
    dev = torch.device(device).type
    impls = _REGISTRY.get(op, {})
    if not impls:
        raise KeyError(f"no implementation registered for op {op!r}")
    name = _requested(backend)
    if name == "auto":
        for cand in _AUTO_ORDER.get(dev, ("reference",)):
            impl = impls.get(cand)
            if impl is not None and dev in impl.devices and impl.available():
                if cand == "reference" and dev == "cpu" and not _WARNED_REFERENCE:
                    _warn_reference_fallback()
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
    ops = [_FOLLOWS.get(op, op)] if op is not None else list(_REGISTRY)
    out = []
    for b in BACKENDS:
        if any(b in _REGISTRY.get(o, {}) and _REGISTRY[o][b].available() for o in ops):
            out.append(b)
    return out


def auto_plan(device: torch.device | str = "cuda", *, assume_available: bool = True) -> dict:
    """``{op: backend}``: what ``auto`` picks for every op (composites included) on tensors
    living on ``device``. With ``assume_available`` each tier counts as usable (a CUDA-less
    machine can inspect what a GPU run would use); otherwise the same as :func:`resolve`."""
    dev = torch.device(device).type
    plan = {}
    for op in sorted(set(_REGISTRY) | set(_FOLLOWS)):
        impls = _REGISTRY[_FOLLOWS.get(op, op)]
        plan[op] = "reference"
        for cand in _AUTO_ORDER.get(dev, ("reference",)):
            impl = impls.get(cand)
            if impl is not None and dev in impl.devices and (assume_available
                                                             or impl.available()):
                plan[op] = cand
                break
    return plan


_WARNED_REFERENCE = False


def _warn_reference_fallback() -> None:
    """Once per process: say that ``auto`` runs the slow pure-PyTorch reference on CPU because
    the C++ extension did not build (silent when it did: then the reference is a choice)."""
    global _WARNED_REFERENCE
    from . import cpp_extension
    if cpp_extension.ext_available():
        return
    _WARNED_REFERENCE = True
    warnings.warn("the C++ extension did not build, so the CPU kernels run the pure-PyTorch "
                  "reference (several times slower); `samsvae info` says why", UserWarning,
                  stacklevel=3)


def kernels_line(device: torch.device | str = "cpu") -> str:
    """One line for a run's header: which kernels ``auto`` runs on ``device``."""
    from . import cpp_extension
    dev = torch.device(device).type
    if dev == "cuda":
        plan = set(auto_plan("cuda", assume_available=False).values())
        return "kernels: " + ("Triton (GPU)" if plan == {"triton"} else
                              "mixed: " + ", ".join(sorted(plan)))
    if cpp_extension.ext_available():
        return f"kernels: C++ extension samsvae._C (CPU, {cpp_extension.cpu_isa()})"
    return ("kernels: pure-PyTorch reference (SLOW): the C++ extension did not build; "
            "`samsvae info` says why")


def backend_report() -> str:
    """One line per op saying which backend ``auto`` picks on CPU and on CUDA tensors; a
    composite op says which op it follows."""
    lines = []
    for op in sorted(set(_REGISTRY) | set(_FOLLOWS)):
        cpu = resolve(op, "auto", "cpu")[0]
        cuda = resolve(op, "auto", "cuda")[0] if torch.cuda.is_available() else "n/a (no CUDA)"
        follows = (f" (composite: runs the {_FOLLOWS[op]} kernel of that backend inside)"
                   if op in _FOLLOWS else "")
        lines.append(f"{op}: cpu -> {cpu}, cuda -> {cuda}{follows}")
    return "\n".join(lines)


def require_backend(backend: str, device: torch.device | str = "cpu") -> None:
    """Raise :class:`BackendUnavailableError` unless every op can run on ``backend``.

    Composite ops (e.g. ``nb_log_prob_linear``) follow the backend of the kernels they call, so
    the kernel ops are the ones checked."""
    for op in _REGISTRY:
        resolve(op, backend, device)


def set_tf32(enabled: bool, device: torch.device | str = "cuda") -> bool:
    """Opt-in TF32 matrix products on a CUDA device (``--tf32`` of train / evaluate / bench):
    ``torch.set_float32_matmul_precision("high")`` when ``enabled`` and ``device`` is CUDA,
    else full float32 ("highest", the default). An execution setting: never saved with a model.
    Returns whether TF32 is on."""
    on = bool(enabled) and torch.device(device).type == "cuda"
    torch.set_float32_matmul_precision("high" if on else "highest")
    return on
