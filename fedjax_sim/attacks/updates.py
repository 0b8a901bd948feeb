"""What an attacker observes: victims' updates, their differentiable simulation, defences.

Victims train with the engine's own one-client update
(:func:`fedjax_sim.client_update.make_local_update`, local SGD), vmapped over victims, so
the lab attacks exactly what the simulator's clients send. An optimisation attack needs
the victim's local training as a *differentiable* function of guessed data; that is
:func:`simulate_update`: the same local SGD (mean loss per mini-batch, ``local_epochs``
passes, plain SGD) with soft labels and a fixed example order. The attacker's dummy
examples are free variables, so a fixed order loses nothing in the first epoch; with
several epochs the victim reshuffles with a key the attacker does not know, and the
simulation is an approximation (as in Geiping et al. 2020, who assume the order known).

Defences act on what the attacker sees (:func:`observed_updates`): per-client L2 clipping
and Gaussian noise added on the client before upload (what protects individual updates
from an honest-but-curious server; clipping is ``fedjax_sim.server.clipping.clip_cohort``,
the noise is i.i.d. Gaussian on every coordinate as in ``fedjax_sim.server.noise``, drawn
in one call for speed), and secure aggregation, under which the attacker sees only the
cohort's sum (with central DP, one noise draw on that sum).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from fedjax_sim._validation import check_float, check_int, fail
from fedjax_sim.client_update import ClientConfig, make_local_update
from fedjax_sim.data.federated import ClientData
from fedjax_sim.models import Model
from fedjax_sim.server.base import CohortUpdates, zero_masked
from fedjax_sim.server.clipping import clip_cohort

PyTree = Any


@dataclasses.dataclass(frozen=True)
class LocalTraining:
    """The victim's local training, known to the attacker.

    Attributes:
      learning_rate: local SGD learning rate (> 0).
      local_epochs: passes over the client's examples (>= 1).
      batch_size: examples per local step; None = the whole client batch (one step per
        epoch: FedSGD when ``local_epochs == 1``).
    """

    learning_rate: float = 0.1
    local_epochs: int = 1
    batch_size: int | None = None

    def __post_init__(self):
        check_float("learning_rate", self.learning_rate, min_value=0.0, min_exclusive=True)
        check_int("local_epochs", self.local_epochs, min_value=1)
        if self.batch_size is not None:
            check_int("batch_size", self.batch_size, min_value=1)

    def steps(self, num_examples: int) -> int:
        """Number of local SGD steps on ``num_examples`` examples."""
        batch = num_examples if self.batch_size is None else min(self.batch_size, num_examples)
        return self.local_epochs * math.ceil(num_examples / batch)

    def client_config(self) -> ClientConfig:
        """The engine's ClientConfig for this local training (plain SGD)."""
        return ClientConfig(optax.sgd(self.learning_rate), local_epochs=self.local_epochs,
                            batch_size=self.batch_size)


def soft_cross_entropy(logits: jax.Array, soft_labels: jax.Array) -> jax.Array:
    """Cross-entropy with probability-vector labels, one value per example."""
    return -jnp.sum(soft_labels * jax.nn.log_softmax(logits, axis=-1), axis=-1)


def simulate_update(model: Model, params: PyTree, x: jax.Array, soft_labels: jax.Array,
                    local: LocalTraining, mask: jax.Array | None = None) -> PyTree:
    """The victim's model delta for examples ``x``, differentiable in ``x`` and the labels.

    Local SGD over ``x`` in its given order: ``local_epochs`` passes of mini-batches of
    ``local.batch_size`` (the last one may be partial; its loss is the mean over its real
    examples), exactly like the engine's client update with that order.

    Args:
      model: the victim's model.
      params: the global params the victim received.
      x: ``[B, *example_shape]`` inputs.
      soft_labels: ``[B, num_classes]`` label distributions (one-hot for hard labels).
      local: the local training.
      mask: ``[B]`` bool, the real examples, which come first (a client padded to ``B``
        slots, as the engine packs it: its real examples first); None = all real. Steps
        that see no real example change nothing, as in the engine.

    Returns:
      The delta pytree (params after local training minus ``params``).
    """
    num = x.shape[0]
    batch = num if local.batch_size is None else min(local.batch_size, num)
    steps = math.ceil(num / batch)
    pad = steps * batch - num
    real = jnp.ones((num,), bool) if mask is None else jnp.asarray(mask, bool)
    xb = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1)).reshape((steps, batch) + x.shape[1:])
    yb = jnp.pad(soft_labels, ((0, pad), (0, 0))).reshape(steps, batch, -1)
    mb = jnp.pad(real, (0, pad)).reshape(steps, batch).astype(x.dtype)

    def batch_loss(p, xs, ys, ms):
        losses = soft_cross_entropy(model.apply(p, xs), ys)
        return jnp.sum(losses * ms) / jnp.maximum(jnp.sum(ms), 1.0)

    def step(p, inputs):
        g = jax.grad(batch_loss)(p, *inputs)
        return jax.tree.map(lambda a, b: a - local.learning_rate * b, p, g), None

    final = params
    for _ in range(local.local_epochs):
        if steps == 1:  # FedSGD: no scan (smaller program, faster to compile)
            final, _ = step(final, (xb[0], yb[0], mb[0]))
        else:
            final, _ = jax.lax.scan(step, final, (xb, yb, mb))
    return jax.tree.map(lambda a, b: a - b, final, params)


