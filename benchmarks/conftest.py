"""pytest-benchmark suite (not run in CI): ``pytest benchmarks/ --benchmark-enable``.

Makes this folder's helpers and the checkout's ``samsvae`` importable when pytest is run from
the repository root without an installed package.
"""
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (os.path.dirname(_HERE), _HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)
