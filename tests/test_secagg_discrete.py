"""Integer noise for distributed DP: the discrete Gaussian and Skellam samplers against
their exact pmfs, and conditional rounding's norm bound and unbiasedness."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

from fedjax_sim._validation import ConfigError
from fedjax_sim.secagg.discrete import (conditional_stochastic_round, discrete_gaussian,
                                        inflated_norm_bound, skellam)

N = 20_000
_dg = discrete_gaussian  # jitted inside, one program per shape
_sk = jax.jit(skellam, static_argnums=2)


def _chi_square_p(samples, support, pmf):
    """p-value of Pearson's test of ``samples`` against ``pmf`` on ``support`` (integers),
    bins with fewer than 5 expected merged into the two tails."""
    expected = len(samples) * pmf / pmf.sum()
    keep = np.flatnonzero(expected >= 5.0)
    lo, hi = support[keep[0]], support[keep[-1]]
    inner = (support >= lo) & (support <= hi)
    exp = expected[inner].copy()
    exp[0] += expected[support < lo].sum()
    exp[-1] += expected[support > hi].sum()
    obs = np.array([(samples == k).sum() for k in support[inner]], np.float64)
    obs[0] += (samples < lo).sum()
    obs[-1] += (samples > hi).sum()
    return stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


@pytest.mark.parametrize("sigma", [0.5, 3.7])
def test_discrete_gaussian_matches_its_pmf(sigma):
    x = np.asarray(_dg(jax.random.key(0), jnp.float32(sigma), (N,)))
    assert x.dtype == np.int32
    support = np.arange(-int(40 * sigma) - 10, int(40 * sigma) + 11)
    pmf = np.exp(-support.astype(np.float64) ** 2 / (2 * sigma * sigma))
    assert _chi_square_p(x, support, pmf) > 1e-3


def test_discrete_gaussian_variance_and_symmetry_at_large_sigma():
    sigma = 100.0
    x = np.asarray(_dg(jax.random.key(1), jnp.float32(sigma), (N,))).astype(np.float64)
    # var estimate: relative std sqrt(2/N) = 1%; N_Z's variance is sigma^2 to 1e-80 here
    assert abs(x.var() / sigma ** 2 - 1.0) < 0.05
    assert abs(x.mean()) < 5 * sigma / math.sqrt(N)
    pos, neg = (x > 0).sum(), (x < 0).sum()
    assert abs(pos - neg) < 5 * math.sqrt(pos + neg)


def test_discrete_gaussian_zero_sigma_vmap_and_host_checks():
    np.testing.assert_array_equal(_dg(jax.random.key(2), jnp.float32(0.0), (N,)), 0)
    sigmas = jnp.asarray([0.0, 2.0, 50.0], jnp.float32)
    keys = jax.random.split(jax.random.key(3), 3)
    out = jax.jit(jax.vmap(lambda k, s: _dg(k, s, (4000,))))(keys, sigmas)
    assert out.shape == (3, 4000) and out.dtype == jnp.int32
    stds = np.asarray(out, np.float64).std(axis=1)
    assert stds[0] == 0.0 and 1.8 < stds[1] < 2.2 and 45 < stds[2] < 55
    # the same key gives the same draw from a Python float (host-checked) and a traced one
    np.testing.assert_array_equal(discrete_gaussian(jax.random.key(4), 3.7, (N,)),
                                  _dg(jax.random.key(4), jnp.float32(3.7), (N,)))
    with pytest.raises(ConfigError, match=r"^sigma=-1.0: must be >= 0.0$"):
        discrete_gaussian(jax.random.key(0), -1.0, (3,))


@pytest.mark.parametrize("mu", [3.0, 40.0])
def test_skellam_matches_its_pmf_mean_and_variance(mu):
    x = np.asarray(_sk(jax.random.key(5), jnp.float32(mu), (N,)))
    assert x.dtype == np.int32
    support = np.arange(-int(20 * math.sqrt(mu)) - 20, int(20 * math.sqrt(mu)) + 21)
    pmf = special.ive(np.abs(support), mu)  # Poisson(mu/2) - Poisson(mu/2)
    assert _chi_square_p(x, support, pmf) > 1e-3
    xf = x.astype(np.float64)
    assert abs(xf.mean()) < 5 * math.sqrt(mu / N)
    assert abs(xf.var() / mu - 1.0) < 0.05
    np.testing.assert_array_equal(skellam(jax.random.key(0), 0.0, (4,)), 0)
    with pytest.raises(ConfigError, match=r"^mu=-2.0: "):
        skellam(jax.random.key(0), -2.0, (3,))


def test_inflated_norm_bound_formula_and_errors():
    assert inflated_norm_bound(10.0, 100, 0.0) == 20.0  # c + sqrt(d)
    # sqrt(2 log(1/beta)) = 1 at beta = exp(-1/2): sqrt(c^2 + d/4 + c + sqrt(d)/2)
    assert inflated_norm_bound(10.0, 100, math.exp(-0.5)) == pytest.approx(math.sqrt(140.0))
    assert inflated_norm_bound(1.0, 1, 1e-3) == 2.0  # small beta: the worst case is smaller
    for args, field in [((10.0, 100, 1.0), "beta"), ((10.0, 0, 0.5), "dim"),
                        ((0.0, 10, 0.5), "scaled_clip")]:
        with pytest.raises(ConfigError) as e:
            inflated_norm_bound(*args)
        assert str(e.value).startswith(f"{field}=") and "\n" not in str(e.value)


def _unit_vectors(count, dim, norm, seed=0):
    x = np.random.default_rng(seed).normal(size=(count, dim)) + 0.5  # mostly non-integers
    return jnp.asarray(x / np.linalg.norm(x, axis=1, keepdims=True) * norm, jnp.float32)


COUNT, DIM, CLIP = 2000, 128, 16.0


@jax.jit
def _round_once(xs, keys, bound):
    return jax.vmap(lambda x, k: conditional_stochastic_round(x, k, bound, max_tries=1))(
        xs, keys)


@jax.jit
def _round_retry(xs, keys, bound):
    return jax.vmap(lambda x, k: conditional_stochastic_round(x, k, bound))(xs, keys)


def test_conditional_rounding_accepts_only_within_the_bound():
    beta = math.exp(-0.5)
    xs = _unit_vectors(COUNT, DIM, CLIP)
    keys = jax.random.split(jax.random.key(6), COUNT)
    paper = inflated_norm_bound(CLIP, DIM, beta)
    for bound in (paper, CLIP + 1.0):  # the paper's bound, and a tight one
        rounded, ok = _round_once(xs, keys, jnp.float32(bound))
        rounded, ok = np.asarray(rounded, np.float64), np.asarray(ok)
        norms = np.linalg.norm(rounded, axis=1)
        assert np.all(rounded == np.round(rounded))
        assert np.all(norms[ok] <= bound)
        assert not np.any(ok[norms > bound])
        if bound == paper:
            assert ok.mean() >= 1.0 - beta  # a single try passes w.p. >= 1 - beta
        else:
            assert 0.0 < ok.mean() < 1.0  # the tight bound rejects some, accepts some
    # with retries every vector is accepted at the paper's bound, within it
    rounded, ok = _round_retry(xs, keys, jnp.float32(paper))
    assert np.all(np.asarray(ok))
    assert np.all(np.linalg.norm(np.asarray(rounded, np.float64), axis=1) <= paper)
    # beta = 0: the worst-case bound c + sqrt(d) accepts every plain rounding
    _, ok = _round_once(xs, keys, jnp.float32(inflated_norm_bound(CLIP, DIM, 0.0)))
    assert np.all(np.asarray(ok))


def test_conditional_rounding_is_unbiased_when_acceptance_is_certain():
    x = _unit_vectors(1, DIM, CLIP, seed=1)[0]
    xs = jnp.broadcast_to(x, (COUNT, DIM))
    keys = jax.random.split(jax.random.key(7), COUNT)
    rounded, ok = _round_retry(xs, keys, jnp.float32(inflated_norm_bound(CLIP, DIM, 1e-6)))
    assert np.all(np.asarray(ok))
    mean = np.asarray(rounded, np.float64).mean(axis=0)
    # each coordinate's rounding has variance <= 1/4: 5 standard errors
    assert np.max(np.abs(mean - np.asarray(x))) < 5 * 0.5 / math.sqrt(COUNT)
