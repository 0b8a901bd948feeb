"""Typed server stages and their chain: what runs on the clients, what reduces, what follows.

A server step turns the cohort's uploads into one aggregate. It is a chain of **stages**,
each a pair of pure functions in the optax style (settings live in the closure, what
changes lives in the state) plus a declared **kind**:

=============  =====================================  =====================================
kind           value in -> value out                  where it runs
=============  =====================================  =====================================
``CLIENT``     cohort -> cohort, each client alone    on the client, inside the chunk
``COHORT``     cohort -> cohort, reads every client   on the server, on the stacked cohort
``REDUCE``     cohort -> aggregate                    the reduction (streamed if a sum)
``AGGREGATE``  aggregate -> aggregate                 on the server, on the aggregate
=============  =====================================  =====================================

:func:`chain` checks the order when it is built (``CLIENT``/``COHORT`` stages, then at
most one ``REDUCE``, then ``AGGREGATE`` stages; a wrong order is a one-line
:class:`~fedjax_sim.ConfigError`) and derives everything else from the kinds:

* **Streaming.** A chain streams when its reducer has a streaming form (a sum over
  clients: ``partial`` per chunk, ``finalize`` on the total) and every stage before it is
  a ``CLIENT`` stage. The round then runs those stages and the partial sum inside each
  chunk, so the cohort's stacked uploads ``[C, params]`` never exist. A ``COHORT`` stage
  (an omniscient attack reading every honest upload) or a reducer that is no sum
  (median, Krum, ...) needs the stacked cohort. Both paths compute the same aggregate:
  the stacked path is the same ``partial`` on the whole cohort.
* **Client stages with a per-round statistic** (adaptive clipping's count of unclipped
  clients, clipping diagnostics, a compressor's key schedule): ``apply`` acts on each
  client with the state read-only; ``stats`` is the stage's additive per-chunk statistic
  and ``advance(total_stats, state)`` the new state, once per round. Randomness of a
  client stage comes from the state's round key folded with the client's id, so a
  client's encoding does not depend on its chunk, its position or the cohort size.
* **What was aggregated.** The chain counts the clients still unmasked when they reach
  the reducer (after filters such as :func:`~fedjax_sim.server.zero_above_norm`); the
  round reports that count as ``num_aggregated``.
* **Privacy.** A clipping stage declares its ``bound`` (a float, or ``bound_of(state)``
  for adaptive clipping); a noise stage carries a typed ``mechanism``
  (:mod:`fedjax_sim.privacy.mechanisms`); a reducer declares whether it is a ``unit_sum``
  (every client counts 1, so the sum's sensitivity is the bound). The privacy ledger
  (:func:`fedjax_sim.privacy.ledger_for`) reads these from the chain that runs.

Masked clients are zeroed once, when the cohort enters the chain (:func:`zero_masked`);
a stage that drops clients (a norm filter) zeroes what it drops. The result of a chain
is the aggregate in the clients' direction (for FedAvg a delta); the algorithm's server
program applies it.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_sim._trees import (per_client_l2_norms, scale_per_client, select_clients,
                               weighted_sum)
from fedjax_sim._validation import fail

PyTree = Any

__all__ = ["Chain", "CohortUpdates", "Counts", "ServerTransform", "Stage", "StageKind", "as_chain",
           "chain", "client_stage", "cohort_size", "is_cohort", "masked_weights",
           "per_client_l2_norms", "scale_per_client", "stage_key", "weighted_sum",
           "zero_masked"]


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
    """

    aggregated: jax.Array
    contributing: jax.Array


def count_clients(cohort: CohortUpdates) -> Counts:
    """The :class:`Counts` of a (zero-masked) cohort or chunk; additive over chunks."""
    return Counts(jnp.sum(cohort.mask.astype(jnp.int32)),
                  jnp.sum((cohort.mask & (cohort.weights > 0)).astype(jnp.int32)))


class StageKind(enum.Enum):
    """Where a stage acts; see the module docstring."""

    CLIENT = "client"
    COHORT = "cohort"
    REDUCE = "reduce"
    AGGREGATE = "aggregate"


def _no_state(params):
    del params
    return ()


