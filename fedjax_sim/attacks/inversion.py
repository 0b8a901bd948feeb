"""Optimisation-based gradient inversion: DLG and Inverting Gradients, vmapped over victims.

Threat model: an honest-but-curious server. It sees each victim's model update (FedSGD
gradient step or multi-step FedAvg delta; under secure aggregation only the cohort's sum),
knows the model, the global params it sent, the victim's local training (learning rate,
epochs, batch size: :class:`~fedjax_sim.attacks.updates.LocalTraining`), the number of
examples behind the update and the data range ``[0, 1]``. It modifies nothing: it
optimises dummy examples until the simulated update of the dummies matches the observed
one. The victim's local steps are simulated differentiably
(:func:`~fedjax_sim.attacks.updates.simulate_update`), so the same code attacks FedSGD
gradients and FedAvg deltas (Geiping et al. 2020, Sec. 5).

* DLG (Zhu, Liu, Han 2019, "Deep Leakage from Gradients"): dummy inputs *and* soft labels
  (softmax of free logits), squared L2 distance between updates (normalised by the
  observed update's squared norm). The paper uses L-BFGS; we use Adam, which is more robust
  on small models and runs inside ``lax.scan``.
* Inverting Gradients (Geiping, Bauermeister, Droege, Moeller 2020, "Inverting Gradients -
  How easy is it to break privacy in federated learning?"): labels given (known or
  recovered, :mod:`fedjax_sim.attacks.labels`), objective ``1 - cos(sim, observed) +
  tv_weight * TV(x)``, Adam on the *signs* of the gradients with step decay (x0.1 at 3/8,
  5/8, 7/8 of the steps), projection onto the data range, several restarts, the best by
  final objective kept.

Both run all victims and all restarts in one jitted computation (``vmap`` over victims and
restarts, ``lax.scan`` over optimisation steps).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_sim._validation import check_float, check_int, fail
from fedjax_sim.attacks.updates import LocalTraining, simulate_update
from fedjax_sim.client_update import optax_update
from fedjax_sim.models import Model

PyTree = Any


class Reconstruction(NamedTuple):
    """An attack's output for a stack of victims.

    Attributes:
      inputs: ``[V, M, *example_shape]`` reconstructed examples.
      labels: ``[V, M]`` int32 labels attached to them (recovered or given).
      objective: ``[V]`` final attack objective of the kept restart (lower is better).
    """

    inputs: jax.Array
    labels: jax.Array
    objective: jax.Array


@dataclasses.dataclass(frozen=True)
class InversionConfig:
    """Settings of an optimisation attack.

    Attributes:
      steps: optimisation steps (>= 1).
      learning_rate: Adam step size.
      restarts: independent random initialisations per victim; the best is kept.
      tv_weight: total-variation weight (Inverting Gradients only).
      signed: Adam on the signs of the gradients (Geiping et al.) instead of the gradients.
      decay: step decay x0.1 at 3/8, 5/8 and 7/8 of the steps.
      box: project the dummy inputs onto ``[0, 1]`` after every step.
    """

    steps: int = 300
    learning_rate: float = 0.1
    restarts: int = 1
    tv_weight: float = 0.0
    signed: bool = False
    decay: bool = False
    box: bool = True

    def __post_init__(self):
        check_int("steps", self.steps, min_value=1)
        check_float("learning_rate", self.learning_rate, min_value=0.0, min_exclusive=True)
        check_int("restarts", self.restarts, min_value=1)
        check_float("tv_weight", self.tv_weight, min_value=0.0)


DLG_DEFAULTS = InversionConfig(steps=300, learning_rate=0.1, restarts=1)
IG_DEFAULTS = InversionConfig(steps=400, learning_rate=0.1, restarts=4, tv_weight=1e-3,
                              signed=True, decay=True)


def _flat(tree: PyTree) -> jax.Array:
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


def total_variation(x: jax.Array) -> jax.Array:
    """Anisotropic total variation of images ``[B, H, W, C]`` (0 for non-image inputs)."""
    if x.ndim != 4:
        return jnp.zeros((), x.dtype)
    return (jnp.mean(jnp.abs(x[:, 1:] - x[:, :-1])) +
            jnp.mean(jnp.abs(x[:, :, 1:] - x[:, :, :-1])))


def l2_distance(simulated: PyTree, observed: PyTree) -> jax.Array:
    """DLG's objective, ``||sim - obs||^2 / ||obs||^2`` over all parameters."""
    s, o = _flat(simulated), _flat(observed)
    return jnp.sum(jnp.square(s - o)) / jnp.maximum(jnp.sum(jnp.square(o)), 1e-30)


