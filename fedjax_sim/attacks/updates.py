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

What the attacker sees comes from one round of the simulator itself
(:func:`observe_victims`): the victims are the population, the whole population is the
cohort, and the defences are stages of the round's chain (:func:`defence_chain`):

* per-client L2 clipping, ``fedjax_sim.server.clipping.clip_per_client``, and Gaussian
  noise each client adds to its clipped upload before sending it
  (:func:`local_gaussian_noise`, a ``CLIENT`` stage): what protects individual updates
  from an honest-but-curious server, which keeps the uploads as sent
  (:func:`fedjax_sim.attacks.capture.victim_capture`);
* secure aggregation, ``fedjax_sim.secagg.secure_sum``: the server learns only the
  decoded sum of a group of clients (the round's ``ServerView``); noise that protects
  against that server is added by the clients as distributed discrete Gaussian shares
  (central noise, added by the server after decoding, would not hide the sum from it).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_sim._validation import ConfigError, check_float, check_int, fail
from fedjax_sim.algorithms import make_algorithm
from fedjax_sim.attacks.capture import NAME as CAPTURED, victim_capture
from fedjax_sim.client_update import ClientConfig, make_local_update
from fedjax_sim.data.federated import ClientData, make_federated_data
from fedjax_sim.models import Model
from fedjax_sim.rounds import make_round, split_round_key
from fedjax_sim.sampling import FixedSizeSampler
from fedjax_sim.secagg import SecureAggregation, secure_sum
from fedjax_sim.server.base import (Chain, Stage, chain, client_positions, client_stage,
                                    stage_key, zero_masked)
from fedjax_sim.server.clipping import check_key, clip_per_client
from fedjax_sim.server.noise import GaussianNoiseState, add_gaussian_noise
from fedjax_sim.server.reducers import weighted_mean

PyTree = Any

SECURE_BITS = 32
"""Ring bits of the lab's secure sum without noise (rounding error ~1e-8 of the sum)."""


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


def local_gaussian_noise(noise_multiplier: float, clip_norm: float, *,
                         key: jax.Array) -> Stage:
    """Each client adds ``N(0, (z S)^2)`` to every coordinate of its upload before sending.

    Local DP against the party that receives the uploads (an honest-but-curious server):
    after ``clip_per_client(S)`` one client's upload has L2 sensitivity ``2 S`` under
    replacing its data, so each upload alone is a Gaussian mechanism with noise
    multiplier ``z / 2`` (``z`` against sending nothing, sensitivity ``S``; Dwork & Roth
    2014, Thm. A.1, composed over rounds by an accountant). The guarantee assumes the clipping
    runs before this stage and that the noise key is secret; it is not read by the
    privacy ledger (no mechanism is declared: the ledger accounts central noise on the
    aggregate). Client ``c`` draws from ``fold_in(round key, id_c)``, as the compressors
    of :mod:`fedjax_sim.server.compression` do, so its noise does not depend on its chunk,
    position or cohort; the round key advances once per round.

    Args:
      noise_multiplier: ``z >= 0``.
      clip_norm: ``S > 0``, the bound of each upload (the clip norm before this stage).
      key: PRNG key, kept in the state and split every round.

    Returns:
      A streaming ``CLIENT`` stage named ``"local_gaussian_noise"``.
    """
    z = check_float("noise_multiplier", noise_multiplier, min_value=0.0)
    s = check_float("clip_norm", clip_norm, min_value=0.0, min_exclusive=True)
    key = check_key("key", key)
    std = z * s

    def apply(cohort, state):
        round_key, _ = stage_key(state.key)
        keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(round_key,
                                                               client_positions(cohort))
        noisy = jax.vmap(add_gaussian_noise, in_axes=(0, None, 0))(cohort.updates, std, keys)
        return zero_masked(cohort._replace(updates=noisy))

    return client_stage("local_gaussian_noise", apply,
                        init=lambda upload: GaussianNoiseState(key),
                        advance=lambda total, state: GaussianNoiseState(
                            stage_key(state.key)[1]))


def _secure_settings(clip_norm: float, noise_multiplier: float, dim: int,
                     clients: int) -> SecureAggregation:
    """The lab's secure sum: ``SECURE_BITS`` bits; with noise the most bits (down to 16)
    whose local discrete Gaussian shares the int32 sampler draws exactly."""
    noise = "ddg" if noise_multiplier > 0 else "none"

    def settings(bits):
        return SecureAggregation(bits=bits, clip_norm=clip_norm, dim=dim, capacity=clients,
                                 expected_clients=clients, noise=noise,
                                 noise_multiplier=noise_multiplier)

    for bits in range(SECURE_BITS, 16, -1):
        try:
            return settings(bits)
        except ConfigError:  # the shares too large for the sampler: fewer bits
            if noise == "none":
                raise
    return settings(16)  # its one-line error names the field if even 16 bits fail


def defence_chain(*, clip_norm: float | None, noise_multiplier: float,
                  secure_aggregation: bool, clients: int, dim: int,
                  key: jax.Array) -> Chain:
    """The round's chain for the lab's defences (the simulator's own stages).

    Without secure aggregation: ``[clip_per_client(S)] -> [local_gaussian_noise(z, S)] ->
    weighted_mean()``; the server keeps each upload as sent. With it:
    ``secure_sum`` (which clips to ``S`` itself) whose clients add distributed discrete
    Gaussian shares summing to std ``z S`` when ``z > 0``.

    Args:
      clip_norm: ``S`` (needed with noise and with secure aggregation).
      noise_multiplier: ``z >= 0``.
      secure_aggregation: the server sees only the sum.
      clients: the clients summed (the cohort), >= 2 under secure aggregation.
      dim: coordinates of one upload.
      key: PRNG key of the noise / the protocol.

    Returns:
      A complete :class:`~fedjax_sim.server.Chain`.
    """
    z = check_float("noise_multiplier", noise_multiplier, min_value=0.0)
    if clip_norm is not None:
        clip_norm = check_float("clip_norm", clip_norm, min_value=0.0, min_exclusive=True)
    if z > 0 and clip_norm is None:
        fail("clip_norm", None, "noise_multiplier > 0 needs a clip norm (noise is z * S)")
    key = check_key("key", key)
    if secure_aggregation:
        if clip_norm is None:
            fail("clip_norm", None, "secure aggregation needs a clip norm (each update is "
                 "clipped before it is scaled into the ring)")
        if clients < 2:
            fail("clients", clients, "secure aggregation sums at least 2 clients")
        return chain(secure_sum(_secure_settings(clip_norm, z, dim, clients), key=key))
    stages = [] if clip_norm is None else [clip_per_client(clip_norm)]
    if z > 0:
        stages.append(local_gaussian_noise(z, clip_norm, key=key))
    return chain(*stages, weighted_mean())


class Observed(NamedTuple):
    """What the attacker saw of the victims in the engine round.

    Attributes:
      uploads: every leaf ``[V, ...]``, the victims' uploads as sent, in victim order; or
        ``[G, ...]`` under secure aggregation, the decoded sum of each group of victims.
      clean_norms: ``[V]`` float32 L2 norms of the victims' updates before any defence
        (the round's per-client ``update_norm``), in victim order.
      clip_norm: the clip norm the round used (under secure aggregation without a given
        clip norm, a bound above every clean update: nothing is clipped); None: none.
    """

    uploads: PyTree
    clean_norms: np.ndarray
    clip_norm: float | None


def _take(order: np.ndarray, leaf: jax.Array) -> np.ndarray:
    return np.asarray(leaf)[order]


def _norms(updates: PyTree) -> np.ndarray:
    """``[V]`` L2 norms of stacked updates, on the host."""
    leaves = [np.asarray(u, np.float64).reshape(np.shape(u)[0], -1)
              for u in jax.tree.leaves(updates)]
    return np.sqrt(sum(np.sum(np.square(u), axis=1) for u in leaves))


def _population(x: Any, y: Any, num_classes: int):
    x, y = np.asarray(x), np.asarray(y)
    counts = np.full((y.shape[0],), y.shape[1], np.int32)
    return make_federated_data(x, y.astype(np.int32), counts, num_classes=num_classes)


@functools.lru_cache(maxsize=16)
def _victim_round(model: Model, local: LocalTraining, clients: int, secure: bool,
                  clip_norm: float | None, noise_multiplier: float, dim: int):
    """The compiled round of :func:`observe_victims`, shared by calls with the same
    settings (the chain's keys only seed its state, which each call sets)."""
    stages = defence_chain(clip_norm=clip_norm, noise_multiplier=noise_multiplier,
                           secure_aggregation=secure, clients=clients, dim=dim,
                           key=jax.random.key(0))
    algorithm = make_algorithm("fedavg", model, client_lr=local.learning_rate,
                               local_epochs=local.local_epochs, batch_size=local.batch_size,
                               weighting="uniform" if secure else "examples",
                               aggregator=stages)
    return make_round(algorithm, FixedSizeSampler(clients, clients), server_view=secure,
                      observers=() if secure else [victim_capture(clients, [0])])


def observe_victims(model: Model, params: PyTree, x: Any, y: Any, local: LocalTraining, *,
                    clip_norm: float | None = None, noise_multiplier: float = 0.0,
                    secure_aggregation: bool = False, group_size: int | None = None,
                    key: jax.Array) -> Observed:
    """One engine round over the victims under the chosen defences; what the server sees.

    Threat model: an honest-but-curious server that runs the round as specified. Without
    secure aggregation it keeps every upload as it arrives, after the clients' own stages
    (clipping, local noise); the victims are the population and the cohort, and the
    :func:`~fedjax_sim.attacks.capture.victim_capture` observer hands their uploads over,
    mapped back to the victims by client id. With secure aggregation every consecutive
    ``group_size`` victims form a cohort of their own (one round each, the same compiled
    round) and the server learns only the group's decoded sum.

    Args:
      model: the victims' model.
      params: the global params of the round.
      x: ``[V, B, *example_shape]`` the victims' examples.
      y: ``[V, B]`` integer labels.
      local: the victims' local training (the round's FedAvg client).
      clip_norm: per-client L2 clip norm; None: no clipping (under secure aggregation,
        which must clip, a bound above every clean update).
      noise_multiplier: Gaussian noise std in units of ``clip_norm``: local noise on each
        upload, or distributed shares on each secure sum.
      secure_aggregation: the server sees only sums.
      group_size: victims per secure sum (default: all of them).
      key: the round key (with several secure groups, group ``g``'s is ``fold_in(key,
        g)``): victim ``v`` trains with ``fold_in(split_round_key(key)[1], v)``, as the
        round's client ``v``; the defences' noise and protocol use ``fold_in(key, 0xb5)``.

    Returns:
      :class:`Observed`.
    """
    key = check_key("key", key)
    num, batch = np.shape(y)
    group = num if group_size is None or not secure_aggregation else check_int(
        "group_size", group_size, min_value=1)
    if num % group:
        fail("group_size", group, f"must divide the {num} victims")
    groups = num // group if secure_aggregation else 1
    size = num // groups
    round_keys = [key] if groups == 1 else [jax.random.fold_in(key, g) for g in range(groups)]
    parts = [(np.asarray(x)[g * size:(g + 1) * size], np.asarray(y)[g * size:(g + 1) * size])
             for g in range(groups)]
    if secure_aggregation and clip_norm is None:  # a bound that clips nothing
        top = max(float(np.max(_norms(victim_updates(
            model, params, jnp.asarray(px), jnp.asarray(py), local,
            key=split_round_key(k)[1])))) for (px, py), k in zip(parts, round_keys))
        clip_norm = max(1.01 * top, float(np.finfo(np.float32).tiny))
    dim = sum(math.prod(np.shape(p)) for p in jax.tree.leaves(params))
    fr = _victim_round(model, local, size, bool(secure_aggregation), clip_norm,
                       float(noise_multiplier), dim)
    stages = defence_chain(clip_norm=clip_norm, noise_multiplier=noise_multiplier,
                           secure_aggregation=secure_aggregation, clients=size, dim=dim,
                           key=jax.random.fold_in(key, 0xb5))
    state = fr.init(key, params)
    state = state.replace(aggregator=stages.init(jax.tree.map(jnp.zeros_like, params)))
    uploads, clean_norms = [], []
    for (px, py), round_key in zip(parts, round_keys):
        _, out = fr.step(state, _population(px, py, model.num_classes), round_key)
        order = np.argsort(np.asarray(out.client_ids))  # population id = victim index
        clean_norms.append(np.asarray(out.client_metrics["update_norm"])[order])
        if secure_aggregation:
            uploads.append(jax.tree.map(lambda t: np.asarray(t)[None], out.server_view.total))
            continue
        captured = out.observed[CAPTURED]
        if not np.asarray(captured.present).all():
            raise AssertionError("the capture missed a victim")
        order = np.argsort(np.asarray(captured.client_ids))
        uploads.append(jax.tree.map(functools.partial(_take, order), captured.uploads))
    # Host-side reassembly (NumPy): no small device programs to compile.
    uploads = jax.tree.map(lambda *u: jnp.asarray(np.concatenate(u)), *uploads)
    return Observed(uploads, np.concatenate(clean_norms), clip_norm)


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


__all__ = ["LocalTraining", "Observed", "SECURE_BITS", "defence_chain", "dense_layers",
           "local_gaussian_noise", "observe_victims", "simulate_update", "soft_cross_entropy",
           "victim_updates"]
