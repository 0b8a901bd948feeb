"""Label recovery from the output layer's bias update (iDLG and a count estimate for batches).

Threat model: an honest-but-curious server. It sees one client's model update (or the
sum over a cohort under secure aggregation), knows the model, the global params it sent,
the local learning rate and the number of local steps, and may hold a little public
(auxiliary) data from the same domain. It does not modify anything.

With softmax cross-entropy the gradient of the loss of one example with respect to the
output bias is ``p - onehot(y)``: every entry is positive except the true label's
(Zhao, Mopuri, Bilen 2020, "iDLG: Improved Deep Leakage from Gradients"). An SGD delta is
minus a sum of such gradients, so for a batch of one the true label is the single
*positive* entry of the bias delta, after any number of local steps.

For a batch of ``B`` examples the average bias gradient is ``mean_i p_i - n / B`` with
``n`` the label counts, so ``n_c = B (p_bar_c - g_c)``, where ``p_bar`` (the mean predicted
probability) is estimated by running the model on auxiliary inputs and ``g`` is the average
per-step gradient ``-delta_b / (lr * steps)`` (exact for FedSGD; for several local steps
the model drifts and ``p_bar`` is an approximation). This is the estimator of Geng et al.
2021 ("Towards General Deep Leakage in Federated Learning") and of Wainakh et al. 2022
("User-Level Label Leakage from Gradients in Federated Learning"), rounded to integer
counts that sum to ``B`` (largest remainders).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from fedjax_sim.attacks.updates import dense_layers
from fedjax_sim.models import Model

PyTree = Any


def output_bias(update: PyTree) -> jax.Array:
    """The update of the last dense layer's bias (``[..., num_classes]``)."""
    layers = dense_layers(update)
    if not layers:
        raise ValueError("output_bias: the params have no flax Dense layer")
    return layers[-1][2]


def idlg_label(update: PyTree) -> jax.Array:
    """iDLG: the label of a batch-of-one update, the argmax of the output-bias delta.

    Args:
      update: one client's delta (new params minus old; SGD, any number of steps).

    Returns:
      int32 scalar label.
    """
    return jnp.argmax(output_bias(update)).astype(jnp.int32)


def mean_probabilities(model: Model, params: PyTree, probe_x: jax.Array) -> jax.Array:
    """``[num_classes]`` mean softmax output of the model over auxiliary inputs."""
    return jnp.mean(jax.nn.softmax(model.apply(params, probe_x), axis=-1), axis=0)


def round_counts(real_counts: jax.Array, total: int) -> jax.Array:
    """Non-negative integer counts summing to ``total`` closest to ``real_counts``.

    Clips at 0, rescales to sum ``total``, floors, and hands the remainder to the largest
    fractional parts (Hamilton's method).
    """
    c = jnp.maximum(real_counts, 0.0)
    c = c * total / jnp.maximum(jnp.sum(c), 1e-12)
    base = jnp.floor(c)
    remainder = total - jnp.sum(base)
    order = jnp.argsort(-(c - base))
    rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0]))
    return (base + (rank.astype(c.dtype) < remainder).astype(base.dtype)).astype(jnp.int32)


def estimate_label_counts(update: PyTree, mean_probs: jax.Array, *, batch_size: int,
                          learning_rate: float, num_steps: int) -> jax.Array:
    """Label counts of a batch from the output-bias delta, ``n = B (p_bar - g)``.

    Args:
      update: one client's delta (or a sum of deltas: then ``batch_size`` is the total).
      mean_probs: ``[num_classes]`` estimated mean predicted probability (see
        :func:`mean_probabilities`).
      batch_size: number of examples ``B`` behind the update.
      learning_rate: the local learning rate.
      num_steps: local SGD steps per client.

    Returns:
      ``[num_classes]`` int32 counts summing to ``batch_size``.
    """
    g = -output_bias(update) / (learning_rate * num_steps)
    return round_counts(batch_size * (mean_probs - g), batch_size)


def labels_from_counts(counts: jax.Array, total: int) -> jax.Array:
    """``[total]`` labels, class ``c`` repeated ``counts[c]`` times (sorted)."""
    return jnp.repeat(jnp.arange(counts.shape[0], dtype=jnp.int32), counts,
                      total_repeat_length=total)


def recover_labels(model: Model, params: PyTree, updates: PyTree, probe_x: jax.Array, *,
                   batch_size: int, learning_rate: float, num_steps: int) -> jax.Array:
    """Labels of many victims at once: iDLG for batch 1, the count estimate otherwise.

    Args:
      model: the victims' model.
      params: the global params they received.
      updates: ``[V, ...]`` observed deltas.
      probe_x: auxiliary inputs for the mean-probability estimate.
      batch_size: examples per victim.
      learning_rate: local learning rate.
      num_steps: local steps per victim.

    Returns:
      ``[V, batch_size]`` int32 labels (sorted by class within a victim).
    """
    if batch_size == 1:
        return _idlg_fn()(updates)
    probs = mean_probabilities(model, params, probe_x)
    return _count_fn(batch_size, float(learning_rate), int(num_steps))(updates, probs)


@functools.lru_cache(maxsize=1)
def _idlg_fn():
    return jax.jit(jax.vmap(lambda u: idlg_label(u)[None]))


@functools.lru_cache(maxsize=32)
def _count_fn(batch_size: int, learning_rate: float, num_steps: int):
    def one(update, probs):
        counts = estimate_label_counts(update, probs, batch_size=batch_size,
                                       learning_rate=learning_rate, num_steps=num_steps)
        return labels_from_counts(counts, batch_size)

    return jax.jit(jax.vmap(one, in_axes=(0, None)))


__all__ = ["estimate_label_counts", "idlg_label", "labels_from_counts", "mean_probabilities",
           "output_bias", "recover_labels", "round_counts"]
