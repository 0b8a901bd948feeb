"""The unrolled Threefry-2x32 is JAX's Threefry, bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.random import threefry_2x32

from fedjax_sim._threefry import stream_bits, threefry2x32


def test_threefry_matches_jax_bit_for_bit():
    rng = np.random.default_rng(0)
    for _ in range(5):
        key = rng.integers(0, 2**32, 2, dtype=np.uint64).astype(np.uint32)
        words = rng.integers(0, 2**32, 64, dtype=np.uint64).astype(np.uint32)
        ref = np.asarray(threefry_2x32(jnp.asarray(key), jnp.asarray(words)))
        x0, x1 = jax.jit(threefry2x32)(*map(jnp.asarray, (key[0], key[1], words[:32],
                                                            words[32:])))
        np.testing.assert_array_equal(np.concatenate([x0, x1]), ref)


def test_stream_bits_prefix_stable_and_streams_differ():
    key = jax.random.key(3)
    a = np.asarray(stream_bits(key, 0, 40))
    np.testing.assert_array_equal(np.asarray(stream_bits(key, 0, 100))[:40], a)
    assert np.mean(a == np.asarray(stream_bits(key, 1, 40))) < 0.1
    assert np.mean(a == np.asarray(stream_bits(jax.random.key(4), 0, 40))) < 0.1
    # Each output bit is fair (4,000 words: a 5-sigma band around 1/2).
    bits = np.unpackbits(np.asarray(stream_bits(key, 7, 4000)).view(np.uint8))
    assert abs(bits.mean() - 0.5) < 5 * 0.5 / np.sqrt(bits.size)


def test_stream_bits_accepts_other_prng_impls():
    key = jax.random.key(0, impl="rbg")
    out = stream_bits(key, 2, 16)
    assert out.shape == (16,) and out.dtype == jnp.uint32
