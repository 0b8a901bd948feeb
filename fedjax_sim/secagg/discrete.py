"""Integer noise and norm-preserving rounding for distributed DP under secure aggregation.

Distributed DP (Kairouz, Liu, Steinke 2021, "The Distributed Discrete Gaussian Mechanism
for Federated Learning with Secure Aggregation"; Agarwal, Kairouz, Liu 2021, "The Skellam
Mechanism for Differentially Private Federated Learning"): each client adds integer noise
to its scaled, rounded update before it enters the ring, so that the server, which learns
only the modular sum, sees the cohort's sum plus the sum of the noise shares. Threat
model: an honest-but-curious server that sees only that sum; the privacy of the sum rests
on the shares of the clients that reached it (:mod:`fedjax_sim.privacy.distributed`
accounts for them) and on every client's noise key being secret.

* :func:`discrete_gaussian`: exact samples of ``N_Z(0, sigma^2)`` (Canonne, Kamath,
  Steinke 2020, Algorithm 3: rejection from a discrete Laplace, itself from uniform and
  geometric draws, Algorithm 2). No table over a truncated support: the only limit is the
  ``int32`` output (see the function);
* :func:`skellam`: the symmetric Skellam distribution, the difference of two Poissons;
* :func:`conditional_stochastic_round`: Kairouz et al.'s conditional randomized rounding,
  which keeps the rounded vector's L2 norm under :func:`inflated_norm_bound`, the bound
  the accounting uses as the L2 sensitivity.

Everything is pure, jittable and vmappable, with explicit PRNG keys. Probabilities are
resolved to float32 precision (each accept/reject step compares a float32 uniform with a
float32 probability), which is the sense in which the samplers are exact.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fedjax_sim._validation import check_float, check_int, fail
from fedjax_sim.secagg.encoding import stochastic_round

_INT32_MAX = 2**31 - 1
_GEOMETRIC_BLOCK = 8.0  # memoryless chunks of the geometric draw (see _geometric)
MAX_DISCRETE_GAUSSIAN_SIGMA = 2.0**28
"""Largest sigma checked on the host: beyond it the int32 output would cut off more than
``2 exp(-32)`` of the mass (the cut is at ``|z| >= 2^31``, 8 sigma)."""
MAX_SKELLAM_VARIANCE = 2.0**23
"""Largest Skellam variance: each Poisson(mu/2) then stays where float32 (JAX's Poisson
sampler) represents every integer, and the difference fits int32."""
NORM_MARGIN = 2.0**-10
"""Relative margin under the bound that an accepted rounding keeps, so that the float32
norm's rounding error (blocked sums of squares) cannot accept a vector above the bound."""


