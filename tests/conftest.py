import os

# Triton kernels run on CPU tensors through the interpreter when no GPU is present. The variable
# must be set before triton is first imported anywhere in the test process.
try:
    import torch
    _cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _cuda = False
if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data():
    """Directory of the real screens (../shared/data); tests using it skip when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not present at {SHARED_DATA}")
    return SHARED_DATA


from helpers import CPU_ISAS  # noqa: E402,F401  (the isa fixture below parametrises over it)


@pytest.fixture
def isa(request):
    """The C++ kernels of one ISA (parametrise indirectly with a name from ``CPU_ISAS``);
    skipped where the CPU lacks it or the extension is not built; back to auto afterwards."""
    from samsvae.ops import cpp_extension
    if not cpp_extension.ext_available():
        pytest.skip("C++ extension not built")
    if request.param not in cpp_extension.supported_isas():
        pytest.skip(f"ISA {request.param} not supported here")
    cpp_extension.set_cpu_isa(request.param)
    yield request.param
    cpp_extension.set_cpu_isa("auto")
