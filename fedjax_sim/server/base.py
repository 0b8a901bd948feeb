"""The server transform interface: optax-style pure (init, update) pairs.

A server step turns the cohort's stacked client deltas into one aggregate delta. It is a
chain of transforms, each a pair of pure functions:

* ``init(params) -> state``: the transform's state, a pytree of fixed shapes and dtypes
  (settings live in the closure; what changes lives in the state: clip norms, PRNG keys,
  momentum, ...).
* ``update(value, state) -> (value, state)``.

``value`` is either a :class:`CohortUpdates` (stacked per-client deltas with a leading
cohort axis, their aggregation weights and the client mask) or, after a reducer, the
aggregate delta itself (a params-shaped pytree). Three kinds of transforms follow:

* per-client transforms map ``CohortUpdates -> CohortUpdates`` (clipping, quantisation,
  poisoning defences that rescale clients) and must leave masked clients' weight at 0;
* reducers map ``CohortUpdates -> aggregate`` (weighted mean, median, Krum, ...);
* aggregate transforms map ``aggregate -> aggregate`` (DP noise, server-side scaling).

Transforms may also report host-visible information through ``info``: a static mapping
(e.g. the clip norm and the noise multiplier a DP accountant needs) so that the privacy
ledger is fed from what ran rather than from numbers typed twice.

Streaming. A reducer whose result is a sum over clients (weighted mean, sum) can also be
computed chunk by chunk, so that the cohort's stacked updates ``[C, params]`` never exist
in memory. Such a transform carries a :class:`StreamingReducer`: ``partial(chunk, state)``
is a chunk's additive contribution and ``finalize(total, state)`` turns the sum of all
contributions into ``(aggregate, new_state)``. ``chain`` streams when every transform
before the first streaming reducer is marked ``info["per_client"] = True`` (it acts on each
client alone and keeps its state unchanged, like clipping) -- those then run inside each
chunk -- and the transforms after it act on the aggregate. The round uses the streaming
path whenever the chain offers one; both paths compute the same aggregate.

The result of the chain is a *delta* (new params minus old, in the clients' direction);
the round negates it into a pseudo-gradient for a plain optax server optimiser.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any


class CohortUpdates(NamedTuple):
    """Stacked client outputs that a per-client transform or reducer consumes.

    Attributes:
      updates: pytree of per-client deltas, every leaf ``[C, ...]``.
      weights: ``[C]`` float32 aggregation weights (0 for masked clients).
      mask: ``[C]`` bool, ``True`` for clients whose update takes part in aggregation.
    """

    updates: PyTree
    weights: jax.Array
    mask: jax.Array


class ServerTransform(NamedTuple):
    """A pure server-side transform (see module docstring).

    Attributes:
      init: ``params -> state``.
      update: ``(value, state) -> (value, state)``.
      info: static, host-side facts about the transform (name, DP parameters, ...).
    """

    init: Callable[[PyTree], PyTree]
    update: Callable[[Any, PyTree], tuple[Any, PyTree]]
    info: Mapping[str, Any] = {}
    streaming: "StreamingReducer | None" = None


class StreamingReducer(NamedTuple):
    """The chunked form of a sum-type reducer (see module docstring).

    Attributes:
      partial: ``(chunk: CohortUpdates, state) -> contribution`` (a pytree that is summed
        over chunks and devices).
      finalize: ``(total_contribution, state) -> (aggregate, new_state)``.
    """

    partial: Callable[[CohortUpdates, PyTree], PyTree]
    finalize: Callable[[PyTree, PyTree], tuple[PyTree, PyTree]]


def chain(*transforms: ServerTransform) -> ServerTransform:
    """Composes transforms left to right; the state is the tuple of their states."""
    if not transforms:
        raise ValueError("chain: needs at least one transform")

    def init(params):
        return tuple(t.init(params) for t in transforms)

    def update(value, state):
        new_states = []
        for t, s in zip(transforms, state):
            value, s = t.update(value, s)
            new_states.append(s)
        return value, tuple(new_states)

    return ServerTransform(init, update, {"chain": tuple(dict(t.info) for t in transforms)},
                           _chain_streaming(transforms))


def _chain_streaming(transforms: tuple[ServerTransform, ...]) -> StreamingReducer | None:
    """The streaming form of a chain, when its structure allows one (else None)."""
    first = next((i for i, t in enumerate(transforms) if t.streaming is not None), None)
    if first is None or not all(t.info.get("per_client") for t in transforms[:first]):
        return None
    reducer = transforms[first].streaming

    def partial(chunk, state):
        for t, s in zip(transforms[:first], state[:first]):
            chunk, _ = t.update(chunk, s)
        return reducer.partial(chunk, state[first])

    def finalize(total, state):
        value, s = reducer.finalize(total, state[first])
        new_states = list(state[:first]) + [s]
        for t, s in zip(transforms[first + 1:], state[first + 1:]):
            value, s = t.update(value, s)
            new_states.append(s)
        return value, tuple(new_states)

    return StreamingReducer(partial, finalize)


def is_cohort(value: Any) -> bool:
    """True for stacked per-client values, False for an aggregate."""
    return isinstance(value, CohortUpdates)


def transform_infos(transform: ServerTransform) -> tuple[Mapping[str, Any], ...]:
    """The flat list of ``info`` mappings of a (possibly chained) transform."""
    info = dict(transform.info)
    if "chain" in info:
        return tuple(info["chain"])
    return (info,)


def masked_weights(cohort: CohortUpdates) -> jax.Array:
    """The weights with masked clients set to exactly zero."""
    return jnp.where(cohort.mask, cohort.weights, 0.0).astype(jnp.float32)


def scale_per_client(updates: PyTree, scales: jax.Array) -> PyTree:
    """Multiplies client c's update by ``scales[c]`` (``scales`` has shape ``[C]``)."""
    return jax.tree.map(
        lambda u: u * scales.reshape(scales.shape + (1,) * (u.ndim - 1)).astype(u.dtype),
        updates)


