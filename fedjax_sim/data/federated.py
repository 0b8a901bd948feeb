"""Federated data as padded arrays plus masks.

Two kinds of population share one small interface, ``cohort_data(client_ids)``, which is
called inside the jitted round and returns a :class:`ClientData` with a leading cohort
axis:

* :class:`FederatedData` holds every client's examples, padded to ``max_examples``, with
  per-client counts. It is a pytree: the round receives it as an argument (never as a
  closed-over constant, which would be baked into the compiled program).
* A procedural population (``fedjax_sim.data.procedural``) generates a client's examples
  from ``(key, client_id)`` inside jit, so its memory cost is the cohort's alone.

Ragged data is padding plus a boolean mask; a masked example contributes exactly zero.
"""

from __future__ import annotations

from typing import Any, Protocol

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fedjax_sim._validation import fail


@struct.dataclass
class ClientData:
    """One client's examples (or a cohort's, with a leading cohort axis).

    Attributes:
      x: inputs, shape ``[N, ...]`` (``[C, N, ...]`` for a cohort).
      y: integer labels, shape ``[N]``.
      mask: boolean, ``True`` for real examples, ``False`` for padding.
      client_id: int32 scalar id of the client in its population (``-1`` for padding
        clients of a cohort).
    """

    x: jax.Array
    y: jax.Array
    mask: jax.Array
    client_id: jax.Array


class Population(Protocol):
    """What the round needs from a population; implemented by data pytrees."""

    @property
    def num_clients(self) -> int: ...

    @property
    def max_examples(self) -> int: ...

    def cohort_data(self, client_ids: jax.Array) -> ClientData: ...


