"""Divide-and-Conquer (DnC): spectral outlier filtering on random coordinate subsets.

Shejwalkar & Houmansadr 2021, "Manipulating the Byzantine: Optimizing Model Poisoning
Attacks and Defenses for Federated Learning" (NDSS), Algorithm 2. Each of ``num_iters``
iterations samples ``b`` coordinates, centres the unmasked clients' sampled uploads on
their mean, scores every client by its squared projection on the top right singular vector
of the centred matrix and drops the ``c * f`` highest scores; the aggregate is the plain
mean of the clients that survive every iteration.

The cohort size ``C`` is static; the number ``n`` of unmasked clients is traced. No
flattened ``[C, d]`` copy of the cohort is made: each iteration gathers its ``b``
coordinates leaf by leaf into a ``[C, b]`` matrix, so the memory beyond the uploads is
``O(C * b + d)`` (the ``d`` is the permutation that samples the subset).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from fedjax_sim._trees import weighted_sum
from fedjax_sim._validation import check_float, check_int
from fedjax_sim.server.base import CohortUpdates, Stage, StageKind, cohort_size
from fedjax_sim.server.clipping import check_key
from fedjax_sim.server.reducers import num_valid

PyTree = Any
_HIGHEST = lax.Precision.HIGHEST


class DnCState(NamedTuple):
    """State of :func:`dnc`.

    Attributes:
      key: PRNG key of the coordinate subsets, split on every round.
      num_kept: int32, the number of clients the last round averaged (a diagnostic).
    """

    key: jax.Array
    num_kept: jax.Array


def num_coordinates(updates: PyTree) -> int:
    """The static number ``d`` of coordinates of one client's upload (all leaves)."""
    return sum(math.prod(u.shape[1:]) for u in jax.tree.leaves(updates))


def coordinate_subsets(key: jax.Array, dim: int, subsample_dim: int,
                       num_iters: int) -> jax.Array:
    """``[num_iters, b]`` int32 coordinate indices, each row sampled without replacement.

    Row ``t`` is ``jax.random.choice(keys[t], dim, (b,), replace=False)`` with
    ``keys = jax.random.split(key, num_iters)``. With ``subsample_dim >= dim`` every
    iteration would see the same (full) matrix, so the result is the single row
    ``arange(dim)``.
    """
    if subsample_dim >= dim:
        return jnp.arange(dim, dtype=jnp.int32)[None]
    keys = jax.random.split(key, num_iters)
    return lax.map(lambda k: jax.random.choice(k, dim, (subsample_dim,), replace=False)
                   .astype(jnp.int32), keys)


def gather_coordinates(updates: PyTree, index: jax.Array) -> jax.Array:
    """``[C, b]`` float32: coordinates ``index`` (into the concatenated leaves) per client."""
    leaves = [u.reshape(u.shape[0], -1) for u in jax.tree.leaves(updates)]
    out = jnp.zeros((leaves[0].shape[0], index.shape[0]), jnp.float32)
    offset = 0
    for x in leaves:
        size = x.shape[1]
        if size == 0:
            continue
        local = index - offset
        inside = (local >= 0) & (local < size)
        vals = jnp.take(x, jnp.clip(local, 0, size - 1), axis=1).astype(jnp.float32)
        out = out + jnp.where(inside[None, :], vals, 0.0)
        offset += size
    return out


def outlier_scores(sampled: jax.Array, mask: jax.Array) -> jax.Array:
    """``[C]`` float32 squared projections ``((u_i - mu) . v)^2`` of a ``[C, b]`` matrix.

    ``mu`` is the mean of the unmasked rows and ``v`` the top right singular vector of the
    centred unmasked rows (``jnp.linalg.svd``, masked rows set to zero). Masked clients
    score 0; a sign flip of ``v`` changes nothing.
    """
    n = jnp.sum(mask.astype(jnp.float32))
    rows = mask[:, None]
    mu = jnp.sum(jnp.where(rows, sampled, 0.0), axis=0) / jnp.maximum(n, 1.0)
    centred = jnp.where(rows, sampled - mu[None, :], 0.0)
    _, _, vh = jnp.linalg.svd(centred, full_matrices=False)
    proj = jnp.matmul(centred, vh[0], precision=_HIGHEST)
    return jnp.where(mask, jnp.square(proj), 0.0)


def dnc_good_set(updates: PyTree, mask: jax.Array, subsets: jax.Array,
                 num_remove: jax.Array | int) -> jax.Array:
    """``[C]`` bool: the unmasked clients never among the ``num_remove`` highest scores.

    Args:
      updates: pytree of leaves ``[C, ...]`` (a ``[C, d]`` matrix is one), masked rows
        finite (the chain zeroes them).
      mask: ``[C]`` bool, the unmasked clients.
      subsets: ``[T, b]`` int32 coordinate indices, one row per iteration.
      num_remove: clients dropped per iteration (traced is fine), at most ``n - 1``.

    Returns:
      The intersection over iterations of the kept clients. Ties in the scores go to
      the lower index (stable sort).
    """
    c = mask.shape[0]

    def removed(index):
        scores = outlier_scores(gather_coordinates(updates, index), mask)
        order = jnp.argsort(jnp.where(mask, -scores, jnp.inf), stable=True)
        rank = jnp.zeros((c,), jnp.int32).at[order].set(jnp.arange(c, dtype=jnp.int32))
        return mask & (rank < num_remove)

    return mask & ~jnp.any(lax.map(removed, subsets), axis=0)


