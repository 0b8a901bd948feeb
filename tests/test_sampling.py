"""Samplers: distinct ids, uniform inclusion, Poisson law, capacity and overflow."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fedjax_sim._validation import ConfigError
from fedjax_sim.sampling import (CyclicSampler, FixedSizeSampler, PoissonSampler,
                                 default_poisson_capacity,
                                 permute_indices)


@pytest.mark.parametrize("n", [1, 2, 7, 100, 1000, 12345])
def test_permutation_is_a_bijection(n):
    out = np.asarray(jax.jit(lambda k: permute_indices(k, jnp.arange(n), n))(
        jax.random.key(n)))
    assert sorted(out.tolist()) == list(range(n))


@pytest.mark.parametrize("impl", ["rbg", "unsafe_rbg"])
def test_permutation_with_other_prng_implementations(impl):
    """Non-Threefry keys take the jax.random path: still a bijection, still keyed."""
    n = 500
    perm = jax.jit(lambda k: permute_indices(k, jnp.arange(n), n))
    a = np.asarray(perm(jax.random.key(0, impl=impl)))
    b = np.asarray(perm(jax.random.key(1, impl=impl)))
    assert sorted(a.tolist()) == list(range(n))
    assert (a != b).mean() > 0.9


def test_fixed_size_draws_are_unique_even_for_huge_populations():
    sampler = FixedSizeSampler(10_000_000, 5000)
    sample = jax.jit(sampler.sample)
    for seed in range(3):
        ids = np.asarray(sample(jax.random.key(seed)).ids)
        assert ids.shape == (5000,)
        assert len(np.unique(ids)) == 5000
        assert ids.min() >= 0 and ids.max() < 10_000_000


def test_fixed_size_inclusion_is_uniform():
    """Each client's inclusion count over many rounds is Binomial(R, m/n): chi-square."""
    n, m, rounds = 40, 10, 4000
    sample = jax.jit(jax.vmap(FixedSizeSampler(n, m).sample))
    ids = np.asarray(sample(jax.random.split(jax.random.key(0), rounds)).ids)
    counts = np.bincount(ids.ravel(), minlength=n)
    expected = rounds * m / n
    chi2 = ((counts - expected) ** 2 / expected).sum()
    # Without-replacement counts are slightly under-dispersed; the test is conservative.
    assert stats.chi2.sf(chi2, n - 1) > 1e-3
    # Pairs: every pair of clients co-occurs with probability m(m-1)/(n(n-1)).
    co = np.zeros((n, n))
    for row in ids:
        co[np.ix_(row, row)] += 1
    off = co[~np.eye(n, dtype=bool)]
    p_pair = m * (m - 1) / (n * (n - 1))
    z = (off.mean() - rounds * p_pair) / np.sqrt(rounds * p_pair * (1 - p_pair) / len(off))
    assert abs(z) < 5
    # No pair is systematically avoided or favoured (pseudo-random permutation quality).
    assert off.min() > rounds * p_pair * 0.5 and off.max() < rounds * p_pair * 1.6


def test_poisson_cohort_size_follows_binomial():
    n, q, rounds = 5000, 0.02, 2000
    sampler = PoissonSampler(n, q)
    cohorts = jax.jit(jax.vmap(sampler.sample))(jax.random.split(jax.random.key(1), rounds))
    sizes = np.asarray(cohorts.mask.sum(1))
    assert abs(sizes.mean() - n * q) < 4 * np.sqrt(n * q * (1 - q) / rounds)
    assert abs(sizes.var() / (n * q * (1 - q)) - 1) < 0.15
    assert int(np.asarray(cohorts.overflow).sum()) == 0
    ids = np.asarray(cohorts.ids)
    for row, m in zip(ids[:50], sizes[:50]):
        assert len(np.unique(row[:m])) == m and np.all(row[m:] == -1)
    # Inclusion frequency of every client is q.
    counts = np.bincount(ids[ids >= 0], minlength=n)
    assert abs(counts.mean() / rounds - q) < 1e-3


def test_poisson_overflow_is_reported_not_hidden():
    sampler = PoissonSampler(1000, 0.5, max_cohort=400)
    cohort = jax.jit(sampler.sample)(jax.random.key(0))
    assert int(cohort.mask.sum()) == 400
    assert int(cohort.overflow) > 0


def test_default_capacity_tail():
    m = default_poisson_capacity(10_000, 0.01)
    assert stats.binom.sf(m, 10_000, 0.01) <= 1e-10
    assert stats.binom.sf(m - 2, 10_000, 0.01) > 1e-10
    assert default_poisson_capacity(50, 1.0) == 50


@pytest.mark.parametrize("make,field", [
    (lambda: FixedSizeSampler(10, 11), "cohort_size"),
    (lambda: FixedSizeSampler(0, 1), "num_clients"),
    (lambda: PoissonSampler(10, 0.0), "rate"),
    (lambda: PoissonSampler(10, 1.5), "rate"),
    (lambda: PoissonSampler(10, 0.5, max_cohort=11), "max_cohort"),
])
def test_validation(make, field):
    with pytest.raises(ConfigError, match=field):
        make()


def test_cyclic_sampler_covers_the_population_once_per_pass():
    sampler = CyclicSampler(1000, 250, seed=3)
    sample = jax.jit(sampler.sample)
    ids = np.concatenate([np.asarray(sample(jax.random.key(r), r).ids) for r in range(8)])
    assert sorted(ids[:1000].tolist()) == list(range(1000))
    np.testing.assert_array_equal(ids[:1000], ids[1000:])
    # Not simply 0..999 in order: the blocks come from a permutation.
    assert not np.array_equal(ids[:1000], np.arange(1000))


def test_cyclic_sampler_non_dividing_cohort_wraps_around():
    sampler = CyclicSampler(10, 4)
    ids = [np.asarray(sampler.sample(jax.random.key(0), r).ids) for r in range(5)]
    flat = np.concatenate(ids)  # 20 draws = 2 full passes
    assert np.all(np.bincount(flat, minlength=10) == 2)
    with pytest.raises(ConfigError, match="cohort_size"):
        CyclicSampler(2**31 - 1, 3)