def _geometric(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """int32 ``V`` with ``P(V >= k) = e^-k`` (CKS Algorithm 2's ``V``), unbounded.

    ``floor(E)`` of an exponential ``E``, drawn in memoryless blocks: a draw at or past
    ``_GEOMETRIC_BLOCK`` adds the block and draws again, so the float32 exponential's own
    range never truncates the support.
    """
    def body(state):
        key, v, active = state
        key, sub = jax.random.split(key)
        e = jax.random.exponential(sub, shape, jnp.float32)
        step = jnp.minimum(jnp.floor(e), _GEOMETRIC_BLOCK).astype(jnp.int32)
        return key, v + jnp.where(active, step, jnp.zeros_like(step)), active & (
            e >= _GEOMETRIC_BLOCK)

    init = (key, jnp.zeros(shape, jnp.int32), jnp.ones(shape, bool))
    return jax.lax.while_loop(lambda s: jnp.any(s[2]), body, init)[1]


def _attempt(key: jax.Array, sigma: jax.Array, shape: tuple[int, ...]):
    """One round of candidates: ``(values int32, accepted bool)`` (CKS Algorithms 2, 3)."""
    t = jnp.floor(sigma) + 1.0  # the discrete Laplace scale, a positive integer
    t_int = t.astype(jnp.int32)
    k_u, k_v, k_w = jax.random.split(key, 3)
    w = jax.random.uniform(k_w, (3, *shape), jnp.float32)  # three independent uniforms
    # Discrete Laplace with P(x) ~ exp(-|x| / t): X = U + t V, U in [0, t) accepted with
    # probability exp(-U / t), V geometric; a sign, rejecting "-0" so 0 is not doubled.
    u = jax.random.randint(k_u, shape, jnp.zeros((), jnp.int32), t_int)
    ok = w[0] < jnp.exp(-u.astype(jnp.float32) / t)
    v = _geometric(k_v, shape)
    most = (jnp.int32(_INT32_MAX) - t_int) // t_int  # the int32 output needs |x| < 2^31
    ok &= v <= most
    x = u + t_int * jnp.minimum(v, most)
    negative = w[1] < 0.5
    ok &= ~(negative & (x == 0))
    # Discrete Gaussian: accept Y with probability exp(-(|Y| - sigma^2/t)^2 / (2 sigma^2)).
    gap = x.astype(jnp.float32) - sigma * sigma / t
    ok &= w[2] < jnp.exp(-gap * gap / (2 * sigma * sigma))
    return jnp.where(negative, -x, x), ok


def discrete_gaussian(key: jax.Array, sigma, shape: tuple[int, ...]) -> jax.Array:
    """Exact samples of the discrete Gaussian ``N_Z(0, sigma^2)``: ``P(z) ~ exp(-z^2/(2 sigma^2))``.

    Canonne, Kamath, Steinke 2020 ("The Discrete Gaussian for Differential Privacy"),
    Algorithm 3, vectorised: every entry draws candidates (a discrete Laplace of integer
    scale ``t = floor(sigma) + 1``, Algorithm 2, then accepted with probability
    ``exp(-(|y| - sigma^2/t)^2 / (2 sigma^2))``) until one is accepted, in a
    ``lax.while_loop`` over the whole array (each pass fills the entries still open).
    About 35-50% of candidates are accepted, so ``N`` entries take ``O(log N)`` passes.

    Its variance is at most ``sigma^2`` (close to it for ``sigma >= 1``); sums of
    independent shares are not discrete Gaussian (:mod:`fedjax_sim.privacy.distributed`
    accounts for that).

    Args:
      key: a PRNG key.
      sigma: the scale, >= 0: a Python float (checked on the host, at most
        :data:`MAX_DISCRETE_GAUSSIAN_SIGMA`) or a traced float32 scalar (unchecked). 0
        gives zeros. The int32 output conditions the draw on ``|z| < 2^31``, a cut of
        less than ``2 exp(-32)`` of the mass up to the largest checked sigma.
      shape: the output shape.

    Returns:
      int32 array of ``shape``.
    """
    if isinstance(sigma, (int, float)):
        check_float("sigma", sigma, min_value=0.0, max_value=MAX_DISCRETE_GAUSSIAN_SIGMA)
    return _discrete_gaussian(key, jnp.asarray(sigma, jnp.float32), tuple(shape))


@jax.jit(static_argnums=2)
def _discrete_gaussian(key: jax.Array, sigma: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    positive = sigma > 0
    safe = jnp.where(positive, sigma, jnp.ones_like(sigma))

    def body(state):
        key, out, done = state
        key, sub = jax.random.split(key)
        y, ok = _attempt(sub, safe, shape)
        return key, jnp.where(ok & ~done, y, out), done | ok

    init = (key, jnp.zeros(shape, jnp.int32), jnp.broadcast_to(~positive, shape))
    return jax.lax.while_loop(lambda s: ~jnp.all(s[2]), body, init)[1]


def skellam(key: jax.Array, mu, shape: tuple[int, ...]) -> jax.Array:
    """Symmetric Skellam samples of variance ``mu``: ``P1 - P2`` with ``P1, P2`` iid
    ``Poisson(mu / 2)`` (Agarwal et al. 2021). Sums of independent shares stay Skellam
    (the variances add).

    Args:
      key: a PRNG key.
      mu: the variance, >= 0: a Python float (checked, at most
        :data:`MAX_SKELLAM_VARIANCE`) or a traced float32 scalar. 0 gives zeros.
      shape: the output shape.

    Returns:
      int32 array of ``shape``.
    """
    if isinstance(mu, (int, float)):
        check_float("mu", mu, min_value=0.0, max_value=MAX_SKELLAM_VARIANCE)
    pair = jax.random.poisson(key, jnp.asarray(mu, jnp.float32) / 2.0, (2, *shape),
                              jnp.int32)
    return pair[0] - pair[1]


def inflated_norm_bound(scaled_clip: float, dim: int, beta: float) -> float:
    """The L2 norm bound after conditional randomized rounding of a ``dim``-vector whose
    norm is at most ``scaled_clip``: Kairouz et al. 2021, Theorem 1 (arXiv:2102.06387;
    the conditional-rounding bound is its Proposition 22), as the authors' code computes
    it (google-research/federated ``distributed_dp/accounting_utils.py``).

    ``min(c + sqrt(d), sqrt(c^2 + d/4 + sqrt(2 log(1/beta)) (c + sqrt(d)/2)))``: the
    first term is the deterministic worst case (each coordinate moves by < 1), the second
    holds for a plain unbiased rounding with probability at least ``1 - beta``, so
    :func:`conditional_stochastic_round` accepts within ``1 / (1 - beta)`` tries in
    expectation. ``beta = 0`` gives the deterministic bound ``c + sqrt(d)`` (every plain
    rounding is accepted).

    Args:
      scaled_clip: ``gamma * c``, the L2 norm of a scaled, clipped update, > 0.
      dim: the number of coordinates rounded (the padded length ``p``), >= 1.
      beta: in [0, 1).
    """
    c = check_float("scaled_clip", scaled_clip, min_value=0.0, min_exclusive=True)
    d = check_int("dim", dim, min_value=1)
    b = check_float("beta", beta, min_value=0.0, max_value=1.0, max_exclusive=True)
    worst = c + math.sqrt(d)
    if b == 0.0:
        return worst
    squared = c * c + d / 4.0 + math.sqrt(2.0 * math.log(1.0 / b)) * (c + math.sqrt(d) / 2.0)
    return min(worst, math.sqrt(squared))


def _squared_norm(x: jax.Array) -> jax.Array:
    """float32 sum of squares, in blocks of 1024 (rounding error ~ (1024 + n/1024) ulp)."""
    flat = x.reshape(-1).astype(jnp.float32)
    flat = jnp.pad(flat, (0, -flat.shape[0] % 1024))
    return jnp.sum(jnp.sum(jnp.square(flat).reshape(-1, 1024), axis=1))


def conditional_stochastic_round(x: jax.Array, key: jax.Array, norm_bound, *,
                                 input_bound: float | None = None,
                                 max_tries: int = 100) -> tuple[jax.Array, jax.Array]:
    """Kairouz et al. 2021's conditional randomized rounding of a scaled update.

    Rounds ``x`` stochastically and without bias to integers, and repeats with fresh
    randomness (``fold_in(key, try)``) until the rounded vector's L2 norm is at most
    ``norm_bound`` (with a relative margin of :data:`NORM_MARGIN` for the float32 norm).
    With ``norm_bound = inflated_norm_bound(gamma c, p, beta)`` a try is accepted with
    probability at least ``1 - beta``, and an accepted vector is within the L2 sensitivity
    the accounting assumes.

    Args:
      x: float array (e.g. the rotated, clipped update times gamma).
      key: a PRNG key.
      norm_bound: float or traced float32 scalar, > 0.
      input_bound: optional host float ``A >= ||x||`` (the clipped, scaled norm
        ``gamma c``). Then a try is accepted when ``2 <x, e> + ||e||^2 <= B^2 - A^2``
        for its rounding error ``e`` (the slack computed in float64 on the host): exact
        where float32 cannot resolve ``||x + e||`` against ``B`` (a large ``gamma c``,
        where ``B`` exceeds ``A`` by less than a float32 ulp of ``A^2``), and it implies
        ``||x + e|| <= B``; it is the plain test when ``||x|| = A`` (clipping active),
        stricter otherwise.
      max_tries: how many roundings to try (static).

    Returns:
      ``(rounded, accepted)``: float32 integers of ``x``'s shape, and a bool scalar.
      When no try is accepted the last one is returned with ``accepted = False``; its norm
      may exceed the bound, so a caller that needs the bound unconditionally (for the DP
      guarantee) replaces it, e.g. with zeros.
    """
    max_tries = check_int("max_tries", max_tries, min_value=1)
    x = jnp.asarray(x, jnp.float32)
    limit = jnp.square(jnp.asarray(norm_bound, jnp.float32) * (1.0 - NORM_MARGIN))

    if input_bound is not None:
        a = check_float("input_bound", input_bound, min_value=0.0)
        b = float(norm_bound)
        slack = jnp.float32((b * b - a * a) * (1.0 - NORM_MARGIN))
        if b < a:
            fail("norm_bound", b, f"is below the input bound {a!r}")

    def attempt(i):
        rounded = stochastic_round(x, jax.random.fold_in(key, i))
        if input_bound is None:
            return rounded, _squared_norm(rounded) <= limit
        e = rounded - x
        return rounded, 2.0 * jnp.sum(x * e) + _squared_norm(e) <= slack

    def body(state):
        i, _, _ = state
        rounded, ok = attempt(i)
        return i + 1, rounded, ok

    first, ok = attempt(jnp.zeros((), jnp.int32))
    state = (jnp.ones((), jnp.int32), first, ok)
    _, rounded, ok = jax.lax.while_loop(lambda s: ~s[2] & (s[0] < max_tries), body, state)
    return rounded, ok


__all__ = ["MAX_DISCRETE_GAUSSIAN_SIGMA", "MAX_SKELLAM_VARIANCE", "NORM_MARGIN",
           "conditional_stochastic_round", "discrete_gaussian", "inflated_norm_bound",
           "skellam"]
