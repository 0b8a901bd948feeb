"""Observers read a round and report on it; they never change it.

An :class:`Observer` sees the cohort's uploads exactly as the server chain receives them
(a :class:`~fedjax_sim.server.CohortUpdates`: unsampled clients and non-finite uploads
masked out, with the clients' population ids) and the round's aggregate. It contributes
an additive partial sum, so on a streaming round it runs inside every chunk next to the
chain's own reduction and the stacked uploads never exist for it either; the round sums
the partials over chunks and devices and calls ``finalize`` once.

What an observer reports is simulator ground truth (it may read every client's upload,
which a server behind secure aggregation could not), and it is labelled so by the
observer that computes it. The same seed gives the same model with and without any
observer: observers take no keys from the round and return only metrics (and, with
``capture``, arrays the host reads after the round).

Three optional parts serve the in-run attackers (:mod:`fedjax_sim.attacks.capture`):

* ``sent=True``: ``partial`` receives the uploads as they leave the clients, after the
  chain's client-side stages (clipping, quantisation, local noise; :func:`as_sent`),
  instead of as they come out of the client program;
* ``setup(ids, mask, round)``: once per round, before any chunk, from the cohort's ids,
  mask and the 0-based round number; ``partial`` then takes ``(chunk, context)``;
* ``capture(summed partial, aggregate)``: a pytree handed to the host in
  ``RoundOutput.observed[name]`` (e.g. the victims' uploads, or the round's aggregate).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from fedjax_sim.server.base import Chain, CohortUpdates, StageKind, zero_masked

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Observer:
    """A read-only view of the round that adds metrics.

    Attributes:
      name: a short name.
      partial: ``CohortUpdates -> pytree``, additive over chunks and devices.
      finalize: ``(summed partial, aggregate) -> {metric name: scalar}``, merged into the
        round's metrics.
      sent: ``partial`` sees the uploads after the chain's client-side stages.
      setup: ``(ids, mask, round) -> context``, or None.
      capture: ``(summed partial, aggregate) -> pytree`` for the host, or None.
    """

    name: str
    partial: Callable[..., PyTree]
    finalize: Callable[[PyTree, PyTree], dict[str, jax.Array]]
    sent: bool = False
    setup: Callable[[jax.Array, jax.Array, jax.Array], PyTree] | None = None
    capture: Callable[[PyTree, PyTree], PyTree] | None = None

    def read(self, chunk: CohortUpdates, context: PyTree) -> PyTree:
        """The observer's partial of ``chunk`` (with the round's context when it has a
        ``setup``)."""
        return self.partial(chunk) if self.setup is None else self.partial(chunk, context)


def as_sent(chain: Chain, cohort: CohortUpdates, state: Any) -> CohortUpdates:
    """The uploads as they leave the clients (what a server that sees each upload
    receives): zero-masked and through the chain's ``CLIENT`` stages that run on the
    clients (clipping, quantisation, local noise; not server-side checks such as a norm
    filter). ``state``: the chain's state."""
    cohort = zero_masked(cohort)
    for s, st in zip(chain.pre, state):
        if s.kind is StageKind.CLIENT and not s.server_side:
            cohort = s.apply(cohort, st)
    return cohort


__all__ = ["Observer", "as_sent"]
