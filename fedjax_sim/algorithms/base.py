"""An algorithm is a client program plus a server program.

::

    server program ──broadcast(params, server state)──▶ message
    client program (ONE client): update(message, data, key, own state)
                                 ──▶ ClientResult(upload, weight, metrics, new own state)
    the round: every sampled client, vmapped in chunks ──▶ uploads
    server program's aggregator (a typed chain) ──▶ aggregate
    server program: apply(params, server state, aggregate, RoundInfo) ──▶ new params, state

FedSGD/FedAvg/FedOpt/FedProx (:mod:`~fedjax_sim.algorithms.fedopt`) upload the model
delta and apply an optax optimiser to ``-aggregate``; SCAFFOLD
(:mod:`~fedjax_sim.algorithms.scaffold`) broadcasts the params with the server control
variate, keeps a control variate per client and uploads both deltas. Adversaries wrap a
client program (:func:`fedjax_sim.poisoning.adversarial_client`); they are not engine
flags. The round (:mod:`fedjax_sim.rounds`) knows nothing about any of them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax

from fedjax_sim._validation import fail
from fedjax_sim.server.base import Chain, Stage, as_chain

PyTree = Any


class ClientResult(NamedTuple):
    """What one client's program returns.

    Attributes:
      upload: the pytree the client sends (FedAvg: its model delta).
      weight: float32 aggregation weight (0 for a client with no data).
      metrics: float32 scalars (``train_loss``, ``train_accuracy`` and ``num_examples``
        are averaged into the round's metrics when present).
      state: the client's new persistent state (``()`` for stateless programs).
    """

    upload: PyTree
    weight: jax.Array
    metrics: dict[str, jax.Array]
    state: PyTree = ()


def _upload_is_params(params: PyTree) -> PyTree:
    return params


@dataclasses.dataclass(frozen=True)
class ClientProgram:
    """The client half of an algorithm, written for ONE client (vmapped by the round).

    Attributes:
      update: ``(message, data, key, state) -> ClientResult``; ``data`` is one client's
        :class:`~fedjax_sim.data.ClientData` (no cohort axis), ``key`` its own PRNG key,
        ``state`` its persistent state (``()`` when stateless).
      init_state: ``params -> one client's initial state``, or None (stateless). The
        round keeps ``[num_clients, ...]`` of it and touches only the sampled rows.
      upload_like: ``params -> a pytree shaped like one upload`` (the aggregator's state is
        initialised from it); default: the upload is shaped like the params.
    """

    update: Callable[[PyTree, Any, jax.Array, PyTree], ClientResult]
    init_state: Callable[[PyTree], PyTree] | None = None
    upload_like: Callable[[PyTree], PyTree] = _upload_is_params


class RoundInfo(NamedTuple):
    """What a server program's ``apply`` learns about the round besides the aggregate.

    Attributes:
      num_aggregated: int32, clients whose uploads reached the reducer.
      num_contributing: int32, those of them with a positive weight.
      round: int32, rounds completed before this one.
      population: the population size (a static int).
    """

    num_aggregated: jax.Array
    num_contributing: jax.Array
    round: jax.Array
    population: int


@dataclasses.dataclass(frozen=True)
class ServerProgram:
    """The server half of an algorithm.

    Attributes:
      init_params: ``key -> initial global params``.
      init: ``params -> server state`` (optimiser state, control variates, ...).
      broadcast: ``(params, state) -> message`` every sampled client receives.
      aggregator: the typed chain that turns the cohort's uploads into an aggregate.
      apply: ``(params, state, aggregate, RoundInfo) -> (params, state)``.
      sends: ``(params, state, round) -> params`` the server sends in round ``round``
        (0-based) in place of its own, or None: it sends its own (every honest server). The
        seam of a malicious server (:func:`fedjax_sim.attacks.malicious_server.spy_server`).
    """

    init_params: Callable[[jax.Array], PyTree]
    init: Callable[[PyTree], PyTree]
    broadcast: Callable[[PyTree, PyTree], PyTree]
    aggregator: Chain
    apply: Callable[[PyTree, PyTree, PyTree, RoundInfo], tuple[PyTree, PyTree]]
    sends: Callable[[PyTree, PyTree, Any], PyTree] | None = None

    def __post_init__(self):
        if not isinstance(self.aggregator, (Chain, Stage)):
            fail("aggregator", type(self.aggregator).__name__, "must be a server stage or "
                 "chain")
        chain = as_chain(self.aggregator)
        if not chain.complete:
            fail("aggregator", list(chain.names), "has no reducer: nothing turns the "
                 "cohort's uploads into an aggregate")
        object.__setattr__(self, "aggregator", chain)


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """A federated algorithm: ``name``, a client program and a server program."""

    name: str
    client: ClientProgram
    server: ServerProgram

    def with_aggregator(self, aggregator: Stage | Chain) -> "Algorithm":
        """The same algorithm with another aggregation chain."""
        return dataclasses.replace(
            self, server=dataclasses.replace(self.server, aggregator=as_chain(aggregator)))

    def with_client(self, client: ClientProgram) -> "Algorithm":
        """The same algorithm with another client program (e.g. an adversary's wrapper)."""
        return dataclasses.replace(self, client=client)


__all__ = ["Algorithm", "ClientProgram", "ClientResult", "RoundInfo", "ServerProgram"]
