"""The cohort's uploads as the server chain sees them, and the helpers every stage uses.

A :class:`CohortUpdates` holds the stacked uploads of a cohort (or of one chunk of it)
with their weights, mask and client ids; :class:`Counts` are the clients that reached
the reducer. Masked clients are zeroed once, when the cohort enters the chain
(:func:`zero_masked`). The stages and their chain are in :mod:`fedjax_sim.server.base`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_sim._trees import select_clients

PyTree = Any


class CohortUpdates(NamedTuple):
    """Stacked client uploads that a client/cohort stage or a reducer consumes.

    Attributes:
      updates: pytree of per-client uploads, every leaf ``[C, ...]``.
      weights: ``[C]`` float32 aggregation weights (0 for masked clients).
      mask: ``[C]`` bool, ``True`` for clients whose upload takes part in aggregation.
      client_ids: ``[C]`` int32 population ids (``-1`` for padding), or None (then a
        client stage keys its randomness by position in the cohort).
    """

    updates: PyTree
    weights: jax.Array
    mask: jax.Array
    client_ids: jax.Array | None = None


class Counts(NamedTuple):
    """int32 counts of the clients that reached the reducer (after client stages).

    Attributes:
      aggregated: unmasked clients (what the round reports as ``num_aggregated``).
      contributing: those of them with a positive weight (a client with no data has
        weight 0 in a weighted mean).
      aborted: bool, the reducer's protocol could not finish (secure aggregation with too
        few survivors): the round must change no model, no server state and no client
        state. False for every reducer without a protocol.
    """

    aggregated: jax.Array
    contributing: jax.Array
    aborted: jax.Array | bool = False


def count_clients(cohort: CohortUpdates) -> Counts:
    """The :class:`Counts` of a (zero-masked) cohort or chunk; additive over chunks."""
    return Counts(jnp.sum(cohort.mask.astype(jnp.int32)),
                  jnp.sum((cohort.mask & (cohort.weights > 0)).astype(jnp.int32)))


def stage_key(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(this round's key, next state's key)`` of a client stage's key schedule."""
    next_key, round_key = jax.random.split(key)
    return round_key, next_key


def is_cohort(value: Any) -> bool:
    """True for stacked per-client values, False for an aggregate."""
    return isinstance(value, CohortUpdates)


def masked_weights(cohort: CohortUpdates) -> jax.Array:
    """The weights with masked clients set to exactly zero."""
    return jnp.where(cohort.mask, cohort.weights, 0.0).astype(jnp.float32)


def zero_masked(cohort: CohortUpdates) -> CohortUpdates:
    """Sets masked clients' uploads and weights to exactly zero.

    A select, not a product, so masked junk (huge, inf or NaN values) cannot leak into any
    later sum. The chain calls it once when the cohort enters; a stage that changes the
    mask calls it on what it drops.
    """
    return cohort._replace(updates=select_clients(cohort.mask, cohort.updates),
                           weights=masked_weights(cohort))


def cohort_size(cohort: CohortUpdates) -> int:
    """The static cohort size ``C`` (the leading axis of the mask), known at trace time."""
    return int(cohort.mask.shape[0])


def client_positions(cohort: CohortUpdates) -> jax.Array:
    """The ids a client stage keys randomness by: population ids, else positions."""
    if cohort.client_ids is not None:
        return cohort.client_ids
    return jnp.arange(cohort_size(cohort), dtype=jnp.int32)


__all__ = ["CohortUpdates", "Counts", "client_positions", "cohort_size", "count_clients",
           "is_cohort", "masked_weights", "stage_key", "zero_masked"]
