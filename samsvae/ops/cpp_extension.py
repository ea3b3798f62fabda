"""Loads the compiled extension ``samsvae._C`` (built from csrc/ by setup.py).

Loading it runs the ``TORCH_LIBRARY`` registrations of every kernel in csrc/ (the
``torch.ops.samsvae.*`` custom ops); the ``cpp`` tier of each op (``<op>/cpp.py``) is imported
only when it loaded. Without the extension ``auto`` keeps using the reference; ``EXT_ERROR``
says why.
"""
import importlib

import torch

try:
    _C = importlib.import_module("samsvae._C")
    EXT_ERROR = None
except ImportError as exc:  # not built, or built against another torch
    _C = None
    EXT_ERROR = f"{type(exc).__name__}: {exc}"

# The dtypes the C++ kernels compute in; other floating dtypes are computed in float32.
CPP_DTYPES = (torch.float32, torch.float64)


def ext_available() -> bool:
    """True when ``samsvae._C`` loaded (its custom ops are registered)."""
    return _C is not None


def why_unavailable() -> str:
    """Why :func:`ext_available` is False, with the fix."""
    return ("the C++ extension samsvae._C is not built (" + str(EXT_ERROR) + "); reinstall with "
            "a C++ compiler present: pip install --no-build-isolation -e . (SAMSVAE_BUILD_EXT=1 "
            "makes a failed build fatal)")


def supported_isas() -> list:
    """The CPU instruction sets this machine can run the kernels with (e.g. ``avx512``)."""
    return list(_C.supported_isas()) if _C is not None else []


def cpu_isa() -> str:
    """The instruction set the kernels currently dispatch to."""
    return _C.cpu_isa()


def set_cpu_isa(name: str) -> None:
    """Pin the kernels to one instruction set (``"auto"``: the best one this CPU has)."""
    _C.set_cpu_isa(name)
