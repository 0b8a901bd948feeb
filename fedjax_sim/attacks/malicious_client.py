"""Malicious client: install an imprint through model replacement, read the next round.

Threat model: one client of the cohort is malicious. It may send any update, it receives
every global model like any client, and it knows the cohort size ``C``, the server's
learning rate, the architecture and the bin edges it chose (from its own or public data).
It does *not* see other clients' updates: secure aggregation may well be on. It does not
know the honest clients' data or updates. The reference setting
(:func:`fedjax_sim.attacks.lab.run_malicious_client`): the server takes the plain mean of
the ``C`` uploads (uniform weights) with no defence; the attacker is in the cohort of the
install round and receives the next two global models; honest clients run FedSGD (one
full-batch step; their learning rate need not be known, the read-off is a ratio); the
global model is float64 (see "Precision"). Both rounds are rounds of the simulator
(:func:`fedjax_sim.make_round`, FedSGD from :func:`fedjax_sim.make_algorithm`); the
attacker is a client-program wrapper
(:func:`fedjax_sim.poisoning.attacks.adversarial_client`) and the server's defences are
stages of the round's chain (:func:`server_chain`):

* ``norm_bound``: the server drops uploads above an L2 norm
  (:func:`~fedjax_sim.server.clipping.zero_above_norm`; Sun et al. 2019): the boosted
  update is dropped, nothing is installed;
* ``clip_norm``: every upload is clipped (:func:`~fedjax_sim.server.clipping.
  clip_per_client`): the boosted update shrinks and only installs if the clip norm
  exceeds its norm;
* ``noise_multiplier``: DP-FedAvg (McMahan et al. 2018): clip, sum, Gaussian noise
  ``N(0, (z S)^2)``, divide by ``C`` (as ``experiment/server.py`` assembles it).

Attack (two rounds):

1. Round ``t``: the attacker sends the boosted update ``C (theta* - theta_t) / eta``
   (model replacement, Bagdasaryan et al. 2020, "How To Backdoor Federated Learning";
   ``eta`` the server learning rate), so the round's step is ``theta* - theta_t`` plus
   ``eta / C`` of the honest updates: the next global model is ``theta_{t+1} = theta* +
   (honest step)``. ``theta*`` turns the MLP's first layer into an imprint layer
   ("Robbing the Fed", :mod:`fedjax_sim.attacks.imprint`): ``k`` units sharing one
   measurement direction with biases at its quantiles. The second layer keeps one unit
   alive, fed by every bin with a positive weight; the others are switched off by a
   negative bias larger than anything the bins can feed them. Then the gradient reaching
   bin ``i`` from an example is ``c_i * delta(x)``: one scalar per example times the
   (known) weight ``c_i`` from bin ``i`` to the live unit. The honest updates of round
   ``t`` perturb ``theta*`` slightly; the bins are steep enough that the perturbation
   moves their boundaries by a small fraction of a bin, and ``c_i`` is read from
   ``theta_{t+1}`` itself.
2. Round ``t+1``: honest clients train (FedSGD) on ``theta_{t+1}``; the attacker, seeing
   its imprint installed (:func:`install_error` within :data:`INSTALL_TOLERANCE`), sends
   a zero update. ``theta_{t+2} - theta_{t+1}`` is the mean of the honest updates.
   Dividing bin ``i``'s first-layer update by ``c_i`` and differencing neighbouring bins
   reads off every example alone in its bin, exactly (as in the imprint attack, on the
   sum of all clients). When ``theta_{t+1}`` does not hold the imprint (a defence
   stopped it), :func:`read_off_next_round` says so and recovers nothing.

Precision: the imprint weights must be large next to the honest round-``t`` updates, and
one example's share of the round-``t+1`` mean is small next to them; a float32 global
model rounds that share away. The reference setting therefore keeps the global model and
the aggregate in float64 (``precision="float64"``, inside ``jax.enable_x64``); with
``"float32"`` the same attack recovers (almost) nothing, which the sweep reports. The
simulator is written for float32 with int32 ids; under x64 its index arithmetic meets
int64 ranges, so the float64 rounds run with JAX's standard dtype promotion (int32 with
int64 gives int64, float32 weights with float64 updates give float64), in this module only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim._validation import check_choice, check_float, check_int, fail
from fedjax_sim.algorithms import ClientProgram, make_algorithm
from fedjax_sim.attacks.imprint import read_off_bins
from fedjax_sim.attacks.updates import LocalTraining, dense_layers
from fedjax_sim.data.federated import make_federated_data
from fedjax_sim.models import Model
from fedjax_sim.poisoning.attacks import adversarial_client
from fedjax_sim.rounds import make_round
from fedjax_sim.sampling import FixedSizeSampler
from fedjax_sim.server.base import Chain, chain
from fedjax_sim.server.clipping import check_key, clip_per_client, zero_above_norm
from fedjax_sim.server.noise import GaussianNoiseState, dp_mean_normalize, gaussian_noise
from fedjax_sim.server.reducers import sum_updates, weighted_mean

PyTree = Any

PRECISIONS = ("float64", "float32")
DEAD_BIAS = -10.0
INSTALL_TOLERANCE = 0.1
"""The attacker deems its imprint installed when :func:`install_error` is at most this."""


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


def replacement_update(global_params: PyTree, target_params: PyTree, cohort_size: int,
                       server_lr: float = 1.0) -> PyTree:
    """Model replacement: ``C (theta* - theta_t) / eta``, so that the server's step on the
    plain mean lands near ``theta*``."""
    c = check_int("cohort_size", cohort_size, min_value=1)
    eta = check_float("server_lr", server_lr, min_value=0.0, min_exclusive=True)
    return jax.tree.map(lambda t, g: (c / eta) * (t - g), target_params, global_params)


def install_error(params: PyTree, target: PyTree, num_bins: int) -> Any:
    """How far ``params`` are from the imprint ``target``: the larger of the first layer's
    and the live gains' max abs difference, each relative to the target's max abs value.

    Pure: the attacker evaluates it (jnp, traced) on the model it receives, the read-off
    on the host (NumPy, when every leaf is a NumPy array). Around 1 when nothing was
    installed, small when the imprint holds.
    """
    leaves = jax.tree.leaves((params, target))
    xp = np if all(isinstance(a, np.ndarray) for a in leaves) else jnp
    layers, goal = dense_layers(params), dense_layers(target)

    def rel(a, b):
        return xp.max(xp.abs(a - b)) / xp.max(xp.abs(b))

    first = rel(layers[0][1], goal[0][1])
    gains = rel(layers[1][1][:num_bins, 0], goal[1][1][:num_bins, 0])
    return xp.maximum(first, gains)


class ReadOff(NamedTuple):
    """What the attacker reads off two consecutive global models.

    Attributes:
      reconstructions: ``[k, *example_shape]`` float64 (NaN rows: empty bins) when the
        imprint was installed; ``[0, *example_shape]`` when it was not (nothing read).
      installed: ``theta_{t+1}`` holds the imprint (:func:`install_error` at most
        :data:`INSTALL_TOLERANCE`).
      install_error: :func:`install_error` of ``theta_{t+1}``.
    """

    reconstructions: np.ndarray
    installed: bool
    install_error: float


def read_off_next_round(before: PyTree, after: PyTree, config: MaliciousClientConfig,
                        example_shape: tuple[int, ...], *, target: PyTree,
                        relative_threshold: float = 1e-6) -> ReadOff:
    """Reconstructions from two consecutive global models (host side, float64).

    Args:
      before: ``theta_{t+1}``, the model that should hold the imprint.
      after: ``theta_{t+2}``, the model after the honest round.
      config: the attack settings.
      example_shape: shape of one example.
      target: ``theta*``, the imprint the attacker tried to install.
      relative_threshold: see :func:`fedjax_sim.attacks.imprint.read_off_bins`.

    Returns:
      :class:`ReadOff`; when the imprint is not installed (a defence stopped it) no row is
      read and nothing divides by a gain that is not there: no inf, no NaN, no warning.
    """
    k = config.num_bins
    d = math.prod(example_shape)
    names = _mlp_layers(before, d, k)
    to64 = lambda t: jax.tree.map(lambda a: np.asarray(a, np.float64), t)  # noqa: E731
    before, after, target = to64(before), to64(after), to64(target)
    error = float(install_error(before, target, k))
    if not error <= INSTALL_TOLERANCE:  # also catches NaN
        return ReadOff(np.zeros((0,) + tuple(example_shape)), False, error)
    b0, a0 = before[names[0]], after[names[0]]
    dk = a0["kernel"][:, :k] - b0["kernel"][:, :k]
    db = a0["bias"][:k] - b0["bias"][:k]
    gain = before[names[1]]["kernel"][:k, 0]
    with jax.enable_x64(True):
        x, _ = read_off_bins(jnp.asarray(dk / gain[None, :]), jnp.asarray(db / gain), "dense",
                             relative_threshold=relative_threshold)
        x = np.asarray(x, np.float64)
    return ReadOff(x.reshape((k,) + tuple(example_shape)), True, error)


def server_chain(cohort_size: int, *, clip_norm: float | None = None,
                 norm_bound: float | None = None, noise_multiplier: float = 0.0,
                 key: jax.Array) -> Chain:
    """The server's aggregation, as the simulator's chain, left to right::

        [zero_above_norm(norm_bound)] -> [clip_per_client(S)] -> mean over the survivors
        (with noise: -> sum -> gaussian_noise(z, S) -> / C, DP-FedAvg)

    Args:
      cohort_size: ``C`` (DP-FedAvg's fixed denominator).
      clip_norm: ``S``, per-client L2 clip norm (None: none).
      norm_bound: drop uploads with a larger L2 norm (None: none).
      noise_multiplier: ``z``; > 0 needs ``clip_norm`` (the noise std is ``z S``).
      key: PRNG key of the noise.

    Returns:
      A complete :class:`~fedjax_sim.server.Chain`.
    """
    z = check_float("noise_multiplier", noise_multiplier, min_value=0.0)
    if z > 0 and clip_norm is None:
        fail("noise_multiplier", z, "DP-FedAvg's noise needs clip_norm > 0 (its std is "
             "noise_multiplier * clip_norm)")
    stages = [] if norm_bound is None else [zero_above_norm(norm_bound)]
    if clip_norm is not None:
        stages.append(clip_per_client(clip_norm))
    if z > 0:
        return chain(*stages, sum_updates(), gaussian_noise(z, clip_norm, key=key),
                     dp_mean_normalize(cohort_size))
    return chain(*stages, weighted_mean())


def replacement_client(program: ClientProgram, attacker_id: int, target: PyTree,
                       config: MaliciousClientConfig, server_lr: float) -> ClientProgram:
    """``program`` where client ``attacker_id`` sends the model-replacement update.

    The attacker builds ``theta*`` from the model it receives (``target``'s first three
    layers, the message's deeper ones) and sends :func:`replacement_update` until it sees
    its imprint installed (:func:`install_error` at most :data:`INSTALL_TOLERANCE`),
    then zeros. Every other client runs ``program`` unchanged.
    """
    names = [name for name, _, _ in dense_layers(target)][:3]

    def attack(honest_update, message, data, key, state=()):
        out = honest_update(message, data, key, state)
        goal = {**message, **{n: target[n] for n in names}}
        boosted = replacement_update(message, goal, config.cohort_size, server_lr)
        quiet = install_error(message, goal, config.num_bins) <= INSTALL_TOLERANCE
        upload = jax.tree.map(lambda u: jnp.where(quiet, jnp.zeros_like(u), u), boosted)
        return out._replace(upload=upload)

    return adversarial_client(program, attack, lambda client_id: client_id == attacker_id)


class MaliciousClientResult(NamedTuple):
    """Outcome of :func:`malicious_client_attack`.

    Attributes:
      reconstructions: :attr:`ReadOff.reconstructions`.
      installed: the imprint was installed (else nothing was read off).
      install_error: :func:`install_error` of ``theta_{t+1}``.
      installed_model: ``theta_{t+1}`` (NumPy float64 leaves).
      next_model: ``theta_{t+2}``.
    """

    reconstructions: np.ndarray
    installed: bool
    install_error: float
    installed_model: PyTree
    next_model: PyTree


def _population(x: Any, y: Any, dtype: Any, num_classes: int):
    x = np.asarray(x, dtype)
    counts = np.full((x.shape[0],), x.shape[1], np.int32)
    return make_federated_data(x, np.asarray(y, np.int32), counts, num_classes=num_classes)


def _precision(config: MaliciousClientConfig):
    """The global model's dtype and the context its rounds run in (module docstring)."""
    if config.precision == "float64":
        return np.float64, lambda: _stacked(jax.enable_x64(True),
                                            jax.numpy_dtype_promotion("standard"))
    return np.float32, lambda: _stacked(jax.enable_x64(False))


@contextlib.contextmanager
def _stacked(*contexts):
    with contextlib.ExitStack() as stack:
        for c in contexts:
            stack.enter_context(c)
        yield


def malicious_client_rounds(model: Model, global_params: PyTree, direction: np.ndarray,
                            edges: np.ndarray, config: MaliciousClientConfig,
                            local: LocalTraining, *, clip_norm: float | None = None,
                            norm_bound: float | None = None, noise_multiplier: float = 0.0
                            ) -> Callable[..., MaliciousClientResult]:
    """The attack's two rounds of the simulator, built (and compiled) once for many trials.

    The population of each round is the ``C - 1`` honest clients (ids ``0 .. C-2``) and
    the attacker (id ``C - 1``, with its own examples); the cohort is all of them. The
    round is FedSGD (:func:`fedjax_sim.make_algorithm`) with uniform client weights, the
    attacker's client program is :func:`replacement_client`, the server's chain is
    :func:`server_chain`.

    Args:
      model: an MLP with at least two hidden layers, the first ``>= num_bins`` wide.
      global_params: ``theta_t``.
      direction: ``[d]`` the measurement direction.
      edges: ``[k + 1]`` the bin edges (from the attacker's auxiliary data).
      config: the attack settings.
      local: honest local training: FedSGD (``LocalTraining(lr)``); ``lr`` is the FedSGD
        round's (server) learning rate.
      clip_norm, norm_bound, noise_multiplier: the server's defences (:func:`server_chain`).

    Returns:
      ``run(install_x, install_y, victim_x, victim_y, *, attacker_x, attacker_y, key)``:
      honest clients' examples ``[C - 1, B, ...]`` and labels ``[C - 1, B]`` in the
      install round and in the next round (the victims), the attacker's own ``[B', ...]``
      examples and labels (``B' >= B``; it trains on none of them), and the PRNG key of
      the two rounds (sampling order, the server's noise). Returns a
      :class:`MaliciousClientResult`.
    """
    c = config.cohort_size
    if local.local_epochs != 1 or local.batch_size is not None:
        fail("local", local, "honest clients run FedSGD (one full-batch step)")
    dtype, precision = _precision(config)
    with precision():
        theta = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, dtype)), global_params)
        target = imprint_target_params(theta, direction, edges, config)
        stages = server_chain(c, clip_norm=clip_norm, norm_bound=norm_bound,
                              noise_multiplier=noise_multiplier, key=jax.random.key(0))
        honest = make_algorithm("fedsgd", model, server_lr=local.learning_rate,
                                weighting="uniform", aggregator=stages)
        algorithm = dataclasses.replace(honest, client=replacement_client(
            honest.client, c - 1, target, config, local.learning_rate))
        fr = make_round(algorithm, FixedSizeSampler(c, c))

    def run(install_x, install_y, victim_x, victim_y, *, attacker_x, attacker_y,
            key) -> MaliciousClientResult:
        for field, arr in (("install_x", install_x), ("victim_x", victim_x)):
            if np.shape(arr)[0] != c - 1:
                fail(f"{field}.shape", np.shape(arr), f"must hold cohort_size - 1 = {c - 1} "
                                                      "honest clients")
        key = check_key("key", key)
        b = np.shape(install_x)[1]
        if len(attacker_x) < b:
            fail("attacker_x", f"<{len(attacker_x)} examples>", f"needs at least {b}")
        own_x, own_y = np.asarray(attacker_x, dtype)[None, :b], np.asarray(attacker_y)[None, :b]
        with precision():
            state = fr.init(key, theta)
            # The server's noise is keyed by this run's key (the chain was built once).
            state = state.replace(aggregator=tuple(
                GaussianNoiseState(jax.random.fold_in(key, 2))
                if isinstance(s, GaussianNoiseState) else s for s in state.aggregator))
            models = []
            for r, (x, y) in enumerate(((install_x, install_y), (victim_x, victim_y))):
                data = _population(np.concatenate([np.asarray(x, dtype), own_x]),
                                   np.concatenate([np.asarray(y), own_y]), dtype,
                                   model.num_classes)
                state, _ = fr.step(state, data, jax.random.fold_in(key, r))
                models.append(jax.tree.map(lambda a: np.asarray(a, np.float64), state.params))
        read = read_off_next_round(models[0], models[1], config, tuple(model.example_shape),
                                   target=target)
        return MaliciousClientResult(read.reconstructions, read.installed, read.install_error,
                                     models[0], models[1])

    return run