@struct.dataclass
class FederatedData:
    """Every client's examples, padded to a common size.

    Attributes:
      x: ``[K, N, ...]`` inputs for K clients, padded to N examples each.
      y: ``[K, N]`` int32 labels in ``[0, num_classes)``.
      counts: ``[K]`` int32 number of real examples per client (the first ``counts[k]``
        slots of client k are real, the rest is padding).
      num_classes: number of label classes (static).
    """

    x: jax.Array
    y: jax.Array
    counts: jax.Array
    num_classes: int = struct.field(pytree_node=False)

    @property
    def num_clients(self) -> int:
        return int(self.x.shape[0])

    @property
    def max_examples(self) -> int:
        return int(self.x.shape[1])

    @property
    def example_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[2:])

    @property
    def num_examples(self) -> int:
        return int(np.asarray(self.counts).sum())

    def mask(self) -> jax.Array:
        return jnp.arange(self.max_examples)[None, :] < self.counts[:, None]

    def cohort_data(self, client_ids: jax.Array) -> ClientData:
        """Gathers the clients ``client_ids`` (``-1`` = padding client, no examples)."""
        valid = client_ids >= 0
        safe = jnp.where(valid, client_ids, 0)
        counts = jnp.where(valid, self.counts[safe], 0)
        mask = jnp.arange(self.max_examples)[None, :] < counts[:, None]
        return ClientData(x=self.x[safe], y=self.y[safe], mask=mask,
                          client_id=jnp.where(valid, client_ids, -1).astype(jnp.int32))

    def client(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The real (unpadded) examples of client ``k`` as NumPy arrays."""
        n = int(self.counts[k])
        return np.asarray(self.x[k])[:n], np.asarray(self.y[k])[:n]

    def pooled(self) -> tuple[np.ndarray, np.ndarray]:
        """All real examples of all clients, concatenated (a centralised view)."""
        m = np.asarray(self.mask())
        return np.asarray(self.x)[m], np.asarray(self.y)[m]


def federated_data_from_clients(xs: list[Any], ys: list[Any], *, num_classes: int | None = None,
                                max_examples: int | None = None,
                                dtype: Any = np.float32) -> FederatedData:
    """Builds a validated :class:`FederatedData` from ragged per-client arrays.

    Args:
      xs: per-client inputs, each ``[n_k, ...]`` with a common example shape.
      ys: per-client integer labels, each ``[n_k]``.
      num_classes: label count; inferred as ``max(label) + 1`` when None.
      max_examples: padded size; defaults to the largest client. A client larger than
        this is an error (truncating silently would change the experiment).
      dtype: dtype of the stored inputs.

    Returns:
      The padded federated dataset.
    """
    if len(xs) != len(ys):
        fail("ys", f"<{len(ys)} clients>", f"must have as many clients as xs ({len(xs)})")
    if len(xs) == 0:
        fail("xs", "<0 clients>", "must hold at least one client")
    xs = [np.asarray(x) for x in xs]
    ys = [np.asarray(y) for y in ys]
    example_shape = xs[0].shape[1:]
    for k, (x, y) in enumerate(zip(xs, ys)):
        if x.shape[1:] != example_shape:
            fail(f"xs[{k}].shape", x.shape, f"example shape must be {example_shape}")
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            fail(f"ys[{k}].shape", y.shape, f"must be ({x.shape[0]},) to match xs[{k}]")
    counts = np.array([x.shape[0] for x in xs], dtype=np.int32)
    n_max = int(counts.max()) if max_examples is None else int(max_examples)
    if n_max < 1:
        fail("max_examples", n_max, "must be >= 1")
    if counts.max() > n_max:
        k = int(counts.argmax())
        fail(f"xs[{k}]", f"<{counts[k]} examples>", f"exceeds max_examples={n_max}")
    x_pad = np.zeros((len(xs), n_max) + example_shape, dtype=dtype)
    y_pad = np.zeros((len(xs), n_max), dtype=np.int32)
    for k, (x, y) in enumerate(zip(xs, ys)):
        x_pad[k, :len(x)] = x
        y_pad[k, :len(y)] = y
    return make_federated_data(x_pad, y_pad, counts, num_classes=num_classes)


def make_federated_data(x: Any, y: Any, counts: Any, *, num_classes: int | None = None
                        ) -> FederatedData:
    """Validates padded arrays and returns a :class:`FederatedData`.

    Padding slots are zeroed so that stale values cannot leak into any computation.
    """
    x = np.asarray(x)
    y = np.asarray(y)
    counts = np.asarray(counts)
    if x.ndim < 2:
        fail("x.shape", x.shape, "must be [clients, examples, ...]")
    if not np.issubdtype(x.dtype, np.floating):
        fail("x.dtype", str(x.dtype), "must be a floating dtype")
    if y.shape != x.shape[:2]:
        fail("y.shape", y.shape, f"must equal x.shape[:2]={x.shape[:2]}")
    if not np.issubdtype(y.dtype, np.integer):
        fail("y.dtype", str(y.dtype), "must be an integer dtype")
    if counts.shape != (x.shape[0],):
        fail("counts.shape", counts.shape, f"must be ({x.shape[0]},)")
    if not np.issubdtype(counts.dtype, np.integer):
        fail("counts.dtype", str(counts.dtype), "must be an integer dtype")
    if counts.size and (counts.min() < 0 or counts.max() > x.shape[1]):
        bad = counts[(counts < 0) | (counts > x.shape[1])][0]
        fail("counts", int(bad), f"must lie in [0, {x.shape[1]}]")
    mask = np.arange(x.shape[1])[None, :] < counts[:, None]
    real_y = y[mask]
    if real_y.size:
        if real_y.min() < 0:
            fail("y", int(real_y.min()), "labels must be >= 0")
        inferred = int(real_y.max()) + 1
    else:
        inferred = 1
    if num_classes is None:
        num_classes = inferred
    elif num_classes < inferred:
        fail("num_classes", num_classes, f"is smaller than max label + 1 = {inferred}")
    if not np.all(np.isfinite(x[mask])):
        fail("x", "<non-finite values>", "inputs must be finite")
    x = np.where(mask.reshape(mask.shape + (1,) * (x.ndim - 2)), x, 0).astype(x.dtype)
    y = np.where(mask, y, 0).astype(np.int32)
    return FederatedData(x=jnp.asarray(x), y=jnp.asarray(y),
                         counts=jnp.asarray(counts, dtype=jnp.int32),
                         num_classes=int(num_classes))


def padded_bytes(num_clients: int, max_examples: int, example_shape: tuple[int, ...]) -> int:
    """Bytes of ``num_clients`` clients padded to ``max_examples`` examples of
    ``example_shape``: float32 inputs, an int32 label and a bool mask per slot."""
    return num_clients * max_examples * (4 * int(np.prod(example_shape)) + 4 + 1)


def check_cohort_data(data: ClientData, cohort: int) -> None:
    """Asserts the cohort layout (leading axis ``cohort``) of gathered client data."""
    chex.assert_tree_shape_prefix((data.x, data.y, data.mask, data.client_id), (cohort,))
