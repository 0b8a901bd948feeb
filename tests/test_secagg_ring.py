"""The secure-aggregation ring Z_(2^b) in uint32 words agrees with Python's exact integer
arithmetic for every b from 1 to 32, and with the issue's known vectors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sim._validation import ConfigError
from fedjax_sim.secagg import centre, check_bits, modular_clip, ring_sum, wrap

BITS = [1, 2, 3, 8, 16, 22, 23, 24, 30, 31, 32]


def test_known_vectors():
    x = jnp.asarray([20, 5, -15, 10], jnp.int32)
    np.testing.assert_array_equal(modular_clip(x, -5, 10), [5, 5, 0, -5])
    assert int(ring_sum(wrap(jnp.asarray([1, 3, 6], jnp.int32), 2), 2)) == 2


@pytest.mark.parametrize("bits", BITS)
def test_sum_and_centre_agree_with_python_integers(bits):
    rng = np.random.default_rng(bits)
    values = rng.integers(-2**31, 2**31, size=(37, 11), dtype=np.int64)
    got_wrap = np.asarray(wrap(jnp.asarray(values, jnp.int32), bits))
    want_wrap = np.vectorize(lambda v: v % 2**bits)(values)
    np.testing.assert_array_equal(got_wrap.astype(np.int64), want_wrap)

    total = np.asarray(jax.jit(ring_sum, static_argnums=1)(jnp.asarray(got_wrap), bits))
    exact = [int(sum(int(v) for v in values[:, j])) % 2**bits for j in range(11)]
    np.testing.assert_array_equal(total.astype(np.int64), exact)

    signed = np.asarray(centre(jnp.asarray(total), bits)).astype(np.int64)
    half = 2 ** (bits - 1)
    want = [(e + half) % 2**bits - half for e in exact]
    np.testing.assert_array_equal(signed, want)
    assert signed.min() >= -half and signed.max() < half


@pytest.mark.parametrize("bits", BITS)
def test_centre_inverts_wrap_inside_the_range(bits):
    half = 2 ** (bits - 1)
    x = np.unique(np.clip(np.array([-half, -half + 1, -1, 0, 1, half - 2, half - 1]),
                          -half, half - 1))
    np.testing.assert_array_equal(np.asarray(centre(wrap(jnp.asarray(x, jnp.int32), bits),
                                                    bits)), x)


def test_modular_clip_matches_python_modulo():
    rng = np.random.default_rng(0)
    x = rng.integers(-1000, 1000, 500)
    for lo, hi in [(-5, 10), (0, 7), (-64, 64), (3, 4)]:
        want = [lo + (int(v) - lo) % (hi - lo) for v in x]
        np.testing.assert_array_equal(modular_clip(jnp.asarray(x, jnp.int32), lo, hi), want)


def test_bad_inputs():
    for bits in (0, 33, 2.5):
        with pytest.raises(ConfigError, match="bits="):
            check_bits(bits)
    with pytest.raises(TypeError, match="int32"):
        wrap(jnp.zeros(3, jnp.float32), 8)
    with pytest.raises(TypeError, match="uint32"):
        ring_sum(jnp.zeros(3, jnp.int32), 8)
    with pytest.raises(ValueError, match="hi > lo"):
        modular_clip(jnp.zeros(3, jnp.int32), 4, 4)
