"""``samsvae info``: versions and which backend each op uses here."""
from __future__ import annotations

import platform

from .. import ops
from ..ops import backends, cpp_extension
from ..version import __version__


def add_arguments(parser) -> None:  # no options
    return None


def run(args) -> int:
    import torch


    print(f"samsvae {__version__}, torch {torch.__version__}, python {platform.python_version()}")
    print(f"CUDA available: {torch.cuda.is_available()}")
    ext = cpp_extension
    print(f"C++ extension: {'loaded' if ext.ext_available() else ext.EXT_ERROR}")
    from ..ops import triton_support as ts
    print(f"Triton GPU kernels: {'available' if ts.triton_cuda_available() else ts.why_triton_unavailable()}")
    for name, err in backends.LOAD_ERRORS.items():
        print(f"optional backend module {name} failed to load: {err}")
    print("backends available:", ", ".join(ops.available_backends()))
    print(ops.backend_report())
    return 0
