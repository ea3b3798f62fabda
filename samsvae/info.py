"""``samsvae info``: versions and which backend each op uses here."""
from __future__ import annotations

import platform


def add_arguments(parser) -> None:  # no options
    return None


def run(args) -> int:
    import torch

    from . import __version__, ops
    from .ops import _cpp, _load_backends

    print(f"samsvae {__version__}, torch {torch.__version__}, python {platform.python_version()}")
    print(f"CUDA available: {torch.cuda.is_available()}")
    print(f"C++ extension: {'loaded' if _cpp.ext_available() else _cpp.EXT_ERROR}")
    for name, err in _load_backends.LOAD_ERRORS.items():
        print(f"optional backend module {name} failed to load: {err}")
    print("backends available:", ", ".join(ops.available_backends()))
    print(ops.backend_report())
    return 0
