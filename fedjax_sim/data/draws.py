"""Counter-based random draws for data generated inside the round: cheap to compile.

A procedural population generates its clients' examples inside the round's program, so
every random draw of its recipe is compiled into the round. ``jax.random``'s samplers are
expensive there on CPU: each draw is a separate Threefry kernel, and
``jax.random.gamma`` (behind ``jax.random.dirichlet``) nests two rejection loops, each
with its own key splits and draws. For the main job's label-skewed population the
generator alone compiled in 6.3 s per program (3.2 s of it the Dirichlet label mix).

The samplers here hash counters with the unrolled Threefry-2x32 of
:mod:`fedjax_sim._threefry` and use both output words of every call:

* :func:`uniform` -- float32 on the open interval ``(0, 1)``, in steps of ``2^-23``
  (values ``(k + 1/2) 2^-23``; neither 0 nor 1 occurs, so ``log`` is always finite);
* :func:`normal` -- the inverse-CDF transform ``sqrt(2) erfinv(2u - 1)`` of those
  uniforms, as ``jax.random.normal`` does (tails cut at about 5.3 sigma, like JAX's);
* :func:`log_gamma` -- Marsaglia and Tsang's (2000) exact rejection sampler with one
  while loop and one hash per proposal, in log space with the ``U^(1/alpha)`` boost for
  ``alpha < 1`` (no underflow for small ``alpha``);
* :func:`dirichlet` -- the normalised gammas, computed as a softmax of the log gammas.

The distributions are exact up to float32 rounding (tests: Kolmogorov-Smirnov against
SciPy, Dirichlet moments against the closed form). Draws under distinct keys are
independent. The streams are not ``jax.random``'s: switching a generator to these
samplers changes its examples, not their distribution. Keys of another PRNG
implementation than Threefry fall back to the ``jax.random`` sampler of the same
distribution. These are for generated data, never for DP noise (which keeps
``jax.random``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim._threefry import key_words, threefry2x32
from fedjax_sim._validation import check_int, fail

__all__ = ["dirichlet", "log_gamma", "normal", "uniform"]

_F32 = jnp.float32


def _unit(words: jax.Array) -> jax.Array:
    """float32 ``(k + 1/2) 2^-23`` from the top 23 bits ``k`` of each word: in (0, 1)."""
    return ((words >> np.uint32(9)).astype(_F32) + _F32(0.5)) * _F32(2.0 ** -23)


def _normal_of(words: jax.Array) -> jax.Array:
    return _F32(math.sqrt(2.0)) * jax.lax.erf_inv(_F32(2.0) * _unit(words) - _F32(1.0))


def _words(k0: jax.Array, k1: jax.Array, n: int) -> jax.Array:
    """``n`` hashed words: words ``2i`` and ``2i + 1`` are the two outputs of Threefry on
    the counter ``(i, 0)``, so the first ``m`` words do not depend on ``n >= m``."""
    counter = jnp.arange(-(-n // 2), dtype=jnp.uint32)
    a, b = threefry2x32(k0, k1, counter, jnp.zeros_like(counter))
    return jnp.stack([a, b], axis=-1).reshape(-1)[:n]


def _size(shape: tuple[int, ...]) -> int:
    """Entries of a static ``shape`` (a tuple of non-negative ints), validated."""
    if not isinstance(shape, tuple):
        fail("shape", shape, "must be a tuple of non-negative ints")
    for i, dim in enumerate(shape):
        check_int(f"shape[{i}]", dim, min_value=0)
    size = int(np.prod(shape, dtype=np.int64))
    if size > 2 ** 33:  # two words per counter, 32-bit counters
        fail("shape", shape, "must have at most 2^33 entries")
    return size


def uniform(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """float32 uniforms on ``(0, 1)`` of ``shape`` (see the module docstring).

    In row-major order the first ``m`` values are the same for every ``shape`` with at
    least ``m`` entries (so are :func:`normal`'s).
    """
    size = _size(shape)
    words = key_words(key)
    if words is None:
        return jax.random.uniform(key, shape, _F32, minval=2.0 ** -24, maxval=1.0)
    return _unit(_words(*words, size)).reshape(shape)


def normal(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """float32 standard normals of ``shape`` (see the module docstring)."""
    size = _size(shape)
    words = key_words(key)
    if words is None:
        return jax.random.normal(key, shape, _F32)
    return _normal_of(_words(*words, size)).reshape(shape)


def log_gamma(key: jax.Array, alpha: jax.Array) -> jax.Array:
    """``log X`` with ``X ~ Gamma(alpha, 1)`` independently for each entry of ``alpha``.

    Args:
      key: PRNG key.
      alpha: float32 ``[n]`` shapes; a non-positive or non-finite entry gives NaN
        (instead of a loop that never accepts).

    Returns:
      float32 ``[n]``.
    """
    alpha = jnp.asarray(alpha, _F32)
    if alpha.ndim != 1:
        fail("alpha.shape", alpha.shape, "must be one-dimensional")
    words = key_words(key)
    if words is None:
        return jax.random.loggamma(key, alpha, _F32)
    k0, k1 = words
    n = alpha.shape[0]
    valid = jnp.isfinite(alpha) & (alpha > 0)
    boost = alpha < 1
    shape = jnp.where(valid, jnp.where(boost, alpha + 1, alpha), _F32(1.0))
    d = shape - _F32(1.0 / 3.0)
    c = _F32(1.0 / 3.0) / jnp.sqrt(d)
    index = jnp.arange(n, dtype=jnp.uint32)

    def propose(state):
        # Proposal j of entry i hashes the counter (i, j), j >= 1; (i, 0) is the boost's.
        j, done, log_v = state
        wx, wu = threefry2x32(k0, k1, index, jnp.broadcast_to(j, (n,)))
        x = _normal_of(wx)
        v = _F32(1.0) + c * x
        log_v3 = _F32(3.0) * jnp.log(jnp.where(v > 0, v, _F32(1.0)))
        accept = (v > 0) & (jnp.log(_unit(wu)) < _F32(0.5) * x * x + d
                            - d * jnp.exp(log_v3) + d * log_v3)
        return j + np.uint32(1), done | accept, jnp.where(done | ~accept, log_v, log_v3)

    _, _, log_v3 = jax.lax.while_loop(
        lambda state: ~jnp.all(state[1]), propose,
        (jnp.uint32(1), ~valid, jnp.zeros((n,), _F32)))
    boost_u, _ = threefry2x32(k0, k1, index, jnp.zeros((n,), jnp.uint32))
    log_boost = jnp.where(boost, jnp.log(_unit(boost_u)) / jnp.where(boost, alpha, 1), 0)
    return jnp.where(valid, jnp.log(d) + log_v3 + log_boost, jnp.nan)


def dirichlet(key: jax.Array, alpha: jax.Array) -> jax.Array:
    """A ``Dirichlet(alpha)`` vector (float32 ``[n]``, sums to 1): normalised gammas."""
    if key_words(key) is None:
        return jax.random.dirichlet(key, jnp.asarray(alpha, _F32))
    return jax.nn.softmax(log_gamma(key, alpha))
