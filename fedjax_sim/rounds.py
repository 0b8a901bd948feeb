"""One federated round, as one jitted pure function of (state, population, round key).

Data flow (every step is inside the jitted function; nothing goes back to the host)::

    round_key ─┬─ sample ──▶ cohort ids [M] + mask          (fedjax_sim.sampling)
               └─ fold_in(client id) ──▶ one key per client (never shared)
    global params ──▶ map_cohort(client_update)              (fedjax_sim.cohort)
                      each client gathers/generates its own data, trains locally
    ──▶ ClientOutput: delta [M, ...], weight [M], metrics [M], finite [M]
    ──▶ non-finite updates are dropped from the mask and counted (never averaged in)
    ──▶ server transform chain (clip → reduce → noise ...) ──▶ aggregate delta
        (sum-type chains are reduced chunk by chunk inside the cohort map, so the
        cohort's stacked deltas never exist; robust reducers get them all at once)
    ──▶ server optimiser (plain optax) on the pseudo-gradient -aggregate ──▶ new params

The round compiles once per configuration: every shape is static (the cohort is padded
to the sampler's capacity, rounded up to a multiple of the device count), and the round
index lives in the state as an array.

Per-client persistent state (e.g. SCAFFOLD's control variates) is supported through
``client_state_init``: a ``[num_clients, ...]`` pytree in :class:`ServerState`,
gathered for the cohort before local training and scattered back afterwards.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fedjax_sim._validation import check_int
from fedjax_sim.algorithms import FederatedAlgorithm
from fedjax_sim.client_update import ClientUpdateFn, make_client_update
from fedjax_sim.cohort import (default_chunk_size, map_cohort, map_reduce_cohort, mesh_size,
                               pad_cohort, zero_clients)
from fedjax_sim.data.federated import Population
from fedjax_sim.models import Model
from fedjax_sim.sampling import Sampler
from fedjax_sim.server.base import CohortUpdates, alignment, weighted_sum

PyTree = Any


@struct.dataclass
class ServerState:
    """Everything that persists across rounds.

    Attributes:
      params: global model params.
      opt_state: server optimiser state.
      transform_state: server transform chain state (clip norms, noise keys, ...).
      client_states: per-client persistent state, leaves ``[num_clients, ...]``; ``()``
        for stateless algorithms.
      round: int32 number of completed rounds.
    """

    params: PyTree
    opt_state: PyTree
    transform_state: PyTree
    client_states: PyTree
    round: jax.Array


class RoundOutput(NamedTuple):
    """Per-round diagnostics, all device arrays (the host reads them after the round).

    Attributes:
      metrics: scalars: ``train_loss``, ``train_accuracy`` (example-weighted over the
        clients that were aggregated), ``num_clients`` (sampled), ``num_aggregated``,
        ``num_examples``, ``num_nonfinite`` (dropped non-finite updates), ``overflow``
        (Poisson draws beyond capacity), ``update_norm`` (L2 of the aggregate delta),
        ``honest_inner_product`` and ``honest_cosine`` (of the aggregate with the
        weighted mean of the honest aggregated clients' deltas: 1 for an undefended mean
        without attackers; how far DP noise, a robust reducer or an attack turn the
        step), ``num_malicious`` (adversarial clients sampled), ``honest_update_norm`` /
        ``malicious_update_norm`` (mean per-client delta norm of each group, 0 if empty).
      client_ids: ``[M]`` the cohort (``-1`` padding).
      client_metrics: per-client metrics ``[M]`` (for attack/defence analysis), including
        ``update_norm`` (L2 of each client's delta as uploaded, attacks included).
    """

    metrics: dict[str, jax.Array]
    client_ids: jax.Array
    client_metrics: dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class FederatedRound:
    """A compiled-once federated round.

    Use ``state = fr.init(key)`` then ``state, out = fr.step(state, population, round_key)``
    (``step`` is jitted). ``step_unjitted`` is the same function without ``jax.jit``.
    """

    init: Callable[[jax.Array], ServerState]
    step: Callable[[ServerState, Population, jax.Array], tuple[ServerState, RoundOutput]]
    step_unjitted: Callable[[ServerState, Population, jax.Array],
                            tuple[ServerState, RoundOutput]]
    cohort_capacity: int
    chunk_size: int


def split_round_key(round_key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(sampling key, client key)`` of a round; client c trains with
    ``jax.random.fold_in(client_key, client_id)``."""
    sample_key, client_key = jax.random.split(round_key)
    return sample_key, client_key


def _weighted_client_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    total = jnp.sum(weights)
    return jnp.sum(jnp.where(weights > 0, values, 0.0) * weights) / jnp.maximum(total, 1e-12)


def _group_mean(values: jax.Array, group: jax.Array) -> jax.Array:
    return jnp.sum(jnp.where(group, values, 0.0)) / jnp.maximum(jnp.sum(group), 1)


def _with_update_norm(client_fn: ClientUpdateFn) -> ClientUpdateFn:
    """Adds the uploaded delta's L2 norm to the client's metrics (a detection statistic)."""

    def wrapped(params, data, key, client_state=()):
        out = client_fn(params, data, key, client_state)
        return out._replace(metrics=dict(out.metrics, update_norm=optax.tree.norm(out.delta)))

    return wrapped


def make_round(model: Model, algorithm: FederatedAlgorithm, sampler: Sampler, *,
               max_examples: int, chunk_size: int | None = None, mesh: Mesh | None = None,
               client_update: ClientUpdateFn | None = None,
               client_state_init: Callable[[PyTree, int], PyTree] | None = None,
               is_malicious: Callable[[jax.Array], jax.Array] | None = None
               ) -> FederatedRound:
    """Assembles the round of ``algorithm`` for ``model`` and ``sampler``.

    Args:
      model: the model.
      algorithm: client config, server transform chain and server optimiser.
      sampler: picks each round's cohort.
      max_examples: padded number of examples per client of the population.
      chunk_size: clients vectorised together (memory grows with it); None picks
        :func:`~fedjax_sim.cohort.default_chunk_size` for the model's size.
      mesh: optional mesh with a ``clients`` axis to shard the cohort over devices.
      client_update: override of the one-client function (e.g. a poisoning client that
        switches on ``data.client_id``); default the algorithm's honest local training.
      client_state_init: ``(params, num_clients) -> per-client state`` for stateful
        algorithms; None for stateless ones.
      is_malicious: pure predicate on population ids marking adversarial clients; they
        are left out of the honest reference of ``honest_cosine``. None: all honest.

    Returns:
      The :class:`FederatedRound`.
    """
    check_int("max_examples", max_examples, min_value=1)
    if chunk_size is None:
        num_params = model.num_params(jax.eval_shape(model.init, jax.random.key(0)))
        chunk_size = default_chunk_size(num_params, sampler.capacity)
    check_int("chunk_size", chunk_size, min_value=1)
    client_fn = _with_update_norm(
        client_update or make_client_update(model, algorithm.client, max_examples))
    transform = algorithm.server_transform
    server_opt = algorithm.server_optimizer
    devices = mesh_size(mesh)
    capacity = sampler.capacity + (-sampler.capacity) % devices

    def malicious(cids: jax.Array) -> jax.Array:
        if is_malicious is None:
            return jnp.zeros(cids.shape, bool)
        return is_malicious(cids) & (cids >= 0)

    def honest_sum(chunk: CohortUpdates, cids: jax.Array):
        """Weighted sum and total weight of the chunk's honest aggregated deltas."""
        w = jnp.where(chunk.mask & ~malicious(cids), chunk.weights, 0.0)
        return weighted_sum(chunk.updates, w), jnp.sum(w)

    # With a mesh the server state lives replicated on it, from init on: a state whose
    # sharding changed between rounds would make round 2 compile the round again.
    replicated = None if mesh is None else NamedSharding(mesh, PartitionSpec())

    def init(key: jax.Array) -> ServerState:
        params = model.init(key)
        client_states = () if client_state_init is None else client_state_init(
            params, sampler.num_clients)
        state = ServerState(params=params, opt_state=server_opt.init(params),
                            transform_state=transform.init(params),
                            client_states=client_states, round=jnp.zeros((), jnp.int32))
        return state if replicated is None else jax.device_put(state, replicated)

    def step(state: ServerState, population: Population, round_key: jax.Array):
        sample_key, client_key = split_round_key(round_key)
        cohort = sampler.sample(sample_key, state.round)
        ids, mask = pad_cohort(cohort.ids, cohort.mask, devices)
        ids = jnp.where(mask, ids, -1)
        keys = jax.vmap(lambda i: jax.random.fold_in(client_key, i))(ids)
        safe_ids = jnp.where(mask, ids, 0)
        states = jax.tree.map(lambda s: s[safe_ids], state.client_states)

        if transform.streaming is not None:  # Reduce chunk by chunk: O(chunk) memory.
            (total, honest_total), out = map_reduce_cohort(
                client_fn, lambda chunk, cids: (
                    transform.streaming.partial(chunk, state.transform_state),
                    honest_sum(chunk, cids)), state.params, population, ids, keys,
                mask, states, chunk_size=chunk_size, mesh=mesh)
            aggregate, transform_state = transform.streaming.finalize(
                total, state.transform_state)
            ok = mask & out.finite
        else:  # Robust reducers need every update at once: [C, ...] stacked deltas.
            out = map_cohort(client_fn, state.params, population, ids, keys, states,
                             chunk_size=chunk_size, mesh=mesh)
            ok = mask & out.finite
            weights = jnp.where(ok, out.weight, 0.0).astype(jnp.float32)
            cohort_updates = CohortUpdates(updates=zero_clients(ok, out.delta),
                                           weights=weights, mask=ok)
            honest_total = honest_sum(cohort_updates, ids)
            aggregate, transform_state = transform.update(cohort_updates,
                                                          state.transform_state)
        pseudo_grad = jax.tree.map(jnp.negative, aggregate)
        updates, opt_state = server_opt.update(pseudo_grad, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        scatter_ids = jnp.where(ok, ids, sampler.num_clients)  # out of range -> dropped
        client_states = jax.tree.map(
            lambda s, new: s.at[scatter_ids].set(new, mode="drop"),
            state.client_states, out.client_state)

        examples = jnp.where(ok, out.metrics["num_examples"], 0.0)
        bad = malicious(ids) & mask
        honest_sum_delta, honest_weight = honest_total
        honest_mean = jax.tree.map(lambda x: x / jnp.maximum(honest_weight, 1e-12),
                                   honest_sum_delta)
        aligned = alignment(aggregate, honest_mean)
        metrics = {
            "train_loss": _weighted_client_mean(out.metrics["train_loss"], examples),
            "train_accuracy": _weighted_client_mean(out.metrics["train_accuracy"], examples),
            "num_clients": jnp.sum(mask).astype(jnp.int32),
            "num_aggregated": jnp.sum(ok).astype(jnp.int32),
            "num_examples": jnp.sum(examples),
            "num_nonfinite": jnp.sum(mask & ~out.finite).astype(jnp.int32),
            "overflow": cohort.overflow,
            "update_norm": optax.tree.norm(aggregate),
            "honest_inner_product": aligned["inner_product"],
            "honest_cosine": aligned["cosine"],
            "num_malicious": jnp.sum(bad).astype(jnp.int32),
            "honest_update_norm": _group_mean(out.metrics["update_norm"], mask & ~bad),
            "malicious_update_norm": _group_mean(out.metrics["update_norm"], bad),
        }
        new_state = ServerState(params=params, opt_state=opt_state,
                                transform_state=transform_state,
                                client_states=client_states, round=state.round + 1)
        if replicated is not None:  # as init placed it: round 2 reuses round 1's program
            new_state = jax.lax.with_sharding_constraint(new_state, replicated)
        client_metrics = dict(out.metrics, weight=out.weight, finite=out.finite)
        return new_state, RoundOutput(metrics, ids, client_metrics)

    return FederatedRound(init=init, step=jax.jit(step), step_unjitted=step,
                          cohort_capacity=capacity, chunk_size=chunk_size)
