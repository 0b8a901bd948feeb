"""A client's float update into ring elements, and the server's decoding of their sum.

The order of Kairouz, Liu and Steinke 2021 ("The Distributed Discrete Gaussian Mechanism
for Federated Learning with Secure Aggregation"), per client:

1. flatten the update to ``d`` floats, pad with zeros to ``p = 2^ceil(log2 d)``;
2. rotate by ``H D / sqrt(p)``: random signs ``D`` shared by the round's clients (public
   randomness: the ``shared_key``), then the orthonormal Walsh-Hadamard transform. The
   rotation spreads the vector's norm over all coordinates, so the ring's range is used
   evenly;
3. clip to L2 norm ``c`` (the rotation preserves the norm, so this is the clip of the
   update);
4. scale by ``gamma`` (:func:`choose_scale`) and round stochastically to integers
   (unbiased: ``E[round(x)] = x``);
5. wrap into ``Z_(2^b)`` (:func:`fedjax_sim.secagg.ring.wrap`).

The server decodes the modular sum: centre it to signed integers, divide by ``gamma``,
rotate back. Without wrap-around the decoded sum is the sum of the clipped updates plus
the rounding errors (unbiased, each under ``1 / gamma`` per rotated coordinate and
client). :func:`choose_scale` picks ``gamma`` so that ``k`` standard deviations of an
aggregate coordinate, plus the worst-case rounding, fit in the ring's half-range; a
coordinate beyond that wraps, and :func:`count_wrapped` counts such coordinates from the
unwrapped sum that only the simulator knows.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim._threefry import uniform_floats
from fedjax_sim._trees import l2_norm
from fedjax_sim._validation import check_float, check_int, fail
from fedjax_sim.secagg.ring import centre, check_bits, wrap
from fedjax_sim.server.compression import fwht

_INT32_LOW, _INT32_HIGH = -2.0**31, 2.0**31 - 128  # float32-exact bounds inside int32


def padded_size(dim: int) -> int:
    """``2^ceil(log2 dim)``: the length the Walsh-Hadamard transform needs."""
    d = check_int("dim", dim, min_value=1)
    return 1 << (d - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class RingEncoding:
    """How one round encodes updates of ``dim`` floats into ``Z_(2^bits)``."""

    bits: int
    clip_norm: float
    scale: float
    dim: int

    @property
    def padded(self) -> int:
        return padded_size(self.dim)


def choose_scale(bits: int, clip_norm: float, dim: int, num_clients: int, *,
                 k_stddevs: float = 4.0, noise_multiplier: float = 0.0,
                 expected_clients: float | None = None,
                 sum_norm: float | None = None) -> float:
    """``gamma`` such that ``k`` standard deviations of an aggregate coordinate fit.

    The sum of ``n`` clipped updates has L2 norm at most ``n c`` (client updates in one
    round are strongly correlated, so the ``sqrt(n) c`` of independent ones would wrap:
    measured, dozens of coordinates a round on the main job); after the shared random
    rotation each of its ``p`` coordinates is close to a centred Gaussian of standard
    deviation at most ``n c / sqrt(p)``. With distributed DP every client adds integer
    noise of variance ``(gamma z c)^2 / m`` (``m`` the expected number of clients, so
    that ``m`` shares make the central ``z c``); ``n`` shares add ``n/m (gamma z c)^2``.
    Stochastic rounding moves a coordinate by less than ``n`` ring units. ``gamma``
    makes ``k`` standard deviations plus ``n`` fill the half-range ``2^(b-1) - 1``:
    ``gamma = (2^(b-1) - 1 - n) / (k c sqrt(n^2/p + z^2 n/m))`` (with ``sum_norm`` in
    place of ``n c`` when given).

    Args:
      bits: the ring's ``b``.
      clip_norm: ``c``, each update's L2 bound.
      dim: the update's length (padded to ``p``).
      num_clients: ``n``, the most clients in one sum (the cohort's capacity).
      k_stddevs: ``k``.
      noise_multiplier: ``z`` of the distributed noise (0 without).
      expected_clients: ``m`` (default ``n``).
      sum_norm: a bound on the L2 norm of the sum of the clipped updates (default the
        worst case ``n c``; ``sqrt(n) c`` suits independent random vectors, e.g. mean
        estimation benchmarks).

    Raises:
      ConfigError: (naming ``bits``) when the rounding slack alone fills the ring.
    """
    b = check_bits(bits)
    c = check_float("clip_norm", clip_norm, min_value=0.0, min_exclusive=True)
    n = check_int("num_clients", num_clients, min_value=1)
    k = check_float("k_stddevs", k_stddevs, min_value=0.0, min_exclusive=True)
    z = check_float("noise_multiplier", noise_multiplier, min_value=0.0)
    m = n if expected_clients is None else check_float(
        "expected_clients", expected_clients, min_value=0.0, min_exclusive=True)
    room = 2.0 ** (b - 1) - 1 - n
    if room <= 0:
        fail("bits", b, f"is too few for a cohort of {n}: stochastic rounding alone can move "
             f"a coordinate of the sum by up to {n}, the ring's half-range is {2 ** (b - 1)}")
    signal = n * c if sum_norm is None else check_float(
        "sum_norm", sum_norm, min_value=0.0, min_exclusive=True)
    std = math.sqrt(signal * signal / padded_size(dim) + (z * c) ** 2 * n / m)
    return room / (k * std)


def rotate(flat: jax.Array, shared_key: jax.Array) -> jax.Array:
    """``H D x / sqrt(p)`` of the zero-padded ``flat`` (length ``p``)."""
    p = padded_size(flat.shape[0])
    signs = jax.random.rademacher(shared_key, (p,), jnp.float32)
    return fwht(signs * jnp.pad(flat.astype(jnp.float32), (0, p - flat.shape[0])))


def unrotate(rotated: jax.Array, shared_key: jax.Array, dim: int) -> jax.Array:
    """The inverse of :func:`rotate`, cut back to ``dim`` coordinates."""
    signs = jax.random.rademacher(shared_key, rotated.shape, jnp.float32)
    return (signs * fwht(rotated))[:dim]


def clip_l2(x: jax.Array, clip_norm: float) -> jax.Array:
    """``x`` scaled down to L2 norm ``clip_norm`` if longer (the norm is computed scaled,
    :func:`fedjax_sim._trees.l2_norm`, so it does not overflow)."""
    norm = l2_norm(x)
    return x * jnp.minimum(1.0, clip_norm / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny))


ROUNDING_BITS = 16
"""Resolution of the rounding probabilities: ``2^-16``."""


def stochastic_round(x: jax.Array, key: jax.Array) -> jax.Array:
    """Unbiased rounding to integers (float32): up with probability ``x - floor(x)``.

    The probability is that fraction rounded to the nearest multiple of ``2^-16``: the
    uniforms are the midpoints ``(k + 1/2) 2^-16``, four from each Threefry call
    (:func:`fedjax_sim._threefry.uniform_floats`). So ``|E[round(x)] - x| <= 2^-17``
    ring units, zero on average over the fraction, against a rounding variance of up to
    1/4. The 24-bit uniforms used before cost twice the hashing, which was a third of
    the secure round's encoding on the MLP (BENCHMARKS.md).
    """
    low = jnp.floor(x)
    uniform = uniform_floats(key, x.size, bits=ROUNDING_BITS).reshape(x.shape)
    up = uniform + np.float32(2.0 ** -(ROUNDING_BITS + 1)) < (x - low).astype(jnp.float32)
    return low + up.astype(x.dtype)


def encode(flat: jax.Array, shared_key: jax.Array, client_key: jax.Array,
           enc: RingEncoding) -> jax.Array:
    """One client's ``[dim]`` update as ``[padded]`` ``uint32`` ring elements."""
    rotated = clip_l2(rotate(flat, shared_key), enc.clip_norm)
    integers = stochastic_round(rotated * enc.scale, client_key)
    integers = jnp.clip(integers, _INT32_LOW, _INT32_HIGH).astype(jnp.int32)
    return wrap(integers, enc.bits)


def decode(total: jax.Array, shared_key: jax.Array, enc: RingEncoding) -> jax.Array:
    """The ``[dim]`` float sum that the modular sum ``total`` of the encodings stands for."""
    signed = centre(total, enc.bits).astype(jnp.float32)
    return unrotate(signed / enc.scale, shared_key, enc.dim)


def count_wrapped(unwrapped_sum: jax.Array, bits: int) -> jax.Array:
    """Coordinates of the exact integer sum (as floats; simulator ground truth) outside the
    ring's signed range ``[-2^(b-1), 2^(b-1))``: those the modular sum wrapped."""
    half = 2.0 ** (check_bits(bits) - 1)
    return jnp.sum((unwrapped_sum < -half) | (unwrapped_sum >= half)).astype(jnp.int32)


__all__ = ["RingEncoding", "choose_scale", "clip_l2", "count_wrapped", "decode", "encode",
           "padded_size", "rotate", "stochastic_round", "unrotate"]
