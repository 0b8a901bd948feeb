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
observer: observers take no keys from the round and return only metrics.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from fedjax_sim.server.base import CohortUpdates

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Observer:
    """A read-only view of the round that adds metrics.

    Attributes:
      name: a short name.
      partial: ``CohortUpdates -> pytree``, additive over chunks and devices.
      finalize: ``(summed partial, aggregate) -> {metric name: scalar}``, merged into the
        round's metrics.
    """

    name: str
    partial: Callable[[CohortUpdates], PyTree]
    finalize: Callable[[PyTree, PyTree], dict[str, jax.Array]]


__all__ = ["Observer"]