def per_client_l2_norms(updates: PyTree) -> jax.Array:
    """``[C]`` global L2 norm of each client's update (over all leaves)."""
    sq = [jnp.sum(jnp.square(u.reshape(u.shape[0], -1).astype(jnp.float32)), axis=1)
          for u in jax.tree.leaves(updates)]
    return jnp.sqrt(sum(sq))


def weighted_sum(updates: PyTree, weights: jax.Array) -> PyTree:
    """``sum_c weights[c] * updates[c]`` leaf by leaf (a contraction, not a broadcast)."""
    return jax.tree.map(
        lambda u: jnp.tensordot(weights.astype(u.dtype), u, axes=(0, 0)), updates)


def alignment(tree: PyTree, reference: PyTree) -> dict[str, jax.Array]:
    """``{"inner_product", "cosine"}`` of two same-structure pytrees, in float32.

    The cosine of a zero vector with anything is 0 (the norm product is floored at 1e-12).
    """
    a = jnp.concatenate([x.reshape(-1).astype(jnp.float32) for x in jax.tree.leaves(tree)])
    b = jnp.concatenate([x.reshape(-1).astype(jnp.float32)
                         for x in jax.tree.leaves(reference)])
    ip = jnp.dot(a, b)
    return {"inner_product": ip,
            "cosine": ip / jnp.maximum(jnp.linalg.norm(a) * jnp.linalg.norm(b), 1e-12)}


def weighted_mean() -> ServerTransform:
    """Reducer: the weight-normalised mean ``sum_c w_c u_c / sum_c w_c`` over unmasked clients.

    With example weights this is FedAvg's aggregate; with unit weights the plain client mean.
    A round in which every client is masked yields a zero aggregate (no NaN).
    """

    def init(params):
        del params
        return ()

    def partial(chunk, state):
        del state
        w = masked_weights(chunk)
        return weighted_sum(chunk.updates, w), jnp.sum(w)

    def finalize(total, state):
        summed, weight = total
        scale = jnp.where(weight > 0, 1.0 / jnp.where(weight > 0, weight, 1.0), 0.0)
        return jax.tree.map(lambda s: s * scale.astype(s.dtype), summed), state

    def update(value, state):
        if not is_cohort(value):
            raise TypeError("weighted_mean: expects CohortUpdates (it reduces the cohort axis)")
        return finalize(partial(value, state), state)

    return ServerTransform(init, update, {"name": "weighted_mean"},
                           StreamingReducer(partial, finalize))


def zero_masked(cohort: CohortUpdates) -> CohortUpdates:
    """Sets masked clients' updates and weights to exactly zero.

    Uses ``jnp.where`` rather than a product, so masked junk (huge, inf or NaN values) cannot
    leak into any later sum. Per-client transforms and reducers call this first.

    Args:
      cohort: stacked client updates.

    Returns:
      The same cohort with masked clients' updates and weights set to zero.
    """
    mask = cohort.mask

    def zero(u):
        m = mask.reshape(mask.shape + (1,) * (u.ndim - 1))
        return jnp.where(m, u, jnp.zeros((), u.dtype))

    return CohortUpdates(jax.tree.map(zero, cohort.updates), masked_weights(cohort), mask)


def cohort_size(cohort: CohortUpdates) -> int:
    """The static cohort size ``C`` (the leading axis of the mask), known at trace time."""
    return int(cohort.mask.shape[0])
