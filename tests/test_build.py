"""The install must have done what SAMSVAE_BUILD_EXT asked for (CI sets it to 1)."""
import os

import pytest

from samsvae.ops import backends, cpp_extension as _cpp


@pytest.mark.skipif(os.environ.get("SAMSVAE_BUILD_EXT") != "1",
                    reason="only checked when the build was required (SAMSVAE_BUILD_EXT=1)")
def test_extension_was_built_and_registered():
    assert _cpp.ext_available(), _cpp.EXT_ERROR
    assert backends.resolve("nb_log_prob", "auto", "cpu")[0] == "cpp"
    assert backends.resolve("masked_embedding_sum", "auto", "cpu")[0] == "cpp"


def test_package_reports_its_backend(capsys):
    from samsvae.cli import info
    assert info.run(None) == 0
    out = capsys.readouterr().out
    assert "nb_log_prob: cpu -> " in out and "C++ extension:" in out