def dnc(num_byzantine: int, *, key: jax.Array, subsample_dim: int = 10_000,
        num_iters: int = 5, filter_frac: float = 1.0) -> Stage:
    """Reducer: Divide-and-Conquer, the plain mean of the clients that pass spectral filtering.

    Shejwalkar & Houmansadr 2021, "Manipulating the Byzantine: Optimizing Model Poisoning
    Attacks and Defenses for Federated Learning" (NDSS), Algorithm 2. Over the ``n``
    unmasked clients, ``num_iters`` times:

    1. sample ``b = subsample_dim`` of the ``d`` coordinates without replacement (all of
       them, once, if ``b >= d``);
    2. centre the clients' sampled uploads on their mean ``mu``;
    3. take the top right singular vector ``v`` of the centred ``[n, b]`` matrix (an exact
       ``jnp.linalg.svd``, not power iteration);
    4. score client ``i`` by ``((u_i - mu) . v)^2`` and drop the ``min(floor(c f), n - 1)``
       highest scores.

    The good set is the intersection of the kept sets; the aggregate is the unweighted mean
    of the good clients' full uploads (weights are ignored, as in the paper). A round with
    no unmasked client, or whose kept sets do not intersect, yields a zero aggregate (the
    round is skipped); ``num_kept`` in the state reports the good set's size.

    Randomness: the state holds a PRNG key; each round splits it into the next state's key
    and this round's key, which is split once per iteration, so every round draws fresh
    subsets. The subsets depend only on the key and ``d``, never on the clients or their
    order.

    Threat model: up to ``f`` of the ``n`` unmasked clients are Byzantine, colluding and
    omniscient (they know the honest uploads and the algorithm, not the server's key); the
    server is honest. DnC assumes ``f < n / 2`` (``min_cohort = 2f + 1``); with fewer
    unmasked clients it still runs (dropping at most ``n - 1`` per iteration) without the
    assumption. It expects finite uploads (the round masks non-finite ones).

    Guarantee: none formal. The motivation (from robust mean estimation) is that a
    poisoning direction that moves the mean far must add variance along it, which the top
    singular direction exposes; subsampling coordinates keeps the SVD cheap and makes the
    projection unpredictable to the attacker. Its robustness is empirical (the paper's
    evaluation against their optimised AGR-tailored and AGR-agnostic attacks); an attacker
    that stays within the honest spread along every direction is not removed, and
    ``c * f`` honest clients are discarded each iteration when no one attacks.

    Args:
      num_byzantine: ``f >= 0``, the number of Byzantine clients assumed.
      key: PRNG key for the coordinate subsets (kept in the state, split every round).
      subsample_dim: ``b >= 1`` coordinates per iteration (the paper uses 10,000).
      num_iters: iterations ``>= 1`` (the paper uses 5).
      filter_frac: ``c > 0``, the filtering fraction: ``floor(c f)`` clients are dropped
        per iteration (the paper's default 1.0).

    Returns:
      A non-streaming ``REDUCE`` stage named ``"dnc"`` with ``min_cohort = 2f + 1`` and
      state :class:`DnCState`.
    """
    f = check_int("num_byzantine", num_byzantine, min_value=0)
    b = check_int("subsample_dim", subsample_dim, min_value=1)
    iters = check_int("num_iters", num_iters, min_value=1)
    c = check_float("filter_frac", filter_frac, min_value=0.0, min_exclusive=True)
    key = check_key("key", key)
    drop = math.floor(c * f)

    def init(params):
        del params
        return DnCState(key, jnp.zeros((), jnp.int32))

    def apply(cohort: CohortUpdates, state: DnCState):
        next_key, round_key = jax.random.split(state.key)
        n = num_valid(cohort)
        num_remove = jnp.maximum(jnp.minimum(min(drop, cohort_size(cohort)), n - 1), 0)
        subsets = coordinate_subsets(round_key, num_coordinates(cohort.updates), b, iters)
        good = dnc_good_set(cohort.updates, cohort.mask, subsets, num_remove)
        num_kept = jnp.sum(good.astype(jnp.int32))
        scale = good.astype(jnp.float32) / jnp.maximum(num_kept, 1).astype(jnp.float32)
        return weighted_sum(cohort.updates, scale), DnCState(next_key, num_kept)

    return Stage("dnc", StageKind.REDUCE, init=init, apply=apply, min_cohort=2 * f + 1)
