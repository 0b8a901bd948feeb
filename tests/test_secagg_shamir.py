"""Shamir t-out-of-n sharing over F_(2^31 - 1): any t shares reconstruct the secret, and
t - 1 shares are uniform whatever the secret."""

import itertools

import numpy as np
import pytest
from scipy import stats

from fedjax_sim._validation import ConfigError
from fedjax_sim.secagg.shamir import PRIME, reconstruct, share


@pytest.mark.parametrize("t,n", [(1, 1), (1, 4), (2, 3), (3, 6), (6, 6)])
def test_any_t_shares_reconstruct(t, n):
    rng = np.random.default_rng(10 * t + n)
    secret = np.concatenate([[0, 1, PRIME - 1], rng.integers(0, PRIME, 13)])
    shares = share(secret, t, n, rng)
    assert shares.shape == (n, secret.size) and shares.dtype == np.int64
    assert shares.min() >= 0 and shares.max() < PRIME
    for m in range(t, n + 1):
        for subset in itertools.combinations(range(n), m):
            idx = np.asarray(subset)
            np.testing.assert_array_equal(reconstruct(idx + 1, shares[idx]), secret)
    if t == 1:
        np.testing.assert_array_equal(shares, np.broadcast_to(secret, shares.shape))


def test_fewer_than_t_shares_are_uniform_and_say_nothing():
    """The pair of shares held by parties 2 and 5 (t = 3) is uniform over F_p^2 for two
    very different secrets: chi-square over a 16 x 16 grid, and the two samples agree."""
    draws, cells = 20_000, 16
    samples = []
    for seed, value in [(0, 0), (1, PRIME - 1)]:
        shares = share(np.full(draws, value, np.int64), 3, 5, np.random.default_rng(seed))
        grid = shares[[1, 4]] * cells // PRIME
        counts = np.bincount(grid[0] * cells + grid[1], minlength=cells * cells)
        assert stats.chisquare(counts).pvalue > 1e-4
        samples.append(shares[1])
        wrong = reconstruct([2, 5], shares[[1, 4]])  # t - 1 shares: no information
        assert np.mean(wrong == value) < 0.01
    assert stats.ks_2samp(samples[0], samples[1]).pvalue > 1e-4


def test_bad_inputs():
    rng = np.random.default_rng(0)
    cases = [
        (lambda: share(3, 0, 4, rng), "t="),
        (lambda: share(3, 5, 4, rng), "t="),
        (lambda: share(3, 2, 0, rng), "n="),
        (lambda: share(PRIME, 2, 4, rng), "secret="),
        (lambda: share(-1, 2, 4, rng), "secret="),
        (lambda: share(1.5, 2, 4, rng), "secret="),
        (lambda: share(3, 2, 4, 42), "rng="),
        (lambda: reconstruct([1, 1], [[3], [4]]), "xs="),
        (lambda: reconstruct([0, 2], [[3], [4]]), "xs="),
        (lambda: reconstruct([1, 2], [[3]]), "shares="),
    ]
    for call, field in cases:
        with pytest.raises(ConfigError, match="^" + field) as err:
            call()
        assert "\n" not in str(err.value)
