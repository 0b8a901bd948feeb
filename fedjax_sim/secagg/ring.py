"""The integer ring of secure aggregation: ``Z_(2^b)`` held in unsigned 32-bit words.

Secure aggregation (Bonawitz et al. 2017; Bell et al. 2020) sums integer vectors modulo
``2^b``: each client uploads a vector of ring elements, and the server learns only their
sum mod ``2^b``. This module is that arithmetic, exactly, for every ``b`` from 1 to 32:

* :func:`wrap` maps integers to ring elements (``x mod 2^b``) in ``uint32`` words;
* :func:`ring_sum` adds ring elements with the hardware's ``uint32`` wrap-around and then
  reduces mod ``2^b`` (``2^b`` divides ``2^32``, so the two reductions agree exactly);
* :func:`centre` maps a ring element back to the signed integer in
  ``[-2^(b-1), 2^(b-1))`` that it represents (sign extension by shifts);
* :func:`modular_clip` wraps integers into a half-open range ``[lo, hi)``.

All of it is integer arithmetic: no float32 rounding, so ``b`` can go to 32 (TFF's
distributed-DP aggregators stop at 22 bits because they hold ring elements in float32).
Known vectors (tests): ``modular_clip([20, 5, -15, 10], -5, 10) == [5, 5, 0, -5]`` and
``[1, 3, 6]`` summed mod 4 is 2.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim._validation import check_int

MAX_BITS = 32
"""The widest ring: ``Z_(2^32)``, one ``uint32`` word per coordinate."""


def check_bits(bits: int, field: str = "bits") -> int:
    """``bits`` as an int in ``[1, 32]`` (one-line ConfigError naming ``field`` else)."""
    return check_int(field, bits, min_value=1, max_value=MAX_BITS)


def ring_mask(bits: int) -> np.uint32:
    """``2^b - 1`` as a ``uint32`` (all ones for ``b = 32``)."""
    b = check_bits(bits)
    return np.uint32((1 << b) - 1)


def wrap(x: jax.Array, bits: int) -> jax.Array:
    """``x mod 2^b`` as ``uint32`` ring elements, for ``int32`` integers ``x``.

    The two's-complement bits of an ``int32`` are its value mod ``2^32``; masking keeps
    the low ``b`` bits, which is the value mod ``2^b``.
    """
    x = jnp.asarray(x)
    if x.dtype != jnp.int32:
        raise TypeError(f"wrap: expects int32 integers, got {x.dtype}")
    return jax.lax.bitcast_convert_type(x, jnp.uint32) & ring_mask(bits)


def ring_sum(elements: jax.Array, bits: int, *, axis: int = 0) -> jax.Array:
    """The sum of ``uint32`` ring elements along ``axis``, mod ``2^b``."""
    elements = jnp.asarray(elements)
    if elements.dtype != jnp.uint32:
        raise TypeError(f"ring_sum: expects uint32 ring elements, got {elements.dtype}")
    return jnp.sum(elements, axis=axis, dtype=jnp.uint32) & ring_mask(bits)


def centre(elements: jax.Array, bits: int) -> jax.Array:
    """The ``int32`` in ``[-2^(b-1), 2^(b-1))`` that each ring element represents."""
    elements = jnp.asarray(elements)
    if elements.dtype != jnp.uint32:
        raise TypeError(f"centre: expects uint32 ring elements, got {elements.dtype}")
    shift = jnp.uint32(MAX_BITS - check_bits(bits))
    high = jax.lax.shift_left(elements & ring_mask(bits), shift)
    signed = jax.lax.bitcast_convert_type(high, jnp.int32)
    return jax.lax.shift_right_arithmetic(signed, shift.astype(jnp.int32))


def modular_clip(x: jax.Array, lo: int, hi: int) -> jax.Array:
    """Integers ``x`` wrapped into ``[lo, hi)``: ``lo + (x - lo) mod (hi - lo)``."""
    if not hi > lo:
        raise ValueError(f"modular_clip: needs hi > lo, got [{lo}, {hi})")
    x = jnp.asarray(x)
    width = jnp.asarray(hi - lo, x.dtype)
    return jnp.mod(x - jnp.asarray(lo, x.dtype), width) + jnp.asarray(lo, x.dtype)


__all__ = ["MAX_BITS", "centre", "check_bits", "modular_clip", "ring_mask", "ring_sum",
           "wrap"]