def malicious_client_attack(model: Model, global_params: PyTree, install_x: Any,
                            install_y: Any, victim_x: Any, victim_y: Any,
                            direction: np.ndarray, edges: np.ndarray,
                            config: MaliciousClientConfig, local: LocalTraining, *,
                            attacker_x: Any, attacker_y: Any, key: jax.Array,
                            clip_norm: float | None = None, norm_bound: float | None = None,
                            noise_multiplier: float = 0.0) -> MaliciousClientResult:
    """One trial of the attack: :func:`malicious_client_rounds` built and run once.

    Args:
      model, global_params, direction, edges, config, local, clip_norm, norm_bound,
        noise_multiplier: see :func:`malicious_client_rounds`.
      install_x: ``[C - 1, B, ...]`` honest clients' examples in the install round.
      install_y: ``[C - 1, B]`` their labels.
      victim_x: ``[C - 1, B, ...]`` honest clients' examples in the next round (victims).
      victim_y: ``[C - 1, B]`` their labels.
      attacker_x, attacker_y: the attacker's own examples (``>= B``) and labels.
      key: PRNG key of the two rounds.

    Returns:
      :class:`MaliciousClientResult`.
    """
    run = malicious_client_rounds(model, global_params, direction, edges, config, local,
                                  clip_norm=clip_norm, norm_bound=norm_bound,
                                  noise_multiplier=noise_multiplier)
    return run(install_x, install_y, victim_x, victim_y, attacker_x=attacker_x,
               attacker_y=attacker_y, key=key)


__all__ = ["INSTALL_TOLERANCE", "MaliciousClientConfig", "MaliciousClientResult",
           "PRECISIONS", "ReadOff", "imprint_target_params", "install_error",
           "malicious_client_attack", "malicious_client_rounds", "read_off_next_round",
           "replacement_client", "replacement_update", "server_chain"]
