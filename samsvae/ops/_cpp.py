"""Loads the compiled extension ``samsvae._C`` (built from csrc/ by setup.py) and registers
its kernels as the ``cpp`` backend of each op. Without the extension nothing is registered and
``auto`` keeps using the reference; ``EXT_ERROR`` says why."""
import importlib

try:
    # loading it runs the TORCH_LIBRARY registrations of every kernel in csrc/
    _C = importlib.import_module("samsvae._C")
    EXT_ERROR = None
except ImportError as exc:  # not built, or built against another torch
    _C = None
    EXT_ERROR = f"{type(exc).__name__}: {exc}"


def ext_available() -> bool:
    return _C is not None


def why_unavailable() -> str:
    return ("the C++ extension samsvae._C is not built (" + str(EXT_ERROR) + "); reinstall with "
            "a C++ compiler present: pip install --no-build-isolation -e . (SAMSVAE_BUILD_EXT=1 "
            "makes a failed build fatal)")


if _C is not None:
    for _mod in ("_cpp_nb", "_cpp_nb_head", "_cpp_embedding", "_cpp_encoder"):
        try:
            importlib.import_module(f"{__package__}.{_mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.{_mod}":
                raise
