"""Checks that a count matrix holds raw UMI counts: finite, non-negative, integer-valued.

The checks look only at the stored values of a sparse matrix (CSR ``.data``), never at a dense
copy, and walk through them in slices so that a billion stored values need no more than one
slice of temporary memory.
"""
from __future__ import annotations

import numpy as np

CHECK_SLICE = 1 << 22  # stored values examined per step (bounds the temporaries to ~32 MB)


def _examples(values: np.ndarray, k: int = 3) -> str:
    return ", ".join(f"{v:.4g}" for v in values[:k])


def check_count_values(values: np.ndarray, *, source: str, fix: str) -> None:
    """Raise ``ValueError`` unless every value in ``values`` is a finite non-negative integer.

    values: 1-D array of the stored entries of a count matrix (CSR ``.data``, any dtype).
    source: how to name the matrix in the message, e.g. ``"adata.X"``.
    fix:    a sentence telling the user how to pass raw counts instead.
    """
    values = np.asarray(values)
    if values.dtype == np.bool_ or values.size == 0:
        return
    if not np.issubdtype(values.dtype, np.number):
        raise ValueError(f"{source} has dtype {values.dtype}; raw counts must be numeric. {fix}")
    is_int = np.issubdtype(values.dtype, np.integer)
    for start in range(0, values.size, CHECK_SLICE):
        part = values[start:start + CHECK_SLICE]
        if not is_int:
            finite = np.isfinite(part)
            if not finite.all():
                bad = part[~finite]
                raise ValueError(
                    f"{source} contains non-finite values ({_examples(bad)}: "
                    f"{bad.size} in the slice checked); counts must be finite. "
                    f"Remove or repair those entries. {fix}")
        low = part.min()
        if low < 0:
            raise ValueError(
                f"{source} has negative values (minimum {low:.4g}): it looks scaled or centred, "
                f"not raw counts. {fix}")
        if not is_int:
            frac = np.abs(part - np.rint(part))
            worst = float(frac.max())
            if worst > 0:
                bad = part[frac > 0]
                hint = ""
                if worst < 1e-3:
                    hint = (" The values are within 1e-3 of integers: if they are counts with "
                            "floating-point noise, round them first (e.g. X.data = np.rint(X.data)).")
                raise ValueError(
                    f"{source} has non-integer values (e.g. {_examples(bad)}): it looks "
                    f"log-normalised or scaled. SAMS-VAE models raw integer UMI counts. {fix}{hint}")


def check_dosage_values(values: np.ndarray, *, source: str) -> None:
    """Raise ``ValueError`` when a dosage matrix holds NaN or inf (real values are allowed)."""
    values = np.asarray(values)
    if values.size and np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
        n_bad = int((~np.isfinite(values)).sum())
        raise ValueError(f"{source} contains {n_bad} NaN/inf dosages; dosages must be finite "
                         "real numbers (0 = not perturbed). Fill or drop those cells.")
