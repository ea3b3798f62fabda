"""expected_log2_normalized: E[log2(1 + c x)] over x ~ NB(mu, theta) with the Poisson part
summed exactly, against float64 sums over the pmf and against sampled counts."""
import numpy as np
import pytest
import torch
from scipy import stats

from samsvae.models.distributions import POISSON_EXACT_MAX, expected_log2_normalized


def _poisson_exact(rate: float, c: float) -> float:
    k = np.arange(0, int(rate + 60 * np.sqrt(rate + 1) + 60))
    return float(np.sum(stats.poisson.pmf(k, rate) * np.log2(1.0 + c * k)))


@pytest.mark.parametrize("c", [1e4 / 100, 1e4 / 5000])
def test_poisson_part_matches_the_exact_sum(monkeypatch, c):
    """With the Gamma draw fixed at 1 the value is the Poisson expectation: exact below the
    switch, within 2e-3 log2 units of it above (the second-order expansion)."""
    monkeypatch.setattr(torch, "_standard_gamma", lambda a: a.clone())
    rates = np.array([0.0, 1e-3, 0.3, 2.0, 17.0, POISSON_EXACT_MAX, 41.0, 120.0, 3e3, 1e5])
    mu = torch.tensor(rates, dtype=torch.float64).view(1, -1)
    log_theta = torch.zeros(rates.size, dtype=torch.float64)  # theta = 1, g = 1 / 1
    got = expected_log2_normalized(mu, log_theta, torch.tensor(c, dtype=torch.float64))[0]
    want = np.array([_poisson_exact(r, c) for r in rates])
    exact = rates <= POISSON_EXACT_MAX
    np.testing.assert_allclose(got.numpy()[exact], want[exact], atol=1e-9)
    np.testing.assert_allclose(got.numpy()[~exact], want[~exact], atol=2e-3)


@pytest.mark.parametrize("theta", [1e-4, 0.5, 10.0, 1e6])
def test_mean_matches_sampled_counts(theta):
    torch.manual_seed(0)
    n = 200_000
    mu = torch.tensor([0.05, 0.8, 6.0, 60.0], dtype=torch.float64)
    log_theta = torch.full((4,), float(np.log(theta)), dtype=torch.float64)
    c = torch.tensor(100.0, dtype=torch.float64)
    got = expected_log2_normalized(mu.expand(n, 4), log_theta, c)
    r = stats.nbinom.rvs(theta, theta / (theta + mu.numpy()), size=(n, 4), random_state=1)
    sampled = np.log2(1.0 + 100.0 * r)
    se = np.sqrt(got.var(0).numpy() / n + sampled.var(0) / n)
    assert np.all(np.abs(got.mean(0).numpy() - sampled.mean(0)) < 5 * se + 2e-3)
    assert torch.isfinite(got).all()


def test_conditions_on_the_same_stream_share_their_noise():
    """Two rates drawn with the same seed differ only by their means: the difference of the
    expectations has far less spread than that of sampled counts."""
    mu_a = torch.full((20_000, 1, 3), 0.5)
    mu_b = mu_a * 1.2
    log_theta = torch.zeros(3)
    out = []
    for mu in (mu_a, mu_b):
        torch.manual_seed(7)
        out.append(expected_log2_normalized(mu, log_theta, torch.tensor(100.0)))
    diff = (out[1] - out[0]).mean(0)
    assert torch.all(diff > 0)
    torch.manual_seed(7)
    ref = (out[1] - out[0]).std(0)
    x_a = torch.poisson(mu_a * torch._standard_gamma(torch.ones_like(mu_a)))
    x_b = torch.poisson(mu_b * torch._standard_gamma(torch.ones_like(mu_b)))
    sampled = (torch.log2(1 + 100 * x_b) - torch.log2(1 + 100 * x_a)).std(0)
    assert torch.all(ref < 0.5 * sampled)
