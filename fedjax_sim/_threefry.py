"""Threefry-2x32 with its rounds unrolled: cheap per-client random bits inside vmap.

JAX lowers its Threefry hash on CPU as a rolled 5-iteration loop (to keep compile times
short). Inside a vmapped client update that loop runs once per chunk of clients, and
every iteration pays per-operation dispatch costs on a few thousand words: for softmax
regression the per-epoch shuffle's random bits were about 12% of a round (BENCHMARKS.md).
Unrolled, the 20 rounds are one fused elementwise kernel.

This is the same function as ``jax.extend.random.threefry_2x32`` (Salmon et al. 2011,
"Parallel random numbers: as easy as 1, 2, 3", Threefry-2x32 with 20 rounds); the tests
check it bit for bit against JAX's. It is used only where a key's bits feed a shuffle,
never for DP noise (which keeps ``jax.random``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)


def _rotl(x: jax.Array, r: int) -> jax.Array:
    return lax.bitwise_or(lax.shift_left(x, np.uint32(r)),
                          lax.shift_right_logical(x, np.uint32(32 - r)))


def threefry2x32(k0: jax.Array, k1: jax.Array, x0: jax.Array, x1: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
    """Threefry-2x32 (20 rounds) of the word pairs ``(x0, x1)`` under the key ``(k0, k1)``.

    All arguments are uint32 and broadcast together; returns the two output words.
    Written with ``lax`` operations: ``jnp``'s operators are small jitted functions, and
    tracing the 100-odd operations of each hash through them took a second of a round's
    tracing.
    """
    k0, k1, x0, x1 = (jnp.asarray(a, jnp.uint32) for a in (k0, k1, x0, x1))
    shape = jnp.broadcast_shapes(k0.shape, k1.shape, x0.shape, x1.shape)
    k0, k1 = (a if a.shape == shape or a.ndim == 0 else jnp.broadcast_to(a, shape)
              for a in (k0, k1))
    x0, x1 = (a if a.shape == shape else jnp.broadcast_to(a, shape) for a in (x0, x1))
    ks = (k0, k1, lax.bitwise_xor(lax.bitwise_xor(k0, k1), _PARITY))
    x0 = lax.add(x0, ks[0])
    x1 = lax.add(x1, ks[1])
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x0 = lax.add(x0, x1)
            x1 = lax.bitwise_xor(_rotl(x1, r), x0)
        x0 = lax.add(x0, ks[(i + 1) % 3])
        x1 = lax.add(lax.add(x1, ks[(i + 2) % 3]), np.uint32(i + 1))
    return x0, x1


def key_words(key: jax.Array) -> tuple[jax.Array, jax.Array] | None:
    """The two uint32 words of a scalar Threefry key, or None for another PRNG impl."""
    data = jax.random.key_data(key)
    if data.shape != (2,) or data.dtype != jnp.uint32:
        return None
    return data[0], data[1]


def stream_bits(key: jax.Array, stream: int | jax.Array, n: int) -> jax.Array:
    """``n`` pseudo-random uint32 words of stream ``stream`` under ``key``.

    Word i is the first output word of Threefry-2x32 on the counter ``(i, stream)``, so
    word i does not depend on ``n`` and distinct streams never share a counter. Keys of
    other PRNG implementations fall back to ``jax.random.bits`` of ``fold_in(key, stream)``.
    """
    words = key_words(key)
    if words is None:
        return jax.random.bits(jax.random.fold_in(key, stream), (n,), jnp.uint32)
    counter = jnp.arange(n, dtype=jnp.uint32)
    out, _ = threefry2x32(words[0], words[1], counter,
                          jnp.broadcast_to(jnp.asarray(stream, jnp.uint32), (n,)))
    return out


def uniform_floats(key: jax.Array, n: int, *, bits: int = 24) -> jax.Array:
    """``n`` float32 uniforms on ``[0, 1)`` in steps of ``2^-bits``, from both output words
    of each Threefry-2x32 call on the counters ``(i, 0)``.

    ``bits=24`` (finer than ``jax.random.uniform``'s ``2^-23``) takes one uniform from
    each word: half the hashing of ``jax.random.uniform``. ``bits=16`` takes two from each
    word (its high and low halves): a quarter. Keys of other PRNG implementations fall
    back to ``jax.random.uniform``.
    """
    if bits not in (16, 24):
        raise ValueError(f"uniform_floats: bits={bits} must be 16 or 24")
    words = key_words(key)
    if words is None:
        return jax.random.uniform(key, (n,), jnp.float32)
    per_call = 2 if bits == 24 else 4
    counter = jnp.arange(-(-n // per_call), dtype=jnp.uint32)
    a, b = threefry2x32(words[0], words[1], counter, jnp.zeros_like(counter))
    if bits == 24:
        values = jnp.concatenate([a, b]) >> np.uint32(8)
    else:
        low = np.uint32(0xFFFF)
        values = jnp.concatenate([a >> np.uint32(16), a & low, b >> np.uint32(16), b & low])
    return values[:n].astype(jnp.float32) * np.float32(2.0 ** -bits)
