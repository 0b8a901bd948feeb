"""Update compression as ``CLIENT`` stages: quantisation, rotation and sparsification.

Each stage simulates a client encoding its upload and the server decoding it: the output
is the decoded upload in the original coordinates, so any reducer can follow. Written for
one client and vmapped over the cohort, inside the round's chunks (the chain streams).
Client ``c`` draws its randomness from ``fold_in(round_key, id_c)`` with ``id_c`` its
population id (its position when the cohort carries no ids), so a client's encoding does
not depend on its chunk, its position or the cohort size; the round key comes from the
stage's state and advances once per round. Masked clients stay zero with weight 0. Each
stage declares what a client sends (its ``wire``: packed bits plus side information,
or values plus indices), which the run's communication ledger counts
(:mod:`fedjax_sim.comms`). These are communication-cost tools, not privacy or robustness
mechanisms. In a DP chain put the quantisers *before* the clipping:
quantisation can raise a client's norm above the clip bound (top-k only lowers it), so
``clip -> quantise -> sum -> noise`` would not have the sensitivity the clip reports.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim._validation import ConfigError, check_float, check_int
from fedjax_sim.comms import Wire, packed_bytes
from fedjax_sim.server.base import (Stage, client_positions, client_stage, stage_key,
                                    zero_masked)
from fedjax_sim.server.clipping import check_key

PyTree = Any


class CompressionState(NamedTuple):
    """State of the randomised compressors: the PRNG key, split on every update."""

    key: jax.Array


def _flatten_client(tree: PyTree) -> tuple[jax.Array, Any]:
    """One client's update as a float32 vector, and the function that undoes it."""
    leaves, treedef = jax.tree.flatten(tree)
    sizes = [leaf.size for leaf in leaves]
    flat = jnp.concatenate([leaf.reshape(-1).astype(jnp.float32) for leaf in leaves])

    def unflatten(vec):
        out, offset = [], 0
        for leaf, size in zip(leaves, sizes):
            out.append(vec[offset:offset + size].reshape(leaf.shape).astype(leaf.dtype))
            offset += size
        return jax.tree.unflatten(treedef, out)

    return flat, unflatten


def quantize_vector(x: jax.Array, levels: int, uniform: jax.Array) -> jax.Array:
    """Unbiased stochastic uniform quantisation of ``x`` onto ``levels + 1`` points.

    The grid spans ``[min x, max x]``; each value is rounded to one of its two neighbouring
    grid points with probabilities that make the result's expectation exactly ``x``
    (Alistarh et al. 2017, QSGD; Suresh et al. 2017). A constant vector is returned as is.
    ``uniform`` holds one independent ``U[0, 1)`` draw per entry of ``x``.
    """
    x32 = x.astype(jnp.float32)
    lo, hi = jnp.min(x32), jnp.max(x32)
    span = hi - lo
    safe = jnp.where(span > 0, span, 1.0)
    t = (x32 - lo) / safe * levels
    low = jnp.floor(t)
    q = low + (uniform.reshape(x.shape) < (t - low)).astype(jnp.float32)
    q = jnp.clip(q, 0.0, float(levels))
    return jnp.where(span > 0, lo + q * (safe / levels), x32).astype(x.dtype)


def _randomised(name: str, one_client, key: jax.Array, wire) -> Stage:
    """A ``CLIENT`` stage ``one_client(upload, client_key, shared_round_key)``."""
    key = check_key("key", key)

    def apply(cohort, state):
        round_key, _ = stage_key(state.key)
        shared_key, client_key = jax.random.split(round_key)
        keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(client_key,
                                                               client_positions(cohort))
        decoded = jax.vmap(one_client, in_axes=(0, 0, None))(cohort.updates, keys, shared_key)
        return zero_masked(cohort._replace(updates=decoded))

    return client_stage(name, apply, init=lambda upload: CompressionState(key),
                        advance=lambda total, state: CompressionState(stage_key(state.key)[1]),
                        wire=wire)


def stochastic_quantize(bits: int, *, key: jax.Array, per_leaf: bool = True) -> Stage:
    """Unbiased stochastic uniform quantisation of each client's update to ``2^bits`` levels.

    Each client's values are mapped onto ``2^bits`` evenly spaced levels between its own min
    and max, rounding up or down at random so that the decoded update is unbiased
    (``E[Q(u)] = u``) with per-coordinate variance ``<= (max - min)^2 / (4 (2^bits - 1)^2)``.
    ``per_leaf=True`` uses a min/max per leaf (two floats of side information per leaf),
    ``False`` one min/max over the whole flattened update.

    Args:
      bits: bits per coordinate, 1 to 16.
      key: PRNG key for the rounding; kept in the state and split on every update.
      per_leaf: the min/max range per leaf (True) or global per client (False).

    Returns:
      A streaming ``CLIENT`` stage named ``"stochastic_quantize"`` (state: its key).
    """
    b = check_int("bits", bits, min_value=1, max_value=16)
    levels = 2 ** b - 1

    def one_client(tree, ckey, shared_key):
        del shared_key
        flat, unflatten = _flatten_client(tree)
        uniform = jax.random.uniform(ckey, flat.shape, jnp.float32)  # one draw per client
        if not per_leaf:
            return unflatten(quantize_vector(flat, levels, uniform))
        out, offset = [], 0
        for leaf in jax.tree.leaves(tree):
            out.append(quantize_vector(leaf, levels, uniform[offset:offset + leaf.size]))
            offset += leaf.size
        return jax.tree.unflatten(jax.tree.structure(tree), out)

    def wire(sizes):  # b bits a coordinate, plus a float32 min and max per range
        return Wire(packed_bytes(sum(sizes), b) + 8 * (len(sizes) if per_leaf else 1))

    return _randomised("stochastic_quantize", one_client, key, wire)


