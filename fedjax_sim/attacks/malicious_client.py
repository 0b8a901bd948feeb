"""Malicious client: install an imprint through model replacement, read the next round.

Threat model: one client of the cohort is malicious. It may send any update (no norm
bound: the server takes the plain, unclipped mean of the ``C`` updates, without robust
aggregation or DP noise), it receives every global model like any client, and it knows
the cohort size ``C``, the architecture and the bin edges it chose (from its own or public
data). It does *not* see other clients' updates: secure aggregation may well be on. It
does not know the honest clients' data or updates. Assumptions of the reference setting
(:func:`fedjax_sim.attacks.lab.run_malicious_client`): plain mean with uniform client
weights and server learning rate 1, no clipping, no norm-bound filtering, no noise; the
attacker is in the cohort of the install round and receives the next two global models;
honest clients run FedSGD (one full-batch step; their learning rate need not be known, the
read-off is a ratio); the global model is float64 (see "Precision").

Attack (two rounds):

1. Round ``t``: the attacker sends the boosted update ``C (theta* - theta_t)`` (model
   replacement, Bagdasaryan et al. 2020, "How To Backdoor Federated Learning"), so the
   mean of the round is ``theta* - theta_t`` plus ``1/C`` of the honest updates: the next
   global model is ``theta_{t+1} = theta* + (honest mean)``. ``theta*`` turns the MLP's
   first layer into an imprint layer ("Robbing the Fed", :mod:`fedjax_sim.attacks.imprint`):
   ``k`` units sharing one measurement direction with biases at its quantiles. The second
   layer keeps one unit alive, fed by every bin with a positive weight; the others are
   switched off by a negative bias larger than anything the bins can feed them. Then the
   gradient reaching bin ``i`` from an example is ``c_i * delta(x)``: one scalar per
   example times the (known) weight ``c_i`` from bin ``i`` to the live unit. The honest
   updates of round ``t`` perturb ``theta*`` slightly; the bins are steep enough that the
   perturbation moves their boundaries by a small fraction of a bin, and ``c_i`` is read
   from ``theta_{t+1}`` itself.
2. Round ``t+1``: honest clients train (FedSGD) on ``theta_{t+1}``; the attacker sends a
   zero update. ``theta_{t+2} - theta_{t+1}`` is the mean of the honest updates. Dividing
   bin ``i``'s first-layer update by ``c_i`` and differencing neighbouring bins reads off
   every example alone in its bin, exactly (as in the imprint attack, on the sum of all
   clients).

Precision: the imprint weights must be large next to the honest round-``t`` updates, and
one example's share of the round-``t+1`` mean is small next to them; a float32 global
model rounds that share away. The reference setting therefore keeps the global model and
the aggregate in float64 (``precision="float64"``, inside ``jax.enable_x64``); with
``"float32"`` the same attack recovers (almost) nothing, which the sweep reports.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim._validation import check_choice, check_float, check_int, fail
from fedjax_sim.attacks.imprint import read_off_bins
from fedjax_sim.attacks.updates import LocalTraining, dense_layers, simulate_update
from fedjax_sim.models import Model

PyTree = Any

PRECISIONS = ("float64", "float32")
DEAD_BIAS = -10.0


@dataclasses.dataclass(frozen=True)
class MaliciousClientConfig:
    """The attacker's settings and what it knows of the federation.

    Attributes:
      num_bins: ``k`` imprint bins (the first hidden layer needs at least ``k`` units).
      cohort_size: ``C`` clients per round, attacker included (known to the attacker).
      slope: steepness of the bins: first-layer pre-activation per bin width (large, so
        the honest updates of the install round barely move bin boundaries).
      live_gain: weight from each bin to the one live second-layer unit.
      precision: ``"float64"`` or ``"float32"`` global model and aggregation.
    """

    num_bins: int = 256
    cohort_size: int = 16
    slope: float = 4.0
    live_gain: float = 0.05
    precision: str = "float64"

    def __post_init__(self):
        check_int("num_bins", self.num_bins, min_value=2)
        check_int("cohort_size", self.cohort_size, min_value=2)
        check_float("slope", self.slope, min_value=0.0, min_exclusive=True)
        check_float("live_gain", self.live_gain, min_value=0.0, min_exclusive=True)
        check_choice("precision", self.precision, PRECISIONS)


def _mlp_layers(params: PyTree, input_dim: int, num_bins: int):
    layers = dense_layers(params)
    if len(layers) < 3:
        fail("model", f"<{len(layers)} dense layers>",
             "needs an MLP with at least two hidden layers (imprint + one live unit)")
    if layers[0][1].shape[0] != input_dim:
        fail("model", "<first layer>", f"must be dense on the flattened input (d={input_dim})")
    if layers[0][1].shape[1] < num_bins:
        fail("num_bins", num_bins, f"exceeds the first hidden layer's width "
                                   f"{layers[0][1].shape[1]}")
    return [name for name, _, _ in layers]


def imprint_target_params(params: PyTree, direction: np.ndarray, edges: np.ndarray,
                          config: MaliciousClientConfig) -> PyTree:
    """The model ``theta*`` the attacker wants the server to hold.

    Args:
      params: the current global params of an MLP (``Dense_0 .. Dense_L``).
      direction: ``[d]`` measurement direction.
      edges: ``[k + 1]`` increasing bin edges of the measurement.
      config: the attack settings.

    Returns:
      Params of the same structure and dtype: first layer = ``k`` bins (``slope`` per
      mean bin width; other units off), second layer = one live unit fed with
      ``live_gain`` by every bin (others off), third layer reads that unit into class 0
      with a weight that keeps logits of order one; deeper layers unchanged.
    """
    k = config.num_bins
    w = np.asarray(direction, np.float64).ravel()
    e = np.asarray(edges, np.float64).ravel()
    names = _mlp_layers(params, w.size, k)
    if e.shape != (k + 1,) or not np.all(np.diff(e) > 0):
        fail("edges", f"<shape {e.shape}>", f"must be {k + 1} strictly increasing values")
    out = jax.tree.map(lambda p: np.array(p, np.float64), params)
    first, second, third = (out[n] for n in names[:3])
    alpha = config.slope * k / (e[k - 1] - e[1])
    first["kernel"][:] = 0.0
    first["kernel"][:, :k] = alpha * w[:, None]
    first["bias"][:] = DEAD_BIAS * (1.0 + alpha * np.max(np.abs(e)))
    first["bias"][:k] = -alpha * e[:k]
    top = np.sum(np.maximum(alpha * (e[k] - e[:k]), 0.0))  # sum of bins at the top edge
    second["kernel"][:] = 0.0
    second["kernel"][:k, 0] = config.live_gain
    second["bias"][:] = -top
    second["bias"][0] = 0.0
    typical = config.live_gain * np.sum(np.maximum(alpha * (e[k // 2] - e[:k]), 0.0))
    third["kernel"][:] = 0.0
    third["kernel"][0, 0] = 1.0 / typical
    third["bias"][:] = 0.0
    dtype = jax.tree.leaves(params)[0].dtype
    return jax.tree.map(lambda p: jnp.asarray(p, dtype), out)


def replacement_update(global_params: PyTree, target_params: PyTree, cohort_size: int
                       ) -> PyTree:
    """Model replacement: ``C (theta* - theta_t)``, so that the plain mean lands near ``theta*``."""
    c = check_int("cohort_size", cohort_size, min_value=1)
    return jax.tree.map(lambda t, g: c * (t - g), target_params, global_params)


def read_off_next_round(before: PyTree, after: PyTree, config: MaliciousClientConfig,
                        example_shape: tuple[int, ...], *, relative_threshold: float = 1e-6
                        ) -> np.ndarray:
    """Reconstructions from two consecutive global models (host side, float64).

    Args:
      before: ``theta_{t+1}``, the model with the installed imprint.
      after: ``theta_{t+2}``, the model after the honest round.
      config: the attack settings.
      example_shape: shape of one example.
      relative_threshold: see :func:`fedjax_sim.attacks.imprint.read_off_bins`.

    Returns:
      ``[k, *example_shape]`` float64 reconstructions, NaN rows for empty bins.
    """
    k = config.num_bins
    d = math.prod(example_shape)
    names = _mlp_layers(before, d, k)
    b0, a0 = before[names[0]], after[names[0]]
    dk = np.asarray(a0["kernel"], np.float64)[:, :k] - np.asarray(b0["kernel"], np.float64)[:, :k]
    db = np.asarray(a0["bias"], np.float64)[:k] - np.asarray(b0["bias"], np.float64)[:k]
    gain = np.asarray(before[names[1]]["kernel"], np.float64)[:k, 0]
    with jax.enable_x64(True):
        x, _ = read_off_bins(jnp.asarray(dk / gain[None, :]), jnp.asarray(db / gain), "dense",
                             relative_threshold=relative_threshold)
        x = np.asarray(x, np.float64)
    return x.reshape((k,) + tuple(example_shape))


def fedsgd_round(model: Model, params: PyTree, x: jax.Array, y: jax.Array,
                 local: LocalTraining, extra_update: PyTree, cohort_size: int) -> PyTree:
    """One plain-mean round: honest clients' deltas plus one more client's, over ``C``.

    Args:
      model: the federation's model.
      params: the global params of the round.
      x: ``[H, B, ...]`` the honest clients' examples.
      y: ``[H, B]`` their labels.
      local: the honest clients' local training (FedSGD: one full-batch step).
      extra_update: the remaining client's delta (the attacker's).
      cohort_size: ``C`` (the mean divides by it).

    Returns:
      The next global params.
    """
    soft = jax.nn.one_hot(y, model.num_classes, dtype=x.dtype)
    deltas = jax.vmap(lambda xc, yc: simulate_update(model, params, xc, yc, local))(x, soft)
    total = jax.tree.map(lambda d, e: jnp.sum(d, axis=0) + e, deltas, extra_update)
    return jax.tree.map(lambda p, t: p + t / cohort_size, params, total)


class MaliciousClientResult(NamedTuple):
    """Outcome of :func:`malicious_client_attack`.

    Attributes:
      reconstructions: ``[k, *example_shape]`` float64 (NaN rows: empty bins).
      installed: ``theta_{t+1}`` (NumPy float64 leaves).
      next_model: ``theta_{t+2}``.
      install_error: max abs difference between ``theta_{t+1}`` and the target on the
        first layer, relative to the target's max abs weight.
    """

    reconstructions: np.ndarray
    installed: PyTree
    next_model: PyTree
    install_error: float


def malicious_client_attack(model: Model, global_params: PyTree, install_x: Any,
                            install_y: Any, victim_x: Any, victim_y: Any,
                            direction: np.ndarray, edges: np.ndarray,
                            config: MaliciousClientConfig, local: LocalTraining
                            ) -> MaliciousClientResult:
    """Simulates the two rounds and the attacker's read-off.

    Args:
      model: an MLP with at least two hidden layers, the first ``>= num_bins`` wide.
      global_params: ``theta_t``.
      install_x: ``[C - 1, B, ...]`` honest clients' examples in the install round.
      install_y: ``[C - 1, B]`` their labels.
      victim_x: ``[C - 1, B, ...]`` honest clients' examples in the next round (victims).
      victim_y: ``[C - 1, B]`` their labels.
      direction: ``[d]`` the measurement direction.
      edges: ``[k + 1]`` the bin edges (from the attacker's auxiliary data).
      config: the attack settings.
      local: honest local training (FedSGD: ``LocalTraining(lr)``).

    Returns:
      :class:`MaliciousClientResult`.
    """
    c = config.cohort_size
    for field, arr in (("install_x", install_x), ("victim_x", victim_x)):
        if np.shape(arr)[0] != c - 1:
            fail(f"{field}.shape", np.shape(arr), f"must hold cohort_size - 1 = {c - 1} "
                                                  "honest clients")
    wide = config.precision == "float64"
    dtype = np.float64 if wide else np.float32
    with jax.enable_x64(wide):
        cast = lambda a: jnp.asarray(np.asarray(a, dtype))  # noqa: E731
        theta = jax.tree.map(cast, global_params)
        target = imprint_target_params(theta, direction, edges, config)
        boosted = replacement_update(theta, target, c)
        step = jax.jit(fedsgd_round, static_argnums=(0, 4, 6))
        installed = step(model, theta, cast(install_x), jnp.asarray(install_y), local,
                         boosted, c)
        zero = jax.tree.map(jnp.zeros_like, theta)
        after = step(model, installed, cast(victim_x), jnp.asarray(victim_y), local, zero, c)
        to_host = lambda t: jax.tree.map(lambda a: np.asarray(a, np.float64), t)  # noqa: E731
        installed, after, target = to_host(installed), to_host(after), to_host(target)
    first = _mlp_layers(target, int(np.asarray(direction).size), config.num_bins)[0]
    err = float(np.max(np.abs(installed[first]["kernel"] - target[first]["kernel"])) /
                np.max(np.abs(target[first]["kernel"])))
    recon = read_off_next_round(installed, after, config, tuple(model.example_shape))
    return MaliciousClientResult(recon, installed, after, err)


__all__ = ["MaliciousClientConfig", "MaliciousClientResult", "PRECISIONS", "fedsgd_round",
           "imprint_target_params", "malicious_client_attack", "read_off_next_round",
           "replacement_update"]
