"""Closed-form recovery of the input to a fully connected layer with bias.

Threat model: an honest-but-curious server that sees a victim's update (or the cohort's
sum under secure aggregation), knows the architecture, and modifies nothing. It needs no
optimisation and no labels.

For a dense layer ``z = W^T x + b`` (flax kernel ``W`` of shape ``[d, h]``) and one example,
``dL/dW[:, i] = x * dL/db[i]``, so every unit ``i`` with a nonzero bias gradient gives
``x = dL/dW[:, i] / dL/db[i]`` exactly (Phong et al. 2017, "Privacy-Preserving Deep
Learning via Additively Homomorphic Encryption"; Geiping et al. 2020, Sec. 4). For a
batch the ratio is the mixture ``sum_j g_ji x_j / sum_j g_ji`` of the examples weighted by
their bias gradients; ReLU networks make some units see few examples, so some ratios are
(near) single examples. Any number of local SGD steps of a batch of one keeps the ratio
exact: each step adds ``x * (scalar)`` to the column and the scalar to the bias, and the
input ``x`` of the first layer never changes. Scaling the update (clipping) does not
change the ratio either; additive noise does.

For a batch the attacker returns ``M`` ratios: units in decreasing order of ``|db|``,
skipping near-duplicates of ratios already kept, clipped to the data range ``[0, 1]``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from fedjax_sim._validation import check_float, check_int, fail
from fedjax_sim.attacks.inversion import Reconstruction
from fedjax_sim.attacks.updates import dense_layers

PyTree = Any


def input_layer(update: PyTree, input_dim: int) -> tuple[str, jax.Array, jax.Array]:
    """The first dense layer whose input is the flattened example (kernel ``[..., d, h]``).

    Raises:
      ConfigError: when no dense layer reads the raw input (e.g. a CNN).
    """
    for name, kernel, bias in dense_layers(update):
        if kernel.shape[-2] == input_dim:
            return name, kernel, bias
    fail("model", "<no dense input layer>",
         f"closed-form recovery needs a Dense layer on the flattened input (d={input_dim})")
    raise AssertionError  # unreachable


def unit_ratios(kernel_update: jax.Array, bias_update: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Every unit's ``dW[:, i] / db[i]`` as rows ``[h, d]`` and the ``|db|`` ``[h]``."""
    db = bias_update
    safe = jnp.where(db == 0, 1.0, db)
    return (kernel_update / safe[None, :]).T, jnp.abs(db)


def select_distinct(candidates: jax.Array, strength: jax.Array, num: int, *,
                    relative_threshold: float, duplicate_mse: float) -> jax.Array:
    """Picks ``num`` candidates by decreasing strength, skipping near-duplicates.

    Args:
      candidates: ``[h, d]`` candidate inputs.
      strength: ``[h]`` nonnegative scores (``|db|``); candidates below
        ``relative_threshold * max(strength)`` are never picked.
      num: how many to return.
      relative_threshold: minimum relative strength.
      duplicate_mse: a candidate within this MSE of one already kept is skipped.

    Returns:
      ``[num, d]`` picks (rows of zeros when fewer usable candidates exist).
    """
    order = jnp.argsort(-strength)
    usable = strength >= relative_threshold * jnp.max(strength)
    usable = usable & (strength > 0)

    def step(carry, i):
        kept, count = carry
        r = candidates[i]
        d2 = jnp.mean(jnp.square(kept - r[None, :]), axis=1)
        filled = jnp.arange(num) < count
        dup = jnp.any(filled & (d2 < duplicate_mse))
        take = usable[i] & ~dup & (count < num)
        kept = jnp.where(take, kept.at[jnp.minimum(count, num - 1)].set(r), kept)
        return (kept, count + take.astype(jnp.int32)), None

    init = (jnp.zeros((num, candidates.shape[1]), candidates.dtype), jnp.int32(0))
    (kept, _), _ = jax.lax.scan(step, init, order)
    return kept


@functools.lru_cache(maxsize=32)
def _closed_form_fn(example_shape: tuple[int, ...], num: int, relative_threshold: float,
                    duplicate_mse: float, clip: bool):
    d = math.prod(example_shape)

    def one(update):
        _, kernel, bias = input_layer(update, d)
        cands, strength = unit_ratios(kernel, bias)
        x = select_distinct(cands, strength, num, relative_threshold=relative_threshold,
                            duplicate_mse=duplicate_mse)
        x = jnp.clip(x, 0.0, 1.0) if clip else x
        return x.reshape((num,) + example_shape)

    return jax.jit(jax.vmap(one))


def closed_form_attack(updates: PyTree, example_shape: tuple[int, ...], *,
                       num_reconstructions: int = 1, relative_threshold: float = 1e-3,
                       duplicate_mse: float = 1e-4, clip: bool = True) -> Reconstruction:
    """Closed-form input recovery from the first dense layer, for many victims at once.

    Args:
      updates: ``[V, ...]`` observed deltas of models whose first layer is dense on the
        flattened input (``softmax``, ``mlp``).
      example_shape: shape of one example.
      num_reconstructions: ratios returned per victim (1 for a batch of one; the batch
        size for larger batches).
      relative_threshold: units with ``|db| < threshold * max |db|`` are ignored.
      duplicate_mse: near-duplicate ratios within this MSE are returned once.
      clip: clip the ratios to ``[0, 1]``.

    Returns:
      :class:`Reconstruction` with inputs ``[V, num_reconstructions, ...]``, labels ``-1``
      (this attack recovers no labels) and objective 0.
    """
    num = check_int("num_reconstructions", num_reconstructions, min_value=1)
    thr = check_float("relative_threshold", relative_threshold, min_value=0.0)
    dup = check_float("duplicate_mse", duplicate_mse, min_value=0.0)
    example_shape = tuple(int(s) for s in example_shape)
    x = _closed_form_fn(example_shape, num, thr, dup, bool(clip))(updates)
    v = x.shape[0]
    return Reconstruction(x, -jnp.ones((v, num), jnp.int32), jnp.zeros((v,), jnp.float32))


__all__ = ["closed_form_attack", "input_layer", "select_distinct", "unit_ratios"]
