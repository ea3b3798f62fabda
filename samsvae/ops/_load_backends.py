"""Import the optional backend modules; each registers itself with :mod:`.backends`.

A module that is missing or fails to import leaves the reference in charge; the reason is kept
in ``LOAD_ERRORS`` (shown by ``samsvae info``).
"""
import importlib

LOAD_ERRORS = {}

for _name in ("_cpp", "_triton_nb", "_triton_embedding", "_triton_encoder"):
    try:
        importlib.import_module(f"{__package__}.{_name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}.{_name}":
            LOAD_ERRORS[_name] = f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001 - a broken optional backend must not break import
        LOAD_ERRORS[_name] = f"{type(exc).__name__}: {exc}"
