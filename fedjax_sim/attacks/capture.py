"""What a server keeps of a round: some clients' uploads as sent, or the aggregate.

:func:`victim_capture` is a round observer (:class:`~fedjax_sim.Observer`) that, in chosen
rounds, keeps the uploads of the first ``num_victims`` sampled clients exactly as they
left the clients: after the chain's client-side stages (clipping, quantisation, local
noise), before any server-side stage. A server that sees every upload holds these; the
in-run attacks (:mod:`fedjax_sim.attacks.honest_server`) read them after the round. It
runs inside the streaming reduction like every observer: the victims' uploads are an
additive partial (a ``[chunk, V]`` one-hot contraction per chunk), so the cohort's
stacked uploads never exist for it either.

Behind secure aggregation the server sees only the sum; there the runner asks the round
for its :class:`~fedjax_sim.rounds.ServerView` instead and this observer is not used.

It changes nothing: it takes no keys and only reads (same seed, same model; tested).

:func:`aggregate_capture` hands the round's aggregate itself to the host: what a
malicious server reads its spy rounds off (:mod:`fedjax_sim.attacks.malicious_server`),
with or without secure aggregation.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from fedjax_sim._validation import check_int, fail
from fedjax_sim.observers import Observer
from fedjax_sim.server.base import CohortUpdates

PyTree = Any

NAME = "victims"
AGGREGATE = "aggregate"


class Captured(NamedTuple):
    """The victims' uploads of one round, as the server received them.

    Attributes:
      uploads: every leaf ``[V, ...]`` (zeros for a victim slot not filled).
      weights: ``[V]`` the uploads' aggregation weights (examples under FedAvg).
      client_ids: ``[V]`` int32 population ids.
      present: ``[V]`` bool, the slot holds a sampled client whose upload arrived.
    """

    uploads: PyTree
    weights: jax.Array
    client_ids: jax.Array
    present: jax.Array


def pick_victims(ids: jax.Array, mask: jax.Array, num_victims: int) -> jax.Array:
    """The first ``num_victims`` sampled clients of the cohort (in cohort order; the
    sampler's order is random), ``-1`` where the cohort has fewer."""
    order = jnp.argsort(jnp.where(mask, 0, 1).astype(jnp.int32), stable=True)[:num_victims]
    return jnp.where(mask[order], ids[order], -1).astype(jnp.int32)


def victim_capture(num_victims: int, rounds: Sequence[int]) -> Observer:
    """The observer that keeps ``num_victims`` clients' sent uploads in ``rounds``.

    Args:
      num_victims: clients attacked per observed round (>= 1).
      rounds: the observed rounds, 0-based; in other rounds nothing is kept (the
        contraction still runs, on an all-zero selection).

    Returns:
      An :class:`~fedjax_sim.Observer` named ``"victims"``; the round hands its
      :class:`Captured` to the host in ``RoundOutput.observed["victims"]``.
    """
    v = check_int("num_victims", num_victims, min_value=1)
    rounds = tuple(int(r) for r in rounds)
    if not rounds or min(rounds) < 0:
        fail("rounds", rounds, "needs at least one round, 0-based and >= 0")
    observed = jnp.asarray(sorted(set(rounds)), jnp.int32)

    def setup(ids, mask, round_index):
        victims = pick_victims(ids, mask, v)
        return jnp.where(jnp.any(observed == round_index), victims, -1)

    def partial(chunk: CohortUpdates, victims):
        ids = chunk.client_ids
        hit = ((ids[:, None] == victims[None, :]) & chunk.mask[:, None]
               & (victims >= 0)[None, :])
        w = hit.astype(jnp.float32)  # [chunk, V]
        uploads = jax.tree.map(
            lambda u: jnp.tensordot(w, u.astype(jnp.float32), axes=([0], [0])),
            chunk.updates)
        weights = jnp.tensordot(w, chunk.weights.astype(jnp.float32), axes=([0], [0]))
        found = jnp.sum(jnp.where(hit, ids[:, None], 0), axis=0).astype(jnp.int32)
        return uploads, weights, found, jnp.sum(hit.astype(jnp.int32), axis=0)

    def finalize(total, aggregate):
        return {}

    def capture(total, aggregate):
        uploads, weights, found, count = total
        return Captured(uploads, weights, found, count > 0)

    return Observer(NAME, partial, finalize, sent=True, setup=setup, capture=capture)


def aggregate_capture(name: str = AGGREGATE) -> Observer:
    """The observer that hands the round's aggregate (what the server applies: the
    chain's output, central noise included; behind secure aggregation computed from the
    decoded sum only) to the host in ``RoundOutput.observed[name]``. A malicious server
    reads its spy rounds off it (:mod:`fedjax_sim.attacks.malicious_server`). It adds
    nothing to the reduction."""

    def partial(chunk: CohortUpdates):
        return ()

    def finalize(total, aggregate):
        return {}

    return Observer(name, partial, finalize, capture=lambda total, aggregate: aggregate)


__all__ = ["AGGREGATE", "Captured", "NAME", "aggregate_capture", "pick_victims",
           "victim_capture"]
