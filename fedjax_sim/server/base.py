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

:func:`chain` checks the order when it is built (``CLIENT``/``COHORT`` stages, then at most
one ``REDUCE``, then ``AGGREGATE`` stages; a wrong order is a one-line
:class:`~fedjax_sim.ConfigError`) and derives everything else from the kinds:

* **Streaming.** A chain streams when its reducer has a streaming form (a sum over clients:
  ``partial`` per chunk, ``finalize`` on the total) and every stage before it is a
  ``CLIENT`` stage. The round then runs those stages and the partial sum inside each chunk,
  so the cohort's stacked uploads ``[C, params]`` never exist. A ``COHORT`` stage (an
  omniscient attack reading every honest upload) or a reducer that is no sum (median, Krum,
  ...) needs the stacked cohort. Both paths compute the same aggregate: the stacked path is
  the same ``partial`` on the whole cohort.
* **Client stages with a per-round statistic** (adaptive clipping's count of unclipped
  clients, clipping diagnostics, a compressor's key schedule): ``apply`` acts on each client
  with the state read-only; ``stats`` is the stage's additive per-chunk statistic and
  ``advance(total_stats, state)`` the new state, once per round. Randomness of a client
  stage comes from the state's round key folded with the client's id, so a client's encoding
  does not depend on its chunk, its position or the cohort size.
* **What was aggregated.** The chain counts the clients still unmasked when they reach the
  reducer (after filters such as :func:`~fedjax_sim.server.zero_above_norm`); the round
  reports that count as ``num_aggregated``.
* **Privacy.** A clipping stage declares its ``bound`` (a float, or ``bound_of(state)`` for
  adaptive clipping); a noise stage carries a typed ``mechanism``
  (:mod:`fedjax_sim.privacy.mechanisms`); a reducer declares whether it is a ``unit_sum``
  (every client counts 1, so the sum's sensitivity is the bound). The privacy ledger
  (:func:`fedjax_sim.privacy.ledger_for`) reads these from the chain that runs.

Masked clients are zeroed once, when the cohort enters the chain (:func:`zero_masked`); a
stage that drops clients (a norm filter) zeroes what it drops. The result of a chain is the
aggregate in the clients' direction (for FedAvg a delta); the algorithm's server program
applies it.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Callable

import jax
import jax.numpy as jnp

from fedjax_sim._trees import per_client_l2_norms, scale_per_client, weighted_sum
from fedjax_sim._validation import fail
from fedjax_sim.comms import Wire, leaf_sizes, tree_bytes
from fedjax_sim.server.uploads import (CohortUpdates, Counts, client_positions, cohort_size,
                                       count_clients, is_cohort, masked_weights, stage_key,
                                       zero_masked)

# Re-exported: the stages' modules take the uploads' helpers from here.
__all__ = ["Chain", "CohortUpdates", "Counts", "ServerTransform", "Stage", "StageKind",
           "as_chain", "chain", "client_positions", "client_stage", "cohort_size",
           "count_clients", "is_cohort", "masked_weights", "per_client_l2_norms",
           "scale_per_client", "stage_key", "weighted_sum", "zero_masked"]

PyTree = Any


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
        ``COHORT``/``AGGREGATE``: ``(value, state) -> (value, state)``; ``REDUCE`` without a
        streaming form: ``(cohort, state) -> (aggregate, state)``.
      stats: ``CLIENT`` only, optional: ``(cohort, state) -> pytree``, an additive per-round
        statistic of the stage's input (summed over chunks and devices).
      advance: ``CLIENT`` only, optional: ``(total_stats, state) -> state``, once per round
        (``total_stats`` is ``()`` without ``stats``).
      partial, finalize: a sum-type ``REDUCE``'s streaming form: ``(cohort, state) ->
        contribution`` and ``(total, state) -> (aggregate, state)``.
      bound: ``CLIENT``: the L2 bound of every client's upload after the stage (clipping,
        norm filters; None if it bounds nothing); a float, or the string ``"state"`` when it
        lives in the state (read it with ``bound_of``).
      bound_of: ``state -> float32`` current bound, for a bound kept in the state.
      preserves_bound: ``CLIENT``/``COHORT``: the stage never raises a client's norm
        (clipping, norm filters, top-k), so a bound declared before it still holds.
      mechanism: a DP mechanism (noise stages), read by the privacy ledger.
      unit_sum: ``REDUCE``: every unmasked client enters the sum with weight 1.
      min_cohort: ``REDUCE``: the smallest cohort its guarantee holds for.
      setup: ``REDUCE`` with a protocol over the cohort (secure aggregation), optional:
        ``(ids [C], sampled [C], state) -> roster``, once per round before any client trains
        (the neighbour graph, who drops out). Such a reducer streams with ``partial(chunk,
        state, roster)`` and ``finalize(total, state, roster, arrived) -> (aggregate, state,
        Counts)``, where ``arrived [C]`` marks the sampled clients whose upload was finite.
      hides_clients: ``REDUCE``: the server learns only the reducer's output (a secure sum),
        never one client's upload; the chain then rejects every stage that would read
        uploads one by one on the server.
      server_side: ``CLIENT``: the stage models a check the *server* makes on each upload (a
        norm filter), so it cannot run behind a reducer that hides clients.
      metrics: optional ``state -> {name: scalar}``: the stage's diagnostics of the round
        just run (read from its new state), merged into the round's metrics.
      wire: ``CLIENT``/``REDUCE``, optional: ``leaf sizes of one upload ->``
        :class:`~fedjax_sim.comms.Wire`, the bytes a client sends when the stage re-encodes
        the upload (a quantiser, top-k, secure aggregation's ring elements).
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
    setup: Callable | None = None
    hides_clients: bool = False
    server_side: bool = False
    metrics: Callable[[PyTree], dict[str, jax.Array]] | None = None
    wire: Callable[[tuple[int, ...]], Wire] | None = None

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
        if self.kind is not StageKind.REDUCE and (self.setup or self.hides_clients):
            fail(self.name, "setup", "only a reducer runs a protocol over the cohort")
        if self.setup is not None and self.partial is None:
            fail(self.name, "setup", "a reducer with a protocol must stream (partial + "
                 "finalize)")
        if self.server_side and self.kind is not StageKind.CLIENT:
            fail(self.name, "server_side", "only per-client stages are marked server_side")

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
                 preserves_bound: bool = False, server_side: bool = False,
                 wire: Callable[[tuple[int, ...]], Wire] | None = None) -> Stage:
    """A ``CLIENT`` stage; ``apply(cohort, state) -> cohort`` must treat clients alone."""
    return Stage(name, StageKind.CLIENT, init=init, apply=apply, stats=stats,
                 advance=advance, bound=bound, bound_of=bound_of,
                 preserves_bound=preserves_bound or bound is not None,
                 server_side=server_side, wire=wire)


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
        hiding = [s.name for s in self.stages if s.hides_clients]
        if hiding:
            for s in self.stages:
                if s.kind is StageKind.COHORT or s.server_side:
                    fail("server_chain", names, f"{s.name!r} reads each client's upload on "
                         f"the server, but {hiding[0]!r} shows the server only the sum")

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
    def hides_clients(self) -> bool:
        """True when the server sees only the reducer's output (secure aggregation)."""
        r = self.reducer
        return r is not None and r.hides_clients

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

    def wire(self, upload: PyTree) -> Wire:
        """The bytes one client sends per round (:class:`~fedjax_sim.comms.Wire`): the
        last stage up to the reducer that re-encodes the upload decides; without one,
        the upload at its own dtypes."""
        for s in reversed(self.pre + ((self.reducer,) if self.reducer else ())):
            if s.wire is not None:
                return s.wire(leaf_sizes(upload))
        return Wire(tree_bytes(upload))

    def init(self, params: PyTree) -> tuple:
        return tuple(s.init(params) for s in self.stages)

    def setup(self, ids: jax.Array, sampled: jax.Array, state: PyTree) -> PyTree:
        """The reducer's per-round protocol roster (None when it runs no protocol)."""
        i = self.reducer_index
        if i is None or self.stages[i].setup is None:
            return None
        return self.stages[i].setup(ids, sampled, state[i])

    def metrics(self, state: PyTree) -> dict[str, jax.Array]:
        """Every stage's diagnostics of the round just run, read from the new state."""
        out: dict[str, jax.Array] = {}
        for s, st in zip(self.stages, state):
            if s.metrics is not None:
                out.update(s.metrics(st))
        return out

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

    def reduce(self, cohort: CohortUpdates, state: PyTree, roster: PyTree = None, *,
               with_view: bool = False) -> tuple:
        """Stacked path: ``(aggregate, new state, Counts)`` of a whole cohort (plus the
        reducer's output, what the server holds before its aggregate stages, with
        ``with_view``). ``roster``: :meth:`setup`'s, for a reducer with a protocol (the
        cohort's mask then marks the clients whose upload arrived)."""
        i = self._need_reducer()
        r = self.reducer
        if r.setup is not None:
            return self.finalize(self.partial(cohort, state, roster), state, roster,
                                 cohort.mask, with_view=with_view)
        cohort, new = self._run_pre(zero_masked(cohort), state[:i])
        count = count_clients(cohort)
        if r.streaming:
            reduced, st = r.finalize(r.partial(cohort, state[i]), state[i])
        else:
            reduced, st = r.apply(cohort, state[i])
        aggregate, post = self._run_post(reduced, state[i + 1:])
        out = (aggregate, tuple(new + [st] + post), count)
        return out + (reduced,) if with_view else out

    def partial(self, chunk: CohortUpdates, state: PyTree, roster: PyTree = None) -> PyTree:
        """Streaming path: one chunk's additive contribution (client stages run here)."""
        i = self._need_streaming()
        chunk = zero_masked(chunk)
        stats = []
        for s, st in zip(self.pre, state[:i]):
            stats.append(s.stats(chunk, st) if s.stats else ())
            chunk = s.apply(chunk, st)
        r = self.stages[i]
        contribution = (r.partial(chunk, state[i]) if r.setup is None
                        else r.partial(chunk, state[i], roster))
        return tuple(stats), contribution, count_clients(chunk)

    def finalize(self, total: PyTree, state: PyTree, roster: PyTree = None,
                 arrived: jax.Array | None = None, *, with_view: bool = False) -> tuple:
        """Streaming path: ``(aggregate, new state, Counts)`` from the summed
        contributions of every chunk and device (plus the reducer's output with
        ``with_view``). A reducer with a protocol also takes :meth:`setup`'s ``roster``
        and ``arrived [C]``, the sampled clients whose upload was finite."""
        i = self._need_streaming()
        stats, contribution, count = total
        new = [s.advance(t, st) if s.advance else st
               for s, t, st in zip(self.pre, stats, state[:i])]
        r = self.stages[i]
        if r.setup is None:
            reduced, st = r.finalize(contribution, state[i])
        else:
            if arrived is None:
                fail("arrived", None, f"{r.name!r} runs a protocol and needs the mask of "
                     "the uploads that arrived")
            reduced, st, count = r.finalize(contribution, state[i], roster, arrived)
        aggregate, post = self._run_post(reduced, state[i + 1:])
        out = (aggregate, tuple(new + [st] + post), count)
        return out + (reduced,) if with_view else out

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
