"""iwelbo: streamed importance-weighted log-mean-exp over particle chunks."""
import math

import pytest
import torch

from samsvae import ops


@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
def test_iwelbo_streaming_equals_dense_logmeanexp(chunk):
    lw = torch.randn(23, 5, dtype=torch.float64) * 30
    lw[:, 2] = -torch.inf          # a column with zero weight everywhere
    got = ops.iwelbo(lambda s, n: lw[s:s + n], particles=23, chunk=chunk)
    expected = torch.logsumexp(lw, 0) - math.log(23)
    torch.testing.assert_close(got, expected)
