"""Reducers ``cohort -> aggregate``: sums, means and coordinate-wise/robust statistics.

Every reducer is a ``REDUCE`` stage (:mod:`fedjax_sim.server.base`). Sums and means carry
a streaming form (``partial`` per chunk, ``finalize`` on the total), so the round never
stacks the cohort's uploads for them; order statistics need the stacked cohort. The chain
zeroes masked clients before a reducer sees them.

Every reducer works with a fixed cohort size ``C`` and a variable number ``n`` of unmasked
clients inside jit: order statistics sort with masked entries pushed to ``+inf`` and then
index the sorted array with traced positions that depend on ``n``. A round with no
unmasked client yields an all-zero aggregate.

Krum, Multi-Krum and Bulyan (pairwise distances) live in :mod:`fedjax_sim.server.pairwise`.

Threat model of the robust reducers: up to ``f`` (or a fraction ``beta``) of the ``n``
unmasked clients are Byzantine and may send arbitrary vectors chosen with full knowledge of
the honest ones; the server and the honest clients are honest. Robustness bounds the
influence of those clients on the aggregate; it is not privacy.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from fedjax_sim._trees import expand_to as expand_mask
from fedjax_sim._trees import per_client_l2_norms, weighted_sum
from fedjax_sim._validation import check_float, check_int
from fedjax_sim.server.base import (CohortUpdates, Stage, StageKind, cohort_size,
                                    masked_weights)

PyTree = Any


def num_valid(cohort: CohortUpdates) -> jax.Array:
    """int32 scalar: the number of unmasked clients."""
    return jnp.sum(cohort.mask.astype(jnp.int32))


def sort_valid(u: jax.Array, mask: jax.Array) -> jax.Array:
    """Sorts along the cohort axis with masked clients moved to the end (as ``+inf``)."""
    return jnp.sort(jnp.where(expand_mask(mask, u), u, jnp.asarray(jnp.inf, u.dtype)), axis=0)


def sorted_at(s: jax.Array, index: jax.Array) -> jax.Array:
    """Row ``index`` (a traced int, clamped into range) of a sorted ``[C, ...]`` array."""
    index = jnp.clip(index, 0, s.shape[0] - 1)
    return lax.dynamic_index_in_dim(s, index, axis=0, keepdims=False)


def stateless_reducer(name: str, reduce_fn: Callable[[CohortUpdates], PyTree], *,
                      min_cohort: int = 1) -> Stage:
    """A stateless, non-streaming reducer ``reduce_fn(zero-masked cohort) -> aggregate``."""
    return Stage(name, StageKind.REDUCE, apply=lambda cohort, state: (reduce_fn(cohort), state),
                 min_cohort=min_cohort)


def sum_reducer(name: str, partial: Callable[[CohortUpdates], PyTree],
                finalize: Callable[[PyTree], PyTree], *, unit_sum: bool = False) -> Stage:
    """A stateless reducer that is a sum over clients: ``finalize(sum of partial(chunk))``."""
    return Stage(name, StageKind.REDUCE, partial=lambda chunk, state: partial(chunk),
                 finalize=lambda total, state: (finalize(total), state), unit_sum=unit_sum)


def _divide(total: PyTree, denominator: jax.Array) -> PyTree:
    """``total / denominator``, zero where the denominator is not positive (no NaN)."""
    scale = jnp.where(denominator > 0, 1.0 / jnp.where(denominator > 0, denominator, 1.0), 0.0)
    return jax.tree.map(lambda s: s * scale.astype(s.dtype), total)


def weighted_mean() -> Stage:
    """Reducer: the weight-normalised mean ``sum_c w_c u_c / sum_c w_c`` over unmasked clients.

    With example weights this is FedAvg's aggregate; with unit weights the plain client mean.
    A round in which every client is masked yields a zero aggregate (no NaN).
    """
    def partial(chunk):
        w = masked_weights(chunk)
        return weighted_sum(chunk.updates, w), jnp.sum(w)

    return sum_reducer("weighted_mean", partial, lambda total: _divide(*total))


def sum_updates(weighted: bool = False) -> Stage:
    """Reducer: the sum of the unmasked clients' uploads, ``sum_c a_c u_c``.

    With ``weighted=False`` (the DP-FedAvg default) ``a_c = 1`` for every unmasked client, so
    after ``clip_per_client(S)`` the sum has L2 sensitivity ``S`` under adding/removing one
    client (the stage declares ``unit_sum``). With ``weighted=True`` ``a_c`` is the
    client's weight; the sensitivity is then ``S * max_c a_c``, so cap weights at 1 for DP
    (McMahan et al. 2018).

    Args:
      weighted: multiply by the client weights.

    Returns:
      A streaming ``REDUCE`` stage named ``"sum_updates"``.
    """
    def partial(chunk):
        a = chunk.weights if weighted else chunk.mask.astype(jnp.float32)
        return weighted_sum(chunk.updates, a)

    return sum_reducer("sum_updates", partial, lambda total: total, unit_sum=not weighted)


def unweighted_mean() -> Stage:
    """Reducer: the plain mean ``(1/n) sum_c u_c`` over the ``n`` unmasked clients."""
    def partial(chunk):
        return (weighted_sum(chunk.updates, chunk.mask.astype(jnp.float32)),
                num_valid(chunk).astype(jnp.float32))

    return sum_reducer("unweighted_mean", partial, lambda total: _divide(*total))


def coordinate_median() -> Stage:
    """Reducer: the coordinate-wise median over the unmasked clients (weights ignored).

    For an even count the two middle values are averaged. Yin et al. 2018, "Byzantine-Robust
    Distributed Learning: Towards Optimal Statistical Rates": with a fraction ``beta < 1/2``
    of Byzantine clients each coordinate stays within the range of the honest values (the
    breakdown point is 1/2); the statistical rate assumes i.i.d. honest updates with bounded
    skewness.

    Returns:
      A non-streaming ``REDUCE`` stage named ``"coordinate_median"``.
    """
    def reduce_fn(cohort):
        n = num_valid(cohort)

        def leaf(u):
            s = sort_valid(u, cohort.mask)
            med = (sorted_at(s, (n - 1) // 2) + sorted_at(s, n // 2)) / 2
            return jnp.where(n > 0, med, jnp.zeros_like(med)).astype(u.dtype)

        return jax.tree.map(leaf, cohort.updates)

    return stateless_reducer("coordinate_median", reduce_fn)


def trimmed_mean(trim_fraction: float) -> Stage:
    """Reducer: the coordinate-wise mean after dropping the ``k`` largest and ``k`` smallest.

    ``k = floor(trim_fraction * n)`` for the ``n`` unmasked clients (computed from a host-side
    table, so it matches Python's float arithmetic exactly). Yin et al. 2018: tolerates a
    fraction ``beta <= trim_fraction < 1/2`` of Byzantine clients per coordinate. Weights are
    ignored.

    Args:
      trim_fraction: ``beta`` in ``[0, 0.5)``.

    Returns:
      A non-streaming ``REDUCE`` stage named ``"trimmed_mean"``.
    """
    beta = check_float("trim_fraction", trim_fraction, min_value=0.0, max_value=0.5,
                       max_exclusive=True)

    def reduce_fn(cohort):
        c = cohort_size(cohort)
        n = num_valid(cohort)
        k = jnp.asarray([math.floor(beta * i) for i in range(c + 1)], jnp.int32)[n]
        rank = jnp.arange(c)
        keep = (rank >= k) & (rank < n - k)
        count = jnp.maximum(n - 2 * k, 1).astype(jnp.float32)

        def leaf(u):
            s = sort_valid(u, cohort.mask)
            kept = jnp.where(expand_mask(keep, s), s, jnp.zeros((), s.dtype))
            return (jnp.sum(kept.astype(jnp.float32), axis=0) / count).astype(u.dtype)

        return jax.tree.map(leaf, cohort.updates)

    return stateless_reducer("trimmed_mean", reduce_fn)


def _per_client_dist(updates: PyTree, center: PyTree) -> jax.Array:
    """``[C]`` L2 distance of each client's upload to ``center`` (an upload-shaped tree)."""
    return per_client_l2_norms(jax.tree.map(lambda u, v: u - v[None], updates, center))


def geometric_median(num_iters: int = 8, eps: float = 1e-6) -> Stage:
    """Reducer: the weighted geometric median by the smoothed Weiszfeld algorithm.

    Robust Federated Aggregation (Pillutla, Kakade, Harchaoui 2022, "Robust Aggregation for
    Federated Learning", Alg. 2): starting at the weighted mean, repeat
    ``v <- sum_i b_i u_i / sum_i b_i`` with ``b_i = a_i / max(eps, ||v - u_i||)``, ``a_i``
    the clients' (masked) weights. The geometric median has breakdown point 1/2: it stays
    bounded while the Byzantine clients hold less than half of the total *weight*.

    Args:
      num_iters: Weiszfeld iterations (static; a few suffice in practice).
      eps: smoothing ``nu > 0`` that keeps the weights finite near a data point.

    Returns:
      A non-streaming ``REDUCE`` stage named ``"geometric_median"``.
    """
    iters = check_int("num_iters", num_iters, min_value=0)
    nu = check_float("eps", eps, min_value=0.0, min_exclusive=True)

    def reduce_fn(cohort):
        w = cohort.weights
        total = jnp.sum(w)
        a = w / jnp.where(total > 0, total, 1.0)

        def step(_, v):
            b = a / jnp.maximum(nu, _per_client_dist(cohort.updates, v))
            bsum = jnp.sum(b)
            return weighted_sum(cohort.updates, b / jnp.where(bsum > 0, bsum, 1.0))

        return lax.fori_loop(0, iters, step, weighted_sum(cohort.updates, a))

    return stateless_reducer("geometric_median", reduce_fn)


def centered_clipping(tau: float, num_iters: int = 1) -> Stage:
    """Reducer: centred clipping around the previous round's aggregate.

    Karimireddy, He, Jaggi 2021, "Learning from History for Byzantine Robust Optimization":
    from ``v_0`` = last round's aggregate (kept in the state), repeat
    ``v <- v + (1/n) sum_i (u_i - v) * min(1, tau / ||u_i - v||)`` over the ``n`` unmasked
    clients (weights ignored). Each Byzantine client moves the aggregate by at most
    ``tau / n`` per iteration, whatever it sends.

    Their convergence guarantee (a neighbourhood that shrinks with the Byzantine fraction
    ``delta < 1/2``) is for clients that upload *worker momentum*, ``m_i <- (1 - beta)
    g_i + beta m_i`` kept across rounds: momentum averages out the honest clients'
    variance, which is what lets a Byzantine update stand out in distance. Pair this
    reducer with :func:`fedjax_sim.algorithms.with_worker_momentum` (``worker_momentum``
    in the config) for that setting; with plain uploads it only bounds each client's
    per-round influence as stated above. A round with no unmasked client yields zero and
    keeps the state.

    Args:
      tau: clipping radius ``> 0``.
      num_iters: iterations ``>= 1`` (the paper: 1 suffices with momentum).

    Returns:
      A non-streaming ``REDUCE`` stage whose state is the previous aggregate.
    """
    radius = check_float("tau", tau, min_value=0.0, min_exclusive=True)
    iters = check_int("num_iters", num_iters, min_value=1)

    def init(upload):
        return jax.tree.map(jnp.zeros_like, upload)

    def apply(cohort, state):
        n = num_valid(cohort)
        maskf = cohort.mask.astype(jnp.float32)

        def step(_, v):
            dist = _per_client_dist(cohort.updates, v)
            scale = maskf * jnp.minimum(1.0, radius / jnp.maximum(dist, 1e-30))
            scale = scale / jnp.maximum(n, 1).astype(jnp.float32)
            moved = weighted_sum(cohort.updates, scale)
            return jax.tree.map(
                lambda vl, ml: (vl + ml - jnp.sum(scale).astype(vl.dtype) * vl).astype(vl.dtype),
                v, moved)

        v = lax.fori_loop(0, iters, step, state)
        out = jax.tree.map(lambda x: jnp.where(n > 0, x, jnp.zeros_like(x)), v)
        new_state = jax.tree.map(lambda x, s: jnp.where(n > 0, x, s), v, state)
        return out, new_state

    return Stage("centered_clipping", StageKind.REDUCE, init=init, apply=apply)
