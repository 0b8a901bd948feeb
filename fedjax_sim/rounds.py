"""One federated round, as one jitted pure function of (state, population, round key).

Data flow (every step is inside the jitted function; nothing goes back to the host)::

    round_key ─┬─ sample ──▶ cohort ids [M] + mask              (fedjax_sim.sampling)
               └─ fold_in(client id) ──▶ one key per client     (never shared)
    server program: broadcast(params, state) ──▶ message        (fedjax_sim.algorithms)
    protocol roster of the reducer (secure aggregation's graph and dropouts), if any
    client program, ONE client, vmapped in chunks                (fedjax_sim.cohort)
      (message, own data, own key, own state) ──▶ upload, weight, metrics, new own state
    ──▶ non-finite uploads are masked out and counted (never aggregated)
    ──▶ server chain (typed stages: client stages → reducer → aggregate stages)
        a streaming chain runs its client stages and partial sum inside each chunk, so
        the cohort's stacked uploads never exist; other chains get them all at once
        behind a secure sum the server learns only the survivors' decoded sum; a protocol
        that cannot finish (too few surviving neighbours) aborts and changes nothing
    ──▶ observers read the same uploads and the aggregate (metrics only)
    ──▶ server program: apply(params, state, aggregate, RoundInfo) ──▶ new params, state
    ──▶ the sampled clients' new states are written back by id

The round knows no algorithm, no attack and no defence: an algorithm is a client program
plus a server program (:class:`~fedjax_sim.algorithms.Algorithm`), an adversary wraps a
client program, a defence is a stage of the chain. It compiles once per configuration:
every shape is static (the cohort is padded to the sampler's capacity, rounded up to a
multiple of the device count), and the round index lives in the state as an array.

Per-client persistent state (a client program's ``init_state``, e.g. SCAFFOLD's control
variates) lives on the device as ``[num_clients, ...]``; a round gathers the cohort's
rows and writes back the new state of every sampled client whose upload was finite, so a
client that was not sampled keeps its state bit for bit. A client updates its own state
whether or not a server stage later drops its upload (a norm filter), as a real client
would; a non-finite upload's state is not written (it would carry NaN into later
rounds), and a round whose secure-aggregation protocol aborted writes none. Before
allocating it, :func:`make_round` estimates its size and refuses, in one line naming the
bytes, state that would not fit.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fedjax_sim._host import device_memory_bytes, format_bytes
from fedjax_sim._trees import all_finite, l2_norm
from fedjax_sim._validation import check_int, fail
from fedjax_sim.algorithms.base import Algorithm, ClientProgram, RoundInfo
from fedjax_sim.comms import CommsCost, tree_bytes
from fedjax_sim.cohort import (ClientOutput, cohort_updates, default_chunk_size, map_cohort,
                               map_reduce_cohort, mesh_size, pad_cohort)
from fedjax_sim.data.federated import Population
from fedjax_sim.observers import Observer, as_sent
from fedjax_sim.sampling import Sampler

PyTree = Any

CLIENT_STATE_MEMORY_FRACTION = 0.5
"""Per-client state may take at most this fraction of one device's memory."""


@struct.dataclass
class ServerState:
    """Everything that persists across rounds.

    Attributes:
      params: global model params.
      server: the server program's state (optimiser state, control variates, ...).
      aggregator: the server chain's state (clip norms, noise keys, ...).
      client_states: per-client persistent state, leaves ``[num_clients, ...]``; ``()``
        for stateless client programs.
      round: int32 number of completed rounds.
    """

    params: PyTree
    server: PyTree
    aggregator: PyTree
    client_states: PyTree
    round: jax.Array


class ServerView(NamedTuple):
    """What the server holds of the clients' uploads this round (for attacks and the
    leakage diagnostics; ask for it with ``make_round(..., server_view=True)``).

    Behind a reducer that hides clients (secure aggregation) the server learns only the
    reducer's output: ``total`` (the decoded sum of the survivors' uploads, noise
    included) and ``count`` (how many were summed); ``uploads`` is None. Otherwise it
    sees every upload: ``uploads`` holds the cohort's stacked uploads as the chain
    received them, and ``total`` is the reducer's output.

    Attributes:
      total: the reducer's output (a pytree like the upload).
      count: int32, the clients the reducer summed (0 when the protocol aborted).
      uploads: the stacked :class:`~fedjax_sim.server.CohortUpdates`, or None.
    """

    total: PyTree
    count: jax.Array
    uploads: Any = None


