"""Encoding into the secure-aggregation ring and decoding the modular sum: exact inverses
where they must be, unbiased rounding, the scale's range, and wrap-around counted."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sim._threefry import uniform_floats
from fedjax_sim._validation import ConfigError
from fedjax_sim.secagg import ring_sum
from fedjax_sim.secagg.encoding import (RingEncoding, choose_scale, clip_l2, count_wrapped,
                                        decode, encode, padded_size, rotate,
                                        stochastic_round, unrotate)


def _cohort(n, d, seed=0, norm=3.0):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return jnp.asarray(x / np.linalg.norm(x, axis=1, keepdims=True) * norm)


@jax.jit(static_argnums=1)
def _secure_sum(updates, enc, shared, keys):
    uploads = jax.vmap(lambda u, k: encode(u, shared, k, enc))(updates, keys)
    return decode(ring_sum(uploads, enc.bits), shared, enc)


def test_rotation_is_orthonormal_and_inverted():
    x = _cohort(1, 37)[0]
    key = jax.random.key(3)
    r = jax.jit(rotate)(x, key)
    assert r.shape == (padded_size(37),) == (64,)
    np.testing.assert_allclose(np.linalg.norm(r), np.linalg.norm(x), rtol=1e-5)
    np.testing.assert_allclose(jax.jit(unrotate, static_argnums=2)(r, key, 37), x, atol=1e-6)


def test_clip_l2_and_overflow_safe_norm():
    x = jnp.asarray([3e30, 4e30, 0.0], jnp.float32)  # the plain norm overflows float32
    np.testing.assert_allclose(clip_l2(x, 5.0), [3.0, 4.0, 0.0], rtol=1e-6)
    small = jnp.asarray([0.3, 0.4], jnp.float32)
    np.testing.assert_array_equal(clip_l2(small, 5.0), small)


def test_stochastic_rounding_is_unbiased_and_integer():
    x = jnp.full((20_000,), 2.3, jnp.float32)
    r = np.asarray(stochastic_round(x, jax.random.key(0)))
    assert set(np.unique(r)) <= {2.0, 3.0}
    # P(up) = 0.3: the count of 3s is Binomial(20000, 0.3); 5 sigma is about 324.
    assert abs((r == 3.0).sum() - 6000) < 330


def test_rounding_probability_is_the_fraction_to_the_nearest_2_pow_minus_16():
    """The uniforms are the midpoints (k + 1/2) 2^-16: a fraction within 2^-17 of an
    integer always rounds to it, so the bias is at most 2^-17 (and the 2^16 midpoints
    are each hit: 16-bit halves of both Threefry words)."""
    u = np.asarray(uniform_floats(jax.random.key(3), 1_500_000, bits=16))  # P(miss) ~ 1e-5
    assert np.all(u * 2**16 == np.round(u * 2**16)) and u.min() >= 0 and u.max() < 1
    assert len(np.unique(u)) == 2**16
    # 5 + 2^-18 and 7 - 2^-18 (exactly representable) round to the nearest integer always.
    x = jnp.asarray(np.repeat(np.float32([5 + 2.0**-18, 7 - 2.0**-18]), 50_000))
    r = np.asarray(stochastic_round(x, jax.random.key(4)))
    np.testing.assert_array_equal(r, np.repeat(np.float32([5.0, 7.0]), 50_000))


@pytest.mark.parametrize("bits", [16, 20, 32])
def test_decoded_sum_is_the_clipped_sum_within_the_rounding_bound(bits):
    n, d, c = 50, 100, 1.0
    updates = _cohort(n, d, norm=3.0)  # every update is clipped from norm 3 to 1
    enc = RingEncoding(bits, c, choose_scale(bits, c, d, n), d)
    keys = jax.random.split(jax.random.key(1), n)
    got = np.asarray(_secure_sum(updates, enc, jax.random.key(7), keys))
    want = np.asarray(updates).sum(0) / 3.0
    # Each client's rounding moves each rotated coordinate by < 1 ring unit: the L2 error
    # of the sum is below sqrt(p) * n / gamma, plus float32 rounding of the rotations.
    bound = np.sqrt(enc.padded) * n / enc.scale + 1e-5 * np.linalg.norm(want)
    assert np.linalg.norm(got - want) < bound
    if bits == 32:
        assert np.linalg.norm(got - want) < 1e-4 * np.linalg.norm(want)


def test_rounding_error_of_the_decoded_sum_is_unbiased():
    n, d, bits = 8, 16, 10
    updates = _cohort(n, d, seed=2, norm=0.5)
    enc = RingEncoding(bits, 1.0, choose_scale(bits, 1.0, d, n), d)
    shared = jax.random.key(5)
    trials = jax.random.split(jax.random.key(9), 400)
    sums = jax.jit(jax.vmap(lambda t: _secure_sum(updates, enc, shared,
                                                  jax.random.split(t, n))))(trials)
    err = np.asarray(sums) - np.asarray(updates).sum(0)
    # The per-coordinate mean error over 400 trials shrinks like 1/sqrt(400).
    per_trial = err.std(0)
    assert np.all(np.abs(err.mean(0)) < 5 * per_trial / np.sqrt(400) + 1e-7)


def test_wrap_around_is_counted_and_the_scale_refuses_too_few_bits():
    with pytest.raises(ConfigError, match=r"bits=4: is too few for a cohort of 10"):
        choose_scale(4, 1.0, 100, 10)
    # k standard deviations n c / sqrt(p) of the (correlated) sum, plus n of rounding.
    assert choose_scale(8, 1.0, 64, 10) == pytest.approx((2**7 - 1 - 10) / (4 * 10 / 8))
    # With distributed noise: n^2/p + z^2 n/m under the root.
    assert choose_scale(8, 1.0, 64, 10, noise_multiplier=2.0, expected_clients=5) == (
        pytest.approx((2**7 - 1 - 10) / (4 * np.sqrt(100 / 64 + 4 * 10 / 5))))
    exact = jnp.asarray([-129.0, -128.0, 0.0, 127.0, 128.0], jnp.float32)
    assert int(count_wrapped(exact, 8)) == 2
    # A cohort all sending the same large coordinate, at half a standard deviation of
    # headroom, overflows an 8-bit ring.
    n, d, bits = 10, 4, 8
    enc = RingEncoding(bits, 1.0, choose_scale(bits, 1.0, d, n, k_stddevs=0.5), d)
    same = jnp.tile(jnp.asarray([[1.0, 0.0, 0.0, 0.0]], jnp.float32), (n, 1))
    shared = jax.random.key(0)
    keys = jax.random.split(jax.random.key(1), n)
    rotated = jax.jit(jax.vmap(lambda u: rotate(u, shared)))(same) * enc.scale
    assert int(count_wrapped(jnp.sum(rotated, 0), bits)) > 0
    got = np.asarray(_secure_sum(same, enc, shared, keys))
    assert np.linalg.norm(got - np.asarray(same).sum(0)) > 1.0  # wrapped: decoded wrong
