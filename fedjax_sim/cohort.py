"""The cohort map: run a one-client function over a whole cohort, vectorised.

``map_cohort`` is the only place where clients are batched. It

1. vmaps the one-client function over equal chunks of at most ``chunk_size`` clients
   (:mod:`fedjax_sim._chunks`: the last chunks padded with rows whose outputs are
   dropped, inert clients where chunks are reduced, so the client program is traced and
   compiled once), so peak memory for activations, gathered
   client data and optimiser state is bounded by the chunk, not by the cohort;
2. gathers (or procedurally generates) each client's data *inside* the chunk, so the
   cohort's data is never materialised at once;
3. optionally shards the cohort axis over a ``clients`` mesh axis with ``jax.shard_map``:
   each device maps its own slice of clients; params and the population are replicated.
   The same code runs on one CPU, several local devices, or every device of a
   multi-host ``jax.distributed`` job.

The stacked outputs keep a leading cohort axis (sharded over ``clients`` when a mesh is
given); the server chain reduces it. :func:`map_reduce_cohort` instead reduces each
chunk as it goes (for chains that stream), so the stacked uploads never exist.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from fedjax_sim._chunks import chunk_layout, chunked_map, from_chunks, pad_rows, to_chunks
from fedjax_sim._host import device_memory_bytes
from fedjax_sim._validation import check_int, fail
from fedjax_sim.data.federated import Population
from fedjax_sim.server.base import CohortUpdates, zero_masked

PyTree = Any
CLIENTS_AXIS = "clients"


class ClientOutput(NamedTuple):
    """The engine's record of one client (leaves ``[C, ...]`` once mapped over a cohort).

    Attributes:
      upload: what the client's program sends (``()`` once a streaming round reduced it).
      weight: float32 aggregation weight.
      metrics: float32 scalars from the program, plus ``update_norm`` (the upload's L2
        norm, simulator ground truth).
      finite: bool, every entry of the upload is finite (a non-finite upload is never
        aggregated).
      client_state: the client's new persistent state (``()`` when stateless).
    """

    upload: PyTree
    weight: jax.Array
    metrics: dict[str, jax.Array]
    finite: jax.Array
    client_state: PyTree = ()


def client_mesh(devices: Any = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all devices of all processes) named ``clients``."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices).reshape(-1), (CLIENTS_AXIS,))


def mesh_for(num_devices: int | None = None) -> Mesh | None:
    """The round's mesh over the first ``num_devices`` devices (None or 0: every device).

    The one home of device selection (the CLI, the scripts and the notebooks call it):
    one device gives None, an unsharded round.
    """
    devices = jax.devices()
    if num_devices:
        check_int("num_devices", num_devices, min_value=1)
        if num_devices > len(devices):
            fail("num_devices", num_devices, f"only {len(devices)} devices are available")
        devices = devices[:num_devices]
    return None if len(devices) == 1 else client_mesh(devices)


def mesh_size(mesh: Mesh | None) -> int:
    return 1 if mesh is None else int(mesh.shape[CLIENTS_AXIS])


ACCELERATOR_MEMORY_FRACTION = 0.25
"""On a GPU or TPU, a chunk's clients may take at most this fraction of device memory."""

BYTES_PER_PARAM_PER_CLIENT = 64
"""A training client's bytes per model parameter, for the accelerator chunk bound: its
params, gradient, optimiser state and upload in float32 (16 bytes), with room for
activations, the gathered batch and XLA's temporaries."""