_H32 = functools.reduce(np.kron, [np.array([[1, 1], [1, -1]], np.float32)] * 5)
"""The 32 x 32 Sylvester-Hadamard matrix."""


def fwht(x: jax.Array) -> jax.Array:
    """Orthonormal fast Walsh-Hadamard transform of a length-``2^m`` vector (self-inverse).

    The five lowest levels are one ``[p/32, 32] x [32, 32]`` product (``H_p = H_(p/32)
    kron H_32``), the others butterflies: the transform is memory-bound, and this makes
    a third fewer passes over the vector (a 2^15-float rotation took 0.57x the time).
    """
    p = x.shape[0]
    if p & (p - 1):
        raise ValueError(f"fwht: length {p} is not a power of two")
    h = 1
    if p >= 32:
        x = (x.reshape(-1, 32) @ jnp.asarray(_H32, x.dtype)).reshape(p)
        h = 32
    while h < p:
        y = x.reshape(-1, 2, h)
        x = jnp.stack([y[:, 0] + y[:, 1], y[:, 0] - y[:, 1]], axis=1).reshape(p)
        h *= 2
    return x / jnp.sqrt(jnp.float32(p)).astype(x.dtype)


def hadamard_rotate_quantize(bits: int, *, key: jax.Array) -> Stage:
    """Random rotation (sign flips + Walsh-Hadamard), stochastic quantisation, inverse.

    Suresh, Yu, Kumar, McMahan 2017, "Distributed Mean Estimation with Limited
    Communication" (stochastic rotated quantisation): the flattened update, zero-padded to
    ``P = 2^ceil(log2 d)``, is rotated by ``H D / sqrt(P)`` with ``D`` random signs shared by
    all clients of the round (drawn from the state's key: public randomness), quantised
    with :func:`quantize_vector` to ``2^bits`` levels between its min and max, and rotated
    back on the server. Unbiased; the rotation spreads the coordinates so the range, and
    hence the mean-squared error, shrinks from ``O(d)`` to ``O(log d)`` times the norm.

    Args:
      bits: bits per coordinate, 1 to 16.
      key: PRNG key for the rotation signs and the rounding; split on every update.

    Returns:
      A streaming ``CLIENT`` stage named ``"hadamard_rotate_quantize"`` (state: its key).
    """
    b = check_int("bits", bits, min_value=1, max_value=16)
    levels = 2 ** b - 1

    def one_client(tree, ckey, shared_key):
        flat, unflatten = _flatten_client(tree)
        d = flat.shape[0]
        p = 1 << max(d - 1, 0).bit_length()
        signs = jax.random.rademacher(shared_key, (p,), jnp.float32)
        rotated = fwht(signs * jnp.pad(flat, (0, p - d)))
        uniform = jax.random.uniform(ckey, (p,), jnp.float32)
        decoded = signs * fwht(quantize_vector(rotated, levels, uniform))
        return unflatten(decoded[:d])

    def wire(sizes):  # b bits per padded coordinate, a float32 min and max; the signs
        d = sum(sizes)  # come from the round's public seed (8 bytes down)
        return Wire(packed_bytes(1 << max(d - 1, 0).bit_length(), b) + 8, 0, 8)

    return _randomised("hadamard_rotate_quantize", one_client, key, wire)


def top_k_sparsify(k: int | None = None, *, fraction: float | None = None) -> Stage:
    """Keeps each client's ``k`` largest-magnitude coordinates (over the whole update).

    Top-k sparsification (Aji & Heafield 2017; Stich et al. 2018). Biased: without error
    feedback (client-side memory of the dropped mass, not provided here) it can slow or stall
    convergence. Ties go to the lower flattened index. Deterministic, no state.

    Args:
      k: coordinates kept per client (capped at the update size); or
      fraction: the fraction in ``(0, 1]`` kept, ``k = max(1, ceil(fraction * d))``.
        Give exactly one of the two.

    Returns:
      A stateless ``CLIENT`` stage named ``"top_k_sparsify"``.
    """
    if (k is None) == (fraction is None):
        raise ConfigError(f"k={k!r}: give exactly one of k and fraction (fraction={fraction!r})")
    kk = None if k is None else check_int("k", k, min_value=1)
    frac = None if fraction is None else check_float("fraction", fraction, min_value=0.0,
                                                     max_value=1.0, min_exclusive=True)

    def one_client(tree):
        flat, unflatten = _flatten_client(tree)
        d = flat.shape[0]
        keep = min(kk if kk is not None else max(1, math.ceil(frac * d)), d)
        _, idx = jax.lax.top_k(jnp.abs(flat), keep)
        return unflatten(jnp.zeros_like(flat).at[idx].set(flat[idx]))

    def wire(sizes):  # k float32 values and their int32 indices
        d = sum(sizes)
        return Wire(8 * min(kk if kk is not None else max(1, math.ceil(frac * d)), d))

    return client_stage("top_k_sparsify", lambda cohort, state: cohort._replace(
        updates=jax.vmap(one_client)(cohort.updates)), preserves_bound=True, wire=wire)