class RoundOutput(NamedTuple):
    """Per-round diagnostics, all device arrays (the host reads them after the round).

    Attributes:
      metrics: scalars: ``train_loss``, ``train_accuracy`` (example-weighted over the
        clients whose uploads were finite), ``num_clients`` (sampled), ``num_aggregated``
        (clients whose uploads reached the reducer: after non-finite uploads and norm
        filters are dropped), ``num_examples``, ``num_nonfinite`` (dropped non-finite
        uploads), ``overflow`` (Poisson draws beyond capacity), ``update_norm`` (L2 of the
        aggregate), ``aborted`` (the reducer's protocol could not finish, so nothing
        changed), plus every observer's and every stage's metrics.
      client_ids: ``[M]`` the cohort (``-1`` padding).
      client_metrics: per-client metrics ``[M]`` (for attack/defence analysis): the
        program's metrics, ``update_norm`` (L2 of each upload as sent, simulator ground
        truth), ``weight`` and ``finite``.
      server_view: what the server holds of the uploads (:class:`ServerView`), when
        the round was made with ``server_view=True``; else None.
      observed: what observers with a ``capture`` hand to the host, by observer name.
    """

    metrics: dict[str, jax.Array]
    client_ids: jax.Array
    client_metrics: dict[str, jax.Array]
    server_view: ServerView | None = None
    observed: dict[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class FederatedRound:
    """A compiled-once federated round.

    Use ``state = fr.init(key)`` then ``state, out = fr.step(state, population, round_key)``
    (``step`` is jitted). ``step_unjitted`` is the same function without ``jax.jit``.

    Attributes:
      streaming: True when the chain reduces chunk by chunk (no ``[C, params]`` stack).
      why_stacked: why it does not, in words (None when it streams).
      hides_clients: True when the server sees only the sum (secure aggregation).
      comms: the bytes one client downloads and uploads per round
        (:class:`~fedjax_sim.comms.CommsCost`; the run's communication ledger).
    """

    init: Callable[..., ServerState]
    step: Callable[[ServerState, Population, jax.Array], tuple[ServerState, RoundOutput]]
    step_unjitted: Callable[[ServerState, Population, jax.Array],
                            tuple[ServerState, RoundOutput]]
    cohort_capacity: int
    chunk_size: int
    streaming: bool
    why_stacked: str | None
    hides_clients: bool = False
    comms: CommsCost | None = None


def split_round_key(round_key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(sampling key, client key)`` of a round; client c trains with
    ``jax.random.fold_in(client_key, client_id)``."""
    sample_key, client_key = jax.random.split(round_key)
    return sample_key, client_key


def _weighted_client_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    total = jnp.sum(weights)
    return jnp.sum(jnp.where(weights > 0, values, 0.0) * weights) / jnp.maximum(total, 1e-12)


def engine_client(program: ClientProgram) -> Callable[..., ClientOutput]:
    """The client program as the engine runs it: plus the finite flag and the upload norm.

    The one place where an upload is checked for finiteness (:func:`fedjax_sim._trees.
    all_finite`) and its norm taken for the per-client diagnostics.
    """

    def run(message, data, key, state):
        out = program.update(message, data, key, state)
        metrics = dict(out.metrics, update_norm=l2_norm(out.upload))
        return ClientOutput(out.upload, jnp.asarray(out.weight, jnp.float32), metrics,
                            all_finite(out.upload), out.state)

    return run


def _state_bytes(shapes: PyTree) -> int:
    return sum(math.prod(s.shape) * np.dtype(s.dtype).itemsize
               for s in jax.tree.leaves(shapes))


def check_client_state_fits(one_client_state: PyTree, num_clients: int, *,
                            budget_bytes: int | None = None) -> int:
    """Host-side: the bytes of ``[num_clients, ...]`` per-client state; raises a one-line
    ConfigError naming them when they exceed ``budget_bytes`` (default: half of one
    device's memory)."""
    one = _state_bytes(one_client_state)
    need = one * num_clients
    if budget_bytes is None:
        memory = device_memory_bytes()
        budget_bytes = None if memory is None else int(memory * CLIENT_STATE_MEMORY_FRACTION)
    if budget_bytes is not None and need > budget_bytes:
        fail("client_state", format_bytes(need),
             f"per-client state for {num_clients} clients needs {need} bytes ({one} bytes a "
             f"client) on the device, over the {format_bytes(budget_bytes)} it may use; "
             "use fewer clients or a stateless algorithm")
    return need


def make_round(algorithm: Algorithm, sampler: Sampler, *, chunk_size: int | None = None,
               mesh: Mesh | None = None, observers: Sequence[Observer] = (),
               streaming: bool | None = None,
               client_state_budget_bytes: int | None = None,
               server_view: bool = False) -> FederatedRound:
    """Assembles the round of ``algorithm`` under ``sampler``.

    Args:
      algorithm: the client program and the server program (with its aggregation chain).
      sampler: picks each round's cohort.
      chunk_size: clients vectorised together (memory grows with it); None picks
        :func:`~fedjax_sim.cohort.default_chunk_size` for the model's size.
      mesh: optional mesh with a ``clients`` axis to shard the cohort over devices.
      observers: read-only views that add metrics (e.g. poisoning diagnostics).
      streaming: reduce chunk by chunk (True), over the stacked uploads (False), or as the
        chain allows (None). Both compute the same aggregate; False exists to test and
        measure that.
      client_state_budget_bytes: the most bytes per-client state may take (default: half
        of one device's memory).
      server_view: return what the server holds of the uploads (:class:`ServerView`)
        in every :class:`RoundOutput`. When the server sees each upload this keeps the
        stacked ``[C, params]`` uploads (the round does not stream); behind secure
        aggregation it is the decoded sum only.

    Returns:
      The :class:`FederatedRound`.
    """
    if not isinstance(algorithm, Algorithm):
        fail("algorithm", type(algorithm).__name__, "must be a fedjax_sim.Algorithm")
    server, client = algorithm.server, algorithm.client
    chain = server.aggregator
    if streaming and not chain.streaming:
        fail("streaming", True, f"the server chain does not stream: {chain.why_stacked}")
    keep_uploads = bool(server_view) and not chain.hides_clients
    if streaming and keep_uploads:
        fail("streaming", True, "server_view=True keeps every client's upload, so the "
             "round cannot stream")
    stream = chain.streaming and not keep_uploads if streaming is None else bool(streaming)
    devices = mesh_size(mesh)
    capacity = sampler.capacity + (-sampler.capacity) % devices
    if chain.min_cohort > sampler.capacity:
        fail("cohort_size", sampler.capacity, f"the reducer {chain.reducer.name!r} needs a "
             f"cohort of at least {chain.min_cohort}")
    params_shape = jax.eval_shape(server.init_params, jax.random.key(0))
    if chunk_size is None:
        num_params = sum(math.prod(p.shape) for p in jax.tree.leaves(params_shape))
        chunk_size = default_chunk_size(num_params, capacity // devices)
    check_int("chunk_size", chunk_size, min_value=1)
    if client.init_state is not None:
        check_client_state_fits(jax.eval_shape(client.init_state, params_shape),
                                sampler.num_clients, budget_bytes=client_state_budget_bytes)
    observers = tuple(observers)
    client_fn = engine_client(client)
    message_shape = jax.eval_shape(lambda p: server.broadcast(p, server.init(p)),
                                   params_shape)
    comms = CommsCost(tree_bytes(message_shape),
                      chain.wire(jax.eval_shape(client.upload_like, params_shape)))

    # With a mesh the server state lives replicated on it, from init on: a state whose
    # sharding changed between rounds would make round 2 compile the round again.
    replicated = None if mesh is None else NamedSharding(mesh, PartitionSpec())

    def init(key: jax.Array, params: PyTree | None = None) -> ServerState:
        params = server.init_params(key) if params is None else params
        upload = jax.tree.map(jnp.zeros_like, client.upload_like(params))
        client_states = ()
        if client.init_state is not None:
            one = client.init_state(params)
            client_states = jax.tree.map(
                lambda x: jnp.repeat(jnp.asarray(x)[None], sampler.num_clients, axis=0), one)
        state = ServerState(params=params, server=server.init(params),
                            aggregator=chain.init(upload), client_states=client_states,
                            round=jnp.zeros((), jnp.int32))
        return state if replicated is None else jax.device_put(state, replicated)

    def step(state: ServerState, population: Population, round_key: jax.Array):
        sample_key, client_key = split_round_key(round_key)
        cohort = sampler.sample(sample_key, state.round)
        ids, mask = pad_cohort(cohort.ids, cohort.mask, devices)
        ids = jnp.where(mask, ids, -1)
        keys = jax.vmap(lambda i: jax.random.fold_in(client_key, i))(ids)
        states = jax.tree.map(lambda s: s[jnp.where(mask, ids, 0)], state.client_states)
        sent = (state.params if server.sends is None
                else server.sends(state.params, state.server, state.round))
        message = server.broadcast(sent, state.server)
        roster = chain.setup(ids, mask, state.aggregator)
        contexts = tuple(o.setup(ids, mask, state.round) if o.setup else None
                         for o in observers)

        def observe(chunk):
            sent = (as_sent(chain, chunk, state.aggregator)
                    if any(o.sent for o in observers) else None)
            return tuple(o.read(sent if o.sent else chunk, c)
                         for o, c in zip(observers, contexts))

        uploads = None
        if stream:  # Reduce chunk by chunk: O(chunk) memory.
            def partial(chunk):
                return chain.partial(chunk, state.aggregator, roster), observe(chunk)

            (total, observed), out = map_reduce_cohort(
                client_fn, partial, message, population, ids, keys, mask, states,
                chunk_size=chunk_size, mesh=mesh)
            aggregate, aggregator, counts, reduced = chain.finalize(
                total, state.aggregator, roster, mask & out.finite, with_view=True)
        else:  # Non-sum reducers need every upload at once: [C, ...] stacked uploads.
            out = map_cohort(client_fn, message, population, ids, keys, states,
                             chunk_size=chunk_size, mesh=mesh)
            uploads = cohort_updates(out, mask, ids)
            observed = observe(uploads)
            aggregate, aggregator, counts, reduced = chain.reduce(
                uploads, state.aggregator, roster, with_view=True)
        aborted = jnp.asarray(counts.aborted, bool)
        ok = mask & out.finite & ~aborted  # an aborted round writes no client state
        params, server_state = server.apply(
            state.params, state.server, aggregate,
            RoundInfo(counts.aggregated, counts.contributing, state.round,
                      sampler.num_clients))
        # An aborted protocol reveals nothing and changes no model: keep the old ones.
        params, server_state = jax.tree.map(
            lambda new, old: jnp.where(aborted, old, new), (params, server_state),
            (state.params, state.server))

        scatter_ids = jnp.where(ok, ids, sampler.num_clients)  # out of range -> dropped
        client_states = jax.tree.map(
            lambda s, new: s.at[scatter_ids].set(new, mode="drop"),
            state.client_states, out.client_state)

        examples = jnp.where(ok, out.metrics.get("num_examples", out.weight), 0.0)
        metrics = {name: _weighted_client_mean(out.metrics[name], examples)
                   for name in ("train_loss", "train_accuracy") if name in out.metrics}
        metrics.update({
            "num_clients": jnp.sum(mask).astype(jnp.int32),
            "num_aggregated": counts.aggregated,
            "num_examples": jnp.sum(examples),
            "num_nonfinite": jnp.sum(mask & ~out.finite).astype(jnp.int32),
            "overflow": cohort.overflow,
            "update_norm": l2_norm(aggregate),
            "aborted": aborted,
        })
        captured = {}
        for observer, total in zip(observers, observed):
            metrics.update(observer.finalize(total, aggregate))
            if observer.capture is not None:
                captured[observer.name] = observer.capture(total, aggregate)
        metrics.update(chain.metrics(aggregator))
        new_state = ServerState(params=params, server=server_state, aggregator=aggregator,
                                client_states=client_states, round=state.round + 1)
        if replicated is not None:  # as init placed it: round 2 reuses round 1's program
            new_state = jax.lax.with_sharding_constraint(new_state, replicated)
        client_metrics = dict(out.metrics, weight=out.weight, finite=out.finite)
        view = None
        if server_view:
            view = ServerView(reduced, counts.aggregated,
                              None if chain.hides_clients else uploads)
        return new_state, RoundOutput(metrics, ids, client_metrics, view, captured)

    why = None
    if not stream:
        why = chain.why_stacked or ("server_view=True keeps every upload" if keep_uploads
                                    else "streaming=False was asked for")
    return FederatedRound(init=init, step=jax.jit(step), step_unjitted=step,
                          cohort_capacity=capacity, chunk_size=chunk_size,
                          streaming=stream, why_stacked=why,
                          hides_clients=chain.hides_clients, comms=comms)