def default_chunk_size(num_params: int, cohort: int, *, backend: str | None = None,
                       device_memory: int | None = None) -> int:
    """The clients vectorised together by default, for the backend the round runs on.

    **CPU**: chunks whose per-client model copies stay cache-sized. Every vectorised
    client carries its own params, gradients and optimiser state, so a chunk touches
    ``chunk * num_params`` floats several times per local step. Measured on a 2-core
    EPYC (BENCHMARKS.md), throughput peaks when ``chunk * num_params`` is about 5 * 10^5
    floats, a few times the 1 MiB L2 cache of a core: softmax regression (610 params)
    gets 256, the cap; a 54k-param MLP gets 8, whose FedAvg round at cohort 1,000 took
    500 ms against 638 ms with chunks of 16 on one device, and 229 against 304 ms on
    two. Larger chunks spill out of cache, smaller ones pay per-chunk overhead. Models of
    more than 5 * 10^5 params get chunks of 1: a 420k-param CNN on 28x28 images trained
    39.6 ms per client with chunks of 1 against 49.2 ms with chunks of 4.

    **GPU and TPU**: an accelerator is fastest with the most clients at once, so the
    chunk is bounded by device memory instead: as many clients as fit in
    :data:`ACCELERATOR_MEMORY_FRACTION` of it at :data:`BYTES_PER_PARAM_PER_CLIENT`
    bytes a parameter (the whole cohort when it fits), a power of two below that.

    Args:
      num_params: the model's parameter count.
      cohort: clients per round (per device when the cohort is sharded).
      backend: ``"cpu"``, ``"gpu"``, ``"tpu"``...; default: JAX's default backend.
      device_memory: bytes of one device (accelerators); default: what the device
        reports (:func:`fedjax_sim._host.device_memory_bytes`).
    """
    backend = jax.default_backend() if backend is None else backend
    cohort = max(1, int(cohort))
    if backend != "cpu":
        memory = device_memory_bytes() if device_memory is None else device_memory
        if memory:
            per_client = BYTES_PER_PARAM_PER_CLIENT * max(num_params, 1)
            fit = max(1, int(memory * ACCELERATOR_MEMORY_FRACTION // per_client))
            return cohort if fit >= cohort else 1 << (fit.bit_length() - 1)
    target = max(1, int(5e5 // max(num_params, 1)))
    chunk = 1 << (target.bit_length() - 1)
    return max(1, min(cohort, 256, chunk))


def _one_client_data(population: Population, client_id: jax.Array):
    batched = population.cohort_data(client_id[None])
    return jax.tree.map(lambda a: a[0], batched)


def map_cohort(client_fn: Callable[..., PyTree], message: PyTree, population: Population,
               client_ids: jax.Array, client_keys: jax.Array, client_states: PyTree, *,
               chunk_size: int, mesh: Mesh | None = None) -> PyTree:
    """Applies ``client_fn(message, data, key, state)`` to every client of the cohort.

    Args:
      client_fn: the one-client function (no cohort axis anywhere in its arguments).
      message: what the server broadcasts (e.g. the global params), the same for every
        client.
      population: anything with ``cohort_data(ids)``; a pytree (replicated over devices).
      client_ids: ``[C]`` int32 ids, ``-1`` for padding clients (they see no examples).
      client_keys: ``[C]`` PRNG keys, one per client.
      client_states: pytree with leading ``[C]`` axis (``()`` when stateless).
      chunk_size: clients vectorised together; memory scales with it.
      mesh: optional mesh with a ``clients`` axis; C must be a multiple of its size.

    Returns:
      ``client_fn``'s output with a leading ``[C]`` axis on every leaf.
    """

    if mesh is None:
        return _map_local(client_fn, chunk_size, message, population, client_ids,
                          client_keys, client_states)
    replicated = PartitionSpec()
    split = PartitionSpec(CLIENTS_AXIS)
    # Clients are independent: the per-shard work has no collectives, so the varying-axis
    # type check (which rejects scan carries mixing replicated params and sharded data)
    # guards nothing here and is switched off.
    return jax.shard_map(
        lambda *args: _map_local(client_fn, chunk_size, *args), mesh=mesh,
        in_specs=(replicated, replicated, split, split, split),
        out_specs=split, check_vma=False)(message, population, client_ids, client_keys,
                                          client_states)


def _map_local(client_fn, chunk_size, message, population, ids, keys, states):
    """Maps ``client_fn`` over this device's clients, ``chunk_size`` at a time."""

    def one(args):
        cid, key, state = args
        return client_fn(message, _one_client_data(population, cid), key, state)

    return chunked_map(one, (ids, keys, states), chunk_size)


def map_reduce_cohort(client_fn: Callable[..., ClientOutput],
                      partial_fn: Callable[[CohortUpdates], PyTree], message: PyTree,
                      population: Population, client_ids: jax.Array, client_keys: jax.Array,
                      client_mask: jax.Array, client_states: PyTree, *, chunk_size: int,
                      mesh: Mesh | None = None) -> tuple[PyTree, ClientOutput]:
    """Like :func:`map_cohort`, but reduces the uploads chunk by chunk as it goes.

    Each chunk's uploads become a :class:`CohortUpdates` (:func:`cohort_updates`: a
    client with ``client_mask`` False or a non-finite upload gets mask False, weight 0 and
    a zero upload) passed to ``partial_fn(chunk)``; the contributions are summed over
    chunks and devices. Peak memory holds one chunk of uploads, never the cohort's.

    Returns:
      ``(summed contribution, ClientOutput)`` where the ClientOutput has ``upload=()``
      and ``[C]``-leading weights, metrics, finite flags and client states.
    """
    if mesh is None:
        return _map_reduce_local(client_fn, partial_fn, chunk_size, None, message,
                                 population, client_ids, client_keys, client_mask,
                                 client_states)
    replicated = PartitionSpec()
    split = PartitionSpec(CLIENTS_AXIS)
    return jax.shard_map(
        lambda *args: _map_reduce_local(client_fn, partial_fn, chunk_size, CLIENTS_AXIS,
                                        *args),
        mesh=mesh, in_specs=(replicated, replicated, split, split, split, split),
        out_specs=(replicated, split), check_vma=False)(
            message, population, client_ids, client_keys, client_mask, client_states)


def cohort_updates(out: ClientOutput, mask: jax.Array, client_ids: jax.Array
                   ) -> CohortUpdates:
    """The uploads the server chain sees: clients outside ``mask`` or with a non-finite
    upload are masked, with weight 0 and a zero upload (never averaged in)."""
    ok = mask & out.finite
    return zero_masked(CohortUpdates(out.upload, out.weight.astype(jnp.float32), ok,
                                     client_ids))


def _map_reduce_local(client_fn, partial_fn, chunk_size, axis_name, message, population,
                      ids, keys, mask, states):
    def one(cid, key, state):
        return client_fn(message, _one_client_data(population, cid), key, state)

    # Jitted so that the eval_shape below and the scan's body share one trace of the
    # client program (half of a round's tracing otherwise); XLA inlines the call.
    @jax.jit
    def chunk_contribution(cid, key, m, state):
        out = jax.vmap(one)(cid, key, state)
        return partial_fn(cohort_updates(out, m, cid)), out._replace(upload=())

    # Equal chunks, the client program traced once: padding clients (id -1, mask False,
    # no examples) fill the last chunks, contribute zero and their outputs are dropped.
    n = ids.shape[0]
    chunks, size = chunk_layout(n, chunk_size)
    rows = chunks * size
    xs = to_chunks((pad_rows(ids, rows, -1), pad_rows(keys, rows), pad_rows(mask, rows, False),
                    pad_rows(states, rows)), chunks)
    if chunks == 1:
        total, small = chunk_contribution(*jax.tree.map(lambda a: a[0], xs))
        smalls = jax.tree.map(lambda a: a[None], small)
    else:
        def body(acc, chunk):
            contrib, small = chunk_contribution(*chunk)
            return jax.tree.map(jnp.add, acc, contrib), small

        shapes = jax.eval_shape(chunk_contribution, *jax.tree.map(lambda a: a[0], xs))[0]
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        total, smalls = jax.lax.scan(body, zeros, xs)
    if axis_name is not None:
        total = jax.lax.psum(total, axis_name)
    return total, from_chunks(smalls, n)


def pad_cohort(ids: jax.Array, mask: jax.Array, multiple: int) -> tuple[jax.Array, jax.Array]:
    """Pads ids (with -1) and mask (with False) to a multiple of ``multiple`` clients."""
    extra = (-ids.shape[0]) % multiple
    if extra == 0:
        return ids, mask
    return (jnp.concatenate([ids, jnp.full((extra,), -1, ids.dtype)]),
            jnp.concatenate([mask, jnp.zeros((extra,), bool)]))