def cosine_distance(simulated: PyTree, observed: PyTree) -> jax.Array:
    """Inverting Gradients' objective, ``1 - <sim, obs> / (|sim| |obs|)``."""
    s, o = _flat(simulated), _flat(observed)
    denom = jnp.maximum(jnp.linalg.norm(s) * jnp.linalg.norm(o), 1e-30)
    return 1.0 - jnp.dot(s, o) / denom


def _optimizer(config: InversionConfig) -> optax.GradientTransformation:
    lr: Any = config.learning_rate
    if config.decay:
        s = config.steps
        lr = optax.piecewise_constant_schedule(
            config.learning_rate, {int(s * 3 / 8): 0.1, int(s * 5 / 8): 0.1,
                                   int(s * 7 / 8): 0.1})
    return optax.adam(lr)


def minimize(objective: Callable[[PyTree], jax.Array], init: PyTree,
             config: InversionConfig, project: Callable[[PyTree], PyTree]
             ) -> tuple[PyTree, jax.Array]:
    """Runs ``config.steps`` Adam steps on ``objective`` from ``init`` inside ``lax.scan``.

    Returns:
      ``(final variables, final objective value)``.
    """
    opt = _optimizer(config)
    grad_fn = jax.grad(objective)

    def step(carry, _):
        z, state = carry
        g = grad_fn(z)
        if config.signed:
            g = jax.tree.map(jnp.sign, g)
        g = jax.tree.map(lambda a: jnp.where(jnp.isfinite(a), a, 0.0), g)
        updates, state = optax_update(opt, g, state, z)
        return (project(optax.apply_updates(z, updates)), state), None

    (z, _), _ = jax.lax.scan(step, (init, opt.init(init)), None, length=config.steps)
    return z, objective(z)


def _keep_best(zs: PyTree, values: jax.Array) -> tuple[PyTree, jax.Array]:
    values = jnp.where(jnp.isfinite(values), values, jnp.inf)
    best = jnp.argmin(values)
    return jax.tree.map(lambda z: z[best], zs), values[best]


@functools.lru_cache(maxsize=32)
def _dlg_fn(model: Model, local: LocalTraining, config: InversionConfig, batch: int):
    shape = (batch,) + tuple(model.example_shape)

    def project(z):
        x, logits = z
        return (jnp.clip(x, 0.0, 1.0) if config.box else x), logits

    def one_victim(params, update, key):
        def objective(z):
            x, logits = z
            sim = simulate_update(model, params, x, jax.nn.softmax(logits), local)
            return l2_distance(sim, update)

        def one_restart(k):
            kx, ky = jax.random.split(k)
            init = (jax.random.uniform(kx, shape), jax.random.normal(ky, (batch,
                                                                           model.num_classes)))
            return minimize(objective, init, config, project)

        zs, values = jax.vmap(one_restart)(jax.random.split(key, config.restarts))
        (x, logits), value = _keep_best(zs, values)
        return x, jnp.argmax(logits, -1).astype(jnp.int32), value

    return jax.jit(jax.vmap(one_victim, in_axes=(None, 0, 0)))


@functools.lru_cache(maxsize=32)
def _ig_fn(model: Model, local: LocalTraining, config: InversionConfig, batch: int):
    shape = (batch,) + tuple(model.example_shape)

    def project(x):
        return jnp.clip(x, 0.0, 1.0) if config.box else x

    def one_victim(params, update, labels, key, mask):
        soft = jax.nn.one_hot(labels, model.num_classes)

        def objective(x):
            sim = simulate_update(model, params, x, soft, local, mask)
            return cosine_distance(sim, update) + config.tv_weight * total_variation(x)

        def one_restart(k):
            return minimize(objective, jax.random.uniform(k, shape), config, project)

        xs, values = jax.vmap(one_restart)(jax.random.split(key, config.restarts))
        x, value = _keep_best(xs, values)
        return x, labels.astype(jnp.int32), value

    return jax.jit(jax.vmap(one_victim, in_axes=(None, 0, 0, 0, 0)))


