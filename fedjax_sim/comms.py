"""What a round sends over the network: the bytes of every upload and download.

Every run keeps a communication ledger, with or without secure aggregation. The bytes
are computed from what the simulated clients actually send, not from the simulator's
float32 arrays:

* **download**: the server's broadcast message (the global params, plus e.g.
  SCAFFOLD's control variate), at its dtypes, to every sampled client;
* **payload**: the upload as it leaves the client, decided by the last stage of the
  server chain that declares a :class:`Wire` (a quantiser's ``b`` bits per coordinate
  plus its side information, top-k's values plus their indices, secure aggregation's
  ring elements); the upload's own dtypes when no stage re-encodes it;
* **protocol**: the messages of secure aggregation besides the masked input (public
  keys, encrypted shares, unmasking shares), modelled per neighbour
  (:func:`fedjax_sim.secagg.masking.protocol_bytes`).

A round's totals are host-side Python integers (exact at any scale):
``up = sampled * protocol_up + uploaded * payload`` and
``down = sampled * (download + protocol_down)``, where ``uploaded`` excludes clients
that dropped out before sending their (masked) upload.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import numpy as np

PyTree = Any


class Wire(NamedTuple):
    """Bytes one client exchanges per round besides the model broadcast.

    Attributes:
      payload: the upload as sent.
      protocol_up: other messages the client sends (secure aggregation's keys and shares).
      protocol_down: other messages the client receives.
    """

    payload: int
    protocol_up: int = 0
    protocol_down: int = 0


def tree_bytes(tree: PyTree) -> int:
    """Bytes of a pytree of arrays (or shape-dtype structs) at its dtypes."""
    return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree)))


def leaf_sizes(tree: PyTree) -> tuple[int, ...]:
    """The number of entries of each leaf (what a stage's ``wire`` is given)."""
    return tuple(int(math.prod(x.shape)) for x in jax.tree.leaves(tree))


def packed_bytes(count: int, bits: int) -> int:
    """Bytes of ``count`` values of ``bits`` bits each, packed."""
    return -(-int(count) * int(bits) // 8)


class CommsCost(NamedTuple):
    """A round's per-client bytes (static for a configuration).

    Attributes:
      download: the broadcast message, per sampled client.
      wire: the upload and protocol bytes (:class:`Wire`).
    """

    download: int
    wire: Wire

    def round_bytes(self, sampled: int, uploaded: int) -> tuple[int, int]:
        """``(bytes up, bytes down)`` of a round with ``sampled`` clients of which
        ``uploaded`` delivered their upload."""
        up = sampled * self.wire.protocol_up + uploaded * self.wire.payload
        down = sampled * (self.download + self.wire.protocol_down)
        return int(up), int(down)

    def describe(self) -> dict[str, int]:
        return {"download_per_client": self.download, "upload_per_client":
                self.wire.payload + self.wire.protocol_up, "payload_per_client":
                self.wire.payload, "protocol_up_per_client": self.wire.protocol_up,
                "protocol_down_per_client": self.wire.protocol_down}


__all__ = ["CommsCost", "Wire", "leaf_sizes", "packed_bytes", "tree_bytes"]
