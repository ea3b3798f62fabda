"""How a message names an option: ``control_label='<label>'`` for Python callers,
``--control-label <label>`` on the command line.

Every error or warning that tells the user which option to set formats it with :func:`opt`;
the ``samsvae`` command runs inside ``option_style("cli")`` (``samsvae/cli/__init__.py``), so
the same message speaks the caller's language. The default style is ``"api"``.
"""
from __future__ import annotations

import contextlib
import contextvars
import shlex

_STYLE = contextvars.ContextVar("samsvae_option_style", default="api")
STYLES = ("api", "cli")


@contextlib.contextmanager
def option_style(style: str):
    """Within this block, :func:`opt` names options as ``style`` (``"api"`` or ``"cli"``)."""
    if style not in STYLES:
        raise ValueError(f"option style must be one of {STYLES}, got {style!r}")
    token = _STYLE.set(style)
    try:
        yield
    finally:
        _STYLE.reset(token)


def current_style() -> str:
    return _STYLE.get()


def opt(name: str, value=None, *, placeholder: str | None = None) -> str:
    """The option ``name`` (a keyword argument name) as the caller writes it.

    value: a str (``control_label='NT'`` / ``--control-label NT``), a list of str
        (``drop_labels=['a', 'b']`` / ``--drop-labels a,b``) or None (the name alone:
        ``drop_labels=...`` / ``--drop-labels``).
    placeholder: instead of a value, a description (``control_label='<label>'`` /
        ``--control-label <label>``).
    """
    cli = _STYLE.get() == "cli"
    if placeholder is not None:
        return f"--{name.replace('_', '-')} <{placeholder}>" if cli else f"{name}='<{placeholder}>'"
    if value is None:
        return f"--{name.replace('_', '-')}" if cli else f"{name}=..."
    if not cli:
        return f"{name}={list(value)!r}" if isinstance(value, (list, tuple)) else f"{name}={value!r}"
    text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return f"--{name.replace('_', '-')} {shlex.quote(text)}"