def victim_keys(key: jax.Array, num_victims: int) -> jax.Array:
    """One key per victim: ``key`` itself if it is already ``[V]`` typed keys, else split.

    Passing ``[V]`` keys lets a caller attack a subset of victims (or one at a time) with
    exactly the randomness they get in a joint call.
    """
    if (jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) and key.ndim == 1):
        if key.shape[0] != num_victims:
            fail("key.shape", key.shape, f"per-victim keys must be [{num_victims}]")
        return key
    return jax.random.split(key, num_victims)


def _num_victims(updates: PyTree) -> int:
    leaves = jax.tree.leaves(updates)
    if not leaves:
        fail("updates", "<empty pytree>", "needs the victims' updates")
    return int(leaves[0].shape[0])


def dlg_attack(model: Model, params: PyTree, updates: PyTree, local: LocalTraining, *,
               batch_size: int, key: jax.Array,
               config: InversionConfig = DLG_DEFAULTS) -> Reconstruction:
    """Deep Leakage from Gradients against many victims at once.

    Args:
      model: the victims' model.
      params: the global params the victims received.
      updates: ``[V, ...]`` observed deltas (leading victim axis on every leaf).
      local: the victims' local training.
      batch_size: number of examples behind each update (the dummy batch size).
      key: PRNG key for the dummy initialisations, or ``[V]`` per-victim keys
        (:func:`victim_keys`).
      config: optimisation settings.

    Returns:
      :class:`Reconstruction` with ``[V, batch_size, ...]`` inputs and the argmax of the
      optimised soft labels.
    """
    batch_size = check_int("batch_size", batch_size, min_value=1)
    keys = victim_keys(key, _num_victims(updates))
    x, labels, value = _dlg_fn(model, local, config, batch_size)(params, updates, keys)
    return Reconstruction(x, labels, value)


def inverting_gradients_attack(model: Model, params: PyTree, updates: PyTree,
                               labels: jax.Array, local: LocalTraining, *, key: jax.Array,
                               config: InversionConfig = IG_DEFAULTS,
                               mask: jax.Array | None = None) -> Reconstruction:
    """Inverting Gradients (cosine + TV, signed Adam, restarts) against many victims at once.

    Args:
      model: the victims' model.
      params: the global params the victims received.
      updates: ``[V, ...]`` observed deltas.
      labels: ``[V, B]`` labels of the dummies (true, or from
        :func:`~fedjax_sim.attacks.labels.recover_labels`); ``B`` is the batch size.
      local: the victims' local training.
      key: PRNG key for the random initialisations, or ``[V]`` per-victim keys.
      config: optimisation settings.
      mask: ``[V, B]`` bool, each victim's real examples (first; padded clients), or
        None (all ``B`` are real). The simulated training skips the padding, as the
        engine does; the padding's dummies are returned but mean nothing.

    Returns:
      :class:`Reconstruction` with ``[V, B, ...]`` inputs.
    """
    labels = jnp.asarray(labels)
    num = _num_victims(updates)
    if labels.ndim != 2 or labels.shape[0] != num:
        fail("labels.shape", labels.shape, f"must be [{num}, batch_size]")
    mask = jnp.ones(labels.shape, bool) if mask is None else jnp.asarray(mask, bool)
    if mask.shape != labels.shape:
        fail("mask.shape", mask.shape, f"must match labels {labels.shape}")
    keys = victim_keys(key, num)
    fn = _ig_fn(model, local, config, int(labels.shape[1]))
    x, lab, value = fn(params, updates, labels, keys, mask)
    return Reconstruction(x, lab, value)


__all__ = ["DLG_DEFAULTS", "IG_DEFAULTS", "InversionConfig", "Reconstruction",
           "cosine_distance", "dlg_attack", "inverting_gradients_attack", "l2_distance",
           "minimize", "total_variation", "victim_keys"]