@dataclasses.dataclass(frozen=True)
class Stage:
    """One typed server stage (build it with the constructors of :mod:`fedjax_sim.server`).

    Attributes:
      name: a short name (for messages and the run summary).
      kind: a :class:`StageKind`.
      init: ``params -> state``.
      apply: ``CLIENT``: ``(cohort, state) -> cohort`` (state read-only);
        ``COHORT``/``AGGREGATE``: ``(value, state) -> (value, state)``; ``REDUCE``
        without a streaming form: ``(cohort, state) -> (aggregate, state)``.
      stats: ``CLIENT`` only, optional: ``(cohort, state) -> pytree``, an additive
        per-round statistic of the stage's input (summed over chunks and devices).
      advance: ``CLIENT`` only, optional: ``(total_stats, state) -> state``, once per
        round (``total_stats`` is ``()`` without ``stats``).
      partial, finalize: a sum-type ``REDUCE``'s streaming form: ``(cohort, state) ->
        contribution`` and ``(total, state) -> (aggregate, state)``.
      bound: ``CLIENT``: the L2 bound of every client's upload after the stage (clipping,
        norm filters; None if it bounds nothing); a float, or the string ``"state"`` when
        it lives in the state (read it with ``bound_of``).
      bound_of: ``state -> float32`` current bound, for a bound kept in the state.
      preserves_bound: ``CLIENT``/``COHORT``: the stage never raises a client's norm
        (clipping, norm filters, top-k), so a bound declared before it still holds.
      mechanism: a DP mechanism (noise stages), read by the privacy ledger.
      unit_sum: ``REDUCE``: every unmasked client enters the sum with weight 1.
      min_cohort: ``REDUCE``: the smallest cohort its guarantee holds for.
    """

    name: str
    kind: StageKind
    init: Callable[[PyTree], PyTree] = _no_state
    apply: Callable | None = None
    stats: Callable | None = None
    advance: Callable | None = None
    partial: Callable | None = None
    finalize: Callable | None = None
    bound: float | str | None = None
    bound_of: Callable[[PyTree], jax.Array] | None = None
    preserves_bound: bool = False
    mechanism: Any = None
    unit_sum: bool = False
    min_cohort: int = 1

    def __post_init__(self):
        if not isinstance(self.kind, StageKind):
            fail("kind", self.kind, f"stage {self.name!r} needs a StageKind")
        if self.kind is StageKind.REDUCE:
            if (self.partial is None) != (self.finalize is None):
                fail(self.name, "streaming", "a reducer needs both partial and finalize")
            if self.apply is None and self.partial is None:
                fail(self.name, "reduce", "a reducer needs apply or partial + finalize")
        elif self.apply is None:
            fail(self.name, "apply", f"a {self.kind.value} stage needs apply")
        if self.kind is not StageKind.CLIENT and (self.stats or self.advance):
            fail(self.name, "stats", "only client stages keep per-round statistics")
        if self.bound == "state" and self.bound_of is None:
            fail(self.name, "bound", "a bound kept in the state needs bound_of")

    @property
    def streaming(self) -> bool:
        """True for a reducer with a streaming (sum) form."""
        return self.partial is not None

    def update(self, value: Any, state: PyTree) -> tuple[Any, PyTree]:
        """The stage alone, on a whole cohort (or aggregate): ``(value, state)``."""
        value, (state,) = Chain((self,)).update(value, (state,))
        return value, state

    def clip_norm(self, state: PyTree) -> jax.Array | None:
        """The stage's current bound (see :meth:`Chain.clip_norm`)."""
        return Chain((self,)).clip_norm((state,))


ServerTransform = Stage  # a Stage or a Chain: both have init and update


def client_stage(name: str, apply: Callable, *, init: Callable = _no_state,
                 stats: Callable | None = None, advance: Callable | None = None,
                 bound: float | str | None = None, bound_of: Callable | None = None,
                 preserves_bound: bool = False) -> Stage:
    """A ``CLIENT`` stage; ``apply(cohort, state) -> cohort`` must treat clients alone."""
    return Stage(name, StageKind.CLIENT, init=init, apply=apply, stats=stats,
                 advance=advance, bound=bound, bound_of=bound_of,
                 preserves_bound=preserves_bound or bound is not None)


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


def _require(stage: Stage, value: Any) -> None:
    cohort_in = stage.kind is not StageKind.AGGREGATE
    if cohort_in and not is_cohort(value):
        raise TypeError(f"{stage.name}: expects CohortUpdates (it acts on the cohort's "
                        "uploads)")
    if not cohort_in and is_cohort(value):
        raise TypeError(f"{stage.name}: expects an aggregate (put a reducer such as "
                        "sum_updates before it)")


