"""Pytree arithmetic used across the library: finiteness, norms, scaling, alignment.

One home for each: every module that asks "is this update finite?" or "what is its L2
norm?" calls these, so the answer cannot differ between the client, the server chain,
the observers and the host.

Norms are computed in float32 with a scale: ``||x|| = m * ||x / m||`` with ``m`` the
largest magnitude, so a finite vector never reports an infinite norm (squaring 1e20 in
float32 would overflow) and a zero vector reports 0.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def all_finite(tree: PyTree) -> jax.Array:
    """bool scalar: every entry of every leaf is finite (True for an empty tree)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _scaled_norm(sq_of_scaled, scale):
    """``scale * sqrt(sum of squares of x / scale)``, 0 where the scale is 0."""
    safe = jnp.where(scale > 0, scale, jnp.ones_like(scale))
    return jnp.where(scale > 0, safe * jnp.sqrt(sq_of_scaled(safe)), jnp.zeros_like(scale))


def l2_norm(tree: PyTree) -> jax.Array:
    """float32 global L2 norm of all leaves together, without overflow (scaled)."""
    leaves = [x.reshape(-1).astype(jnp.float32) for x in jax.tree.leaves(tree)]
    if not leaves:
        return jnp.zeros((), jnp.float32)
    scale = jnp.max(jnp.stack([jnp.max(jnp.abs(x), initial=0.0) for x in leaves]))
    return _scaled_norm(lambda s: sum(jnp.sum(jnp.square(x / s)) for x in leaves), scale)


def per_client_l2_norms(updates: PyTree) -> jax.Array:
    """``[C]`` float32 global L2 norm of each client's update (leaves ``[C, ...]``)."""
    leaves = [u.reshape(u.shape[0], -1).astype(jnp.float32) for u in jax.tree.leaves(updates)]
    scale = jnp.max(jnp.stack([jnp.max(jnp.abs(x), axis=1, initial=0.0) for x in leaves]),
                    axis=0)

    def sq(s):
        return sum(jnp.sum(jnp.square(x / s[:, None]), axis=1) for x in leaves)

    return _scaled_norm(sq, scale)


def scale_per_client(updates: PyTree, scales: jax.Array) -> PyTree:
    """Multiplies client c's update by ``scales[c]`` (``scales`` has shape ``[C]``)."""
    return jax.tree.map(
        lambda u: u * scales.reshape(scales.shape + (1,) * (u.ndim - 1)).astype(u.dtype),
        updates)


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
    norms = l2_norm(a) * l2_norm(b)
    return {"inner_product": ip, "cosine": ip / jnp.maximum(norms, 1e-12)}


def expand_to(mask: jax.Array, like: jax.Array) -> jax.Array:
    """``mask[C]`` reshaped to broadcast against a ``[C, ...]`` leaf."""
    return mask.reshape(mask.shape + (1,) * (like.ndim - mask.ndim))


def select_clients(mask: jax.Array, tree: PyTree) -> PyTree:
    """Zeroes the rows of clients with ``mask`` False (NaN-safe: a select, not a product)."""
    return jax.tree.map(
        lambda u: jnp.where(expand_to(mask, u), u, jnp.zeros((), u.dtype)), tree)