def victim_updates(model: Model, params: PyTree, x: jax.Array, y: jax.Array,
                   local: LocalTraining, *, key: jax.Array) -> PyTree:
    """Every victim's true update, computed by the engine's client update (vmapped).

    Args:
      model: the model the victims train.
      params: global params sent to every victim.
      x: ``[V, B, *example_shape]`` the victims' examples.
      y: ``[V, B]`` integer labels.
      local: local training.
      key: PRNG key; victim v trains with ``fold_in(key, v)`` (its shuffling order).

    Returns:
      The deltas, every leaf with a leading victim axis ``[V, ...]``.
    """
    num_victims, batch = y.shape
    return _victim_updates_fn(model, local, batch)(params, x, y, key)


@functools.lru_cache(maxsize=32)
def _victim_updates_fn(model: Model, local: LocalTraining, batch: int):
    local_update = make_local_update(model, local.client_config())

    def run(params, x, y, key):
        def one(xv, yv, v):
            data = ClientData(x=xv, y=yv, mask=jnp.ones((batch,), bool),
                              client_id=v.astype(jnp.int32))
            return local_update(params, data, jax.random.fold_in(key, v)).delta
        return jax.vmap(one)(x, y, jnp.arange(y.shape[0]))

    return jax.jit(run)


def observed_updates(updates: PyTree, *, clip_norm: float | None = None,
                     noise_multiplier: float = 0.0, secure_aggregation: bool = False,
                     key: jax.Array | None = None) -> PyTree:
    """What the attacker sees of the victims' updates under the chosen defences.

    Without secure aggregation, each client clips its update to L2 norm ``clip_norm`` and
    adds ``N(0, (noise_multiplier * clip_norm)^2)`` per coordinate before upload (local
    noise). With secure aggregation the attacker sees only the sum over the cohort; the
    noise (central DP, ``noise_multiplier * clip_norm``) is drawn once on that sum.

    Args:
      updates: ``[V, ...]`` per-client deltas.
      clip_norm: per-client L2 bound; None = no clipping (then noise is not allowed).
      noise_multiplier: noise std in units of ``clip_norm`` (0 = no noise).
      secure_aggregation: whether the attacker sees only the sum.
      key: PRNG key for the noise (required when ``noise_multiplier > 0``).

    Returns:
      ``[V, ...]`` observed updates, or a ``[1, ...]`` sum under secure aggregation (a
      single "victim" holding the whole cohort's examples).
    """
    z = check_float("noise_multiplier", noise_multiplier, min_value=0.0)
    if clip_norm is not None:
        clip_norm = check_float("clip_norm", clip_norm, min_value=0.0, min_exclusive=True)
    if z > 0 and clip_norm is None:
        fail("clip_norm", None, "noise_multiplier > 0 needs a clip norm (noise is z * S)")
    if z > 0 and key is None:
        fail("key", None, "a PRNG key is required when noise_multiplier > 0")
    if key is None:
        key = jax.random.key(0)  # unused: no noise
    fn = _observe_fn(clip_norm is not None, z > 0, bool(secure_aggregation))
    return fn(updates, key, jnp.float32(clip_norm or 0.0), jnp.float32(z * (clip_norm or 0.0)))


@functools.lru_cache(maxsize=8)
def _observe_fn(clip: bool, noise: bool, secure_aggregation: bool):
    """The jitted observation; the clip norm and noise std are traced (no recompiles)."""

    def observe(updates, key, clip_norm, noise_std):
        num = jax.tree.leaves(updates)[0].shape[0]
        if clip:
            cohort = CohortUpdates(updates, jnp.ones((num,), jnp.float32),
                                   jnp.ones((num,), bool))
            updates = clip_cohort(zero_masked(cohort), clip_norm).updates
        if secure_aggregation:
            updates = jax.tree.map(lambda u: jnp.sum(u, axis=0, keepdims=True), updates)
            num = 1
        if noise:  # i.i.d. N(0, std^2) on every coordinate of every client's update
            flat, unravel = ravel_pytree(updates)
            updates = unravel(flat + noise_std * jax.random.normal(key, flat.shape, flat.dtype))
        return updates

    return jax.jit(observe)


def dense_layers(params: PyTree) -> list[tuple[str, jax.Array, jax.Array]]:
    """The ``(name, kernel, bias)`` of every flax Dense layer, in network order.

    Flax names dense layers ``Dense_0, Dense_1, ...`` in call order; they are sorted by that
    index (not alphabetically, which would put ``Dense_10`` before ``Dense_2``).

    Args:
      params: a flax params dict (possibly with a leading victim axis on every leaf).

    Returns:
      A list of ``(name, kernel, bias)``.
    """
    names = [k for k, v in params.items() if isinstance(v, dict) and "kernel" in v
             and "bias" in v and k.startswith("Dense_")]
    names.sort(key=lambda k: int(k.split("_")[-1]))
    return [(k, params[k]["kernel"], params[k]["bias"]) for k in names]


__all__ = ["LocalTraining", "dense_layers", "observed_updates", "simulate_update",
           "soft_cross_entropy", "victim_updates"]