_ORDER = {StageKind.CLIENT: 0, StageKind.COHORT: 0, StageKind.REDUCE: 1,
          StageKind.AGGREGATE: 2}


@dataclasses.dataclass(frozen=True)
class Chain:
    """Stages composed left to right (build it with :func:`chain`).

    The state is the tuple of the stages' states. ``update(value, state)`` runs the whole
    chain on a stacked cohort (or an aggregate); a complete chain (one with a reducer) also
    offers ``reduce`` and, when it streams, ``partial``/``finalize`` (see the module
    docstring).
    """

    stages: tuple[Stage, ...]

    def __post_init__(self):
        names = [s.name for s in self.stages]
        if not self.stages:
            fail("server_chain", names, "needs at least one stage")
        reducers = [s.name for s in self.stages if s.kind is StageKind.REDUCE]
        if len(reducers) > 1:
            fail("server_chain", names, f"has more than one reducer ({', '.join(reducers)})")
        rank, last = 0, None
        for s in self.stages:
            r = _ORDER[s.kind]
            if r < rank and s.kind is StageKind.REDUCE:  # an aggregate stage came first
                fail("server_chain", names, f"{last.name!r} is an aggregate stage and "
                     f"must come after the reducer {s.name!r}")
            if r < rank:
                fail("server_chain", names, f"{s.name!r} is a {s.kind.value} stage and "
                     "must come before the reducer")
            if r > rank or last is None:
                rank, last = r, s  # last: the first stage of the current rank

    # ------------------------------------------------------------- derived properties

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages)

    @property
    def reducer_index(self) -> int | None:
        return next((i for i, s in enumerate(self.stages) if s.kind is StageKind.REDUCE),
                    None)

    @property
    def reducer(self) -> Stage | None:
        i = self.reducer_index
        return None if i is None else self.stages[i]

    @property
    def complete(self) -> bool:
        """True when the chain turns a cohort into an aggregate (it has a reducer)."""
        return self.reducer_index is not None

    @property
    def pre(self) -> tuple[Stage, ...]:
        """The stages before the reducer (all of them for a reducer-less chain)."""
        i = self.reducer_index
        return self.stages if i is None else self.stages[:i]

    @property
    def post(self) -> tuple[Stage, ...]:
        i = self.reducer_index
        return () if i is None else self.stages[i + 1:]

    @property
    def streaming(self) -> bool:
        """True when the round can reduce chunk by chunk (module docstring)."""
        r = self.reducer
        return (r is not None and r.streaming
                and all(s.kind is StageKind.CLIENT for s in self.pre))

    @property
    def why_stacked(self) -> str | None:
        """Why the chain needs the stacked ``[C, ...]`` cohort (None when it streams)."""
        r = self.reducer
        if r is None or self.streaming:
            return None
        if not r.streaming:
            return f"reducer {r.name!r} is not a sum"
        cohort = [s.name for s in self.pre if s.kind is StageKind.COHORT]
        return f"stage {cohort[0]!r} reads the whole cohort"

    @property
    def mechanisms(self) -> tuple[Stage, ...]:
        """The stages that carry a DP mechanism."""
        return tuple(s for s in self.stages if s.mechanism is not None)

    @property
    def min_cohort(self) -> int:
        r = self.reducer
        return 1 if r is None else r.min_cohort

    def clip_stage(self) -> Stage | None:
        """The last stage before the reduction that bounds each client (clipping)."""
        bounded = [s for s in self.pre if s.bound is not None]
        r = self.reducer
        if r is not None and r.bound is not None:
            bounded.append(r)
        return bounded[-1] if bounded else None

    def clip_norm(self, state: PyTree) -> jax.Array | None:
        """float32 clip norm the next round uses (None without clipping). The one home
        of "the current clip norm": fixed bounds and bounds kept in a stage's state."""
        for s, st in zip(reversed(self.stages), reversed(tuple(state))):
            if s.bound is None or _ORDER[s.kind] > 1:
                continue
            if s.bound == "state":
                return s.bound_of(st)
            return jnp.float32(s.bound)
        return None

    def stage_state(self, state: PyTree, name: str) -> PyTree:
        """The state of the first stage called ``name``."""
        for s, st in zip(self.stages, state):
            if s.name == name:
                return st
        fail("stage", name, f"not in the chain {list(self.names)}")

    # ---------------------------------------------------------------------- running

    def init(self, params: PyTree) -> tuple:
        return tuple(s.init(params) for s in self.stages)

    def _run_pre(self, cohort: CohortUpdates, states) -> tuple[CohortUpdates, list]:
        """The stages before the reducer on a whole cohort; returns their new states."""
        new = []
        for s, st in zip(self.pre, states):
            _require(s, cohort)  # a reducer-less chain may hold AGGREGATE stages
            if s.kind is StageKind.COHORT:
                cohort, st = s.apply(cohort, st)
            else:
                stats = s.stats(cohort, st) if s.stats else ()
                cohort = s.apply(cohort, st)
                st = s.advance(stats, st) if s.advance else st
            new.append(st)
        return cohort, new

    def _run_post(self, value, states) -> tuple[Any, list]:
        new = []
        for s, st in zip(self.post, states):
            value, st = s.apply(value, st)
            new.append(st)
        return value, new

    def update(self, value: Any, state: PyTree) -> tuple[Any, tuple]:
        """The whole chain on a stacked cohort or an aggregate: ``(value, new state)``."""
        _require(self.stages[0], value)
        if is_cohort(value):
            value = zero_masked(value)
            if self.complete:
                aggregate, state, _ = self.reduce(value, state)
                return aggregate, state
            value, new = self._run_pre(value, state)
            return value, tuple(new)
        # An aggregate enters a chain of AGGREGATE stages only (_require checked the
        # first; the order check the rest): run them all (a reducer-less chain has no
        # ``post``).
        new = []
        for s, st in zip(self.stages, state):
            value, st = s.apply(value, st)
            new.append(st)
        return value, tuple(new)

    def reduce(self, cohort: CohortUpdates, state: PyTree) -> tuple[PyTree, tuple, Counts]:
        """Stacked path: ``(aggregate, new state, Counts)`` of a whole cohort."""
        i = self._need_reducer()
        r = self.reducer
        cohort, new = self._run_pre(zero_masked(cohort), state[:i])
        count = count_clients(cohort)
        if r.streaming:
            aggregate, st = r.finalize(r.partial(cohort, state[i]), state[i])
        else:
            aggregate, st = r.apply(cohort, state[i])
        aggregate, post = self._run_post(aggregate, state[i + 1:])
        return aggregate, tuple(new + [st] + post), count

    def partial(self, chunk: CohortUpdates, state: PyTree) -> PyTree:
        """Streaming path: one chunk's additive contribution (client stages run here)."""
        i = self._need_streaming()
        chunk = zero_masked(chunk)
        stats = []
        for s, st in zip(self.pre, state[:i]):
            stats.append(s.stats(chunk, st) if s.stats else ())
            chunk = s.apply(chunk, st)
        return tuple(stats), self.stages[i].partial(chunk, state[i]), count_clients(chunk)

    def finalize(self, total: PyTree, state: PyTree) -> tuple[PyTree, tuple, Counts]:
        """Streaming path: ``(aggregate, new state, Counts)`` from the summed
        contributions of every chunk and device."""
        i = self._need_streaming()
        stats, contribution, count = total
        new = [s.advance(t, st) if s.advance else st
               for s, t, st in zip(self.pre, stats, state[:i])]
        aggregate, st = self.stages[i].finalize(contribution, state[i])
        aggregate, post = self._run_post(aggregate, state[i + 1:])
        return aggregate, tuple(new + [st] + post), count

    def _need_reducer(self) -> int:
        i = self.reducer_index
        if i is None:
            fail("server_chain", list(self.names), "has no reducer: nothing turns the "
                 "cohort into an aggregate")
        return i

    def _need_streaming(self) -> int:
        if not self.streaming:
            fail("server_chain", list(self.names), f"does not stream: {self.why_stacked}")
        return self.reducer_index


def chain(*items: Stage | Chain) -> Chain:
    """Composes stages (and chains, flattened) left to right; checks their order."""
    stages: list[Stage] = []
    for item in items:
        if isinstance(item, Chain):
            stages.extend(item.stages)
        elif isinstance(item, Stage):
            stages.append(item)
        else:
            fail("server_chain", type(item).__name__, "items must be stages or chains")
    return Chain(tuple(stages))


def as_chain(transform: Stage | Chain) -> Chain:
    """A stage as a one-stage chain; a chain as is."""
    return transform if isinstance(transform, Chain) else chain(transform)
