"""The counter-based samplers of generated data: their distributions and their guards."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fedjax_sim._validation import ConfigError
from fedjax_sim.data import draws

N = 40_000


@pytest.fixture(scope="module")
def log_gamma_n():
    return jax.jit(lambda key, alpha: draws.log_gamma(key, jnp.full((N,), alpha)))


def test_uniforms_are_uniform_on_the_open_interval():
    u = np.asarray(jax.jit(lambda k: draws.uniform(k, (N // 8, 8)))(jax.random.key(1)))
    assert u.shape == (N // 8, 8) and u.dtype == np.float32
    assert u.min() > 0.0 and u.max() < 1.0
    assert stats.kstest(u.ravel(), "uniform").pvalue > 1e-3
    # Prefix-stable, an odd count included (its last hash call gives one word).
    odd = np.asarray(draws.uniform(jax.random.key(1), (7,)))
    np.testing.assert_array_equal(odd, u.ravel()[:7])


def test_normals_are_standard_normal_and_finite():
    z = np.asarray(jax.jit(lambda k: draws.normal(k, (N,)))(jax.random.key(2)))
    assert np.isfinite(z).all()
    assert stats.kstest(z, "norm").pvalue > 1e-3
    assert abs(z.mean()) < 4 / np.sqrt(N) and abs(z.var() - 1) < 0.03


@pytest.mark.parametrize("alpha", [0.05, 0.3, 1.0, 3.0, 40.0])
def test_log_gamma_follows_the_gamma_law(log_gamma_n, alpha):
    x = np.asarray(log_gamma_n(jax.random.key(3), jnp.float32(alpha)), np.float64)
    assert np.isfinite(x).all()
    # Kolmogorov-Smirnov on log X against log Gamma(alpha): the CDF of log X at t is
    # the Gamma CDF at e^t, exact even where X underflows float32 (small alpha).
    assert stats.kstest(x, lambda t: stats.gamma(alpha).cdf(np.exp(t))).pvalue > 1e-3
    if alpha >= 0.3:
        g = np.exp(x)
        assert abs(g.mean() - alpha) < 5 * np.sqrt(alpha / N)


def test_log_gamma_gives_nan_for_impossible_shapes_and_stops():
    alpha = jnp.array([0.5, 0.0, -1.0, jnp.nan, jnp.inf, 2.0], jnp.float32)
    x = np.asarray(jax.jit(draws.log_gamma)(jax.random.key(4), alpha))
    assert np.isfinite(x[[0, 5]]).all() and np.isnan(x[1:5]).all()
    with pytest.raises(ConfigError, match="alpha.shape"):
        draws.log_gamma(jax.random.key(4), jnp.ones((2, 2)))


@pytest.mark.parametrize("shape, field", [((3, -1), "shape.1."), ([3], "shape"),
                                          ((2.5,), "shape.0."), ((1 << 20, 1 << 14), "shape")])
def test_bad_shapes_name_the_field(shape, field):
    for sampler in (draws.uniform, draws.normal):
        with pytest.raises(ConfigError, match=field):
            sampler(jax.random.key(0), shape)


def test_dirichlet_moments_match_the_closed_form():
    alpha = jnp.array([0.2, 0.5, 1.0, 3.0], jnp.float32)
    keys = jax.random.split(jax.random.key(5), 20_000)
    p = np.asarray(jax.jit(jax.vmap(lambda k: draws.dirichlet(k, alpha)))(keys), np.float64)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
    a = np.asarray(alpha, np.float64)
    a0 = a.sum()
    mean, var = a / a0, a * (a0 - a) / (a0 ** 2 * (a0 + 1))
    np.testing.assert_array_less(np.abs(p.mean(0) - mean), 5 * np.sqrt(var / len(p)))
    # The sample variance, within 5 of its standard errors (estimated from the sample).
    sq = np.square(p - p.mean(0))
    np.testing.assert_array_less(np.abs(sq.mean(0) - var), 5 * sq.std(0) / np.sqrt(len(p)))


def test_a_client_draws_the_same_alone_as_inside_a_vmapped_cohort():
    # Under vmap the rejection loop runs until the slowest client accepts; the others'
    # accepted proposals must stay untouched. (Two programs may round log/erfinv in the
    # last bit differently; another proposal would differ in the first digits.)
    keys = jax.random.split(jax.random.key(6), 64)
    alpha = jnp.full((10,), 0.3, jnp.float32)
    cohort = jax.jit(jax.vmap(lambda k: draws.log_gamma(k, alpha)))(keys)
    one = jax.jit(lambda k: draws.log_gamma(k, alpha))
    for i in (0, 17, 63):
        np.testing.assert_allclose(np.asarray(cohort[i]), np.asarray(one(keys[i])),
                                   rtol=2e-6)


def test_other_prng_implementations_fall_back_to_jax_random():
    key = jax.random.key(7, impl="rbg")
    assert draws.uniform(key, (5,)).shape == (5,)
    assert draws.normal(key, (2, 3)).shape == (2, 3)
    p = draws.dirichlet(key, jnp.ones((4,), jnp.float32))
    assert p.shape == (4,) and abs(float(p.sum()) - 1) < 1e-5
