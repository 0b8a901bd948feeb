"""Malicious clients inside the vmapped round: data poisoning and model poisoning.

An adversary wraps a client program (:class:`~fedjax_sim.algorithms.ClientProgram`), so
it works with any algorithm (FedAvg, SCAFFOLD, ...). An *attack* is a pure one-client
function with the signature of the program's update plus the honest update itself::

    attack(honest_update, message, data, key, state) -> ClientResult

It may train on poisoned data (by calling ``honest_update`` on modified ``data``) and/or
rewrite the resulting upload. Every attack of this module is a :class:`StagedAttack`: a
``poison(data, key)`` stage before the client's own training and a ``rewrite(result,
key)`` stage after it. :func:`adversarial_client` then trains every client ONCE: on its
poisoned data if it is malicious, on its own data otherwise (a per-client ``jnp.where``
on the data), and rewrites the malicious clients' results, so an attacked round costs
about what an honest one does. Any other callable with the signature above also works;
then both the honest and the attack's result are computed for every client and one is
selected per client. Either way it is one vmapped round, no Python loop over clients, and
a padding client (id ``-1``) is never malicious.

Which clients are malicious is a pure function of the population id
(:func:`malicious_by_permutation`), so the adversary is the same set of clients in every
round and a client's role does not depend on who else was sampled.

Omniscient attacks (A Little Is Enough, inner-product manipulation) need the round's
honest uploads, which a single client never sees. They are a colluding ``COHORT`` stage
on the server's side of the wire (:mod:`fedjax_sim.poisoning.omniscient`) that receives
the honest uploads as an explicit argument and overwrites the malicious clients' rows,
before any defence runs; the malicious clients themselves train honestly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from fedjax_sim._threefry import stream_bits
from fedjax_sim._trees import l2_norm
from fedjax_sim._validation import check_float, check_int, fail
from fedjax_sim.algorithms.base import ClientProgram, ClientResult
from fedjax_sim.data.federated import ClientData

PyTree = Any
ClientUpdate = Callable[[PyTree, ClientData, jax.Array, PyTree], ClientResult]
Attack = Callable[[ClientUpdate, PyTree, ClientData, jax.Array, PyTree], ClientResult]
Trigger = Callable[[jax.Array], jax.Array]

ATTACK_NAMES = ("none", "label_flip", "backdoor", "model_replacement", "constrain_scale",
                "sign_flip", "gaussian", "alie", "ipm")


def _scale(tree: PyTree, s: jax.Array | float) -> PyTree:
    return jax.tree.map(lambda x: (x * s).astype(x.dtype), tree)


def _with_upload(out: ClientResult, upload: PyTree) -> ClientResult:
    return out._replace(upload=upload)


def _select(flag: jax.Array, bad: PyTree, good: PyTree) -> PyTree:
    return jax.tree.map(lambda b, g: jnp.where(flag, b, g), bad, good)


@dataclasses.dataclass(frozen=True)
class StagedAttack:
    """An attack around the client's own honest training: poison its data, rewrite its result.

    Attributes:
      poison: ``(data, key) -> data`` with the same structure, shapes and dtypes (None:
        train on the client's own data).
      rewrite: ``(result, key) -> ClientResult`` applied to the result of training on the
        (poisoned) data (None: send it as is).

    Called with the generic attack signature it runs poison, ``honest_update`` and
    rewrite in turn, all with ``key``.
    """

    poison: Callable[[ClientData, jax.Array], ClientData] | None = None
    rewrite: Callable[[ClientResult, jax.Array], ClientResult] | None = None

    def __call__(self, honest_update, message, data, key, state=()):
        if self.poison is not None:
            data = self.poison(data, key)
        out = honest_update(message, data, key, state)
        return out if self.rewrite is None else self.rewrite(out, key)


# --------------------------------------------------------------------- who is malicious

def malicious_by_permutation(num_clients: int, num_malicious: int, *, seed: int = 0
                             ) -> Callable[[jax.Array], jax.Array]:
    """``is_malicious(client_id)``: the clients whose permuted id is ``< num_malicious``.

    The permutation is a fixed affine bijection ``id -> (a * id + b) mod K`` with ``a``
    coprime to ``K`` (chosen from ``seed`` on the host), so the adversarial set is exactly
    ``num_malicious`` clients, spread over the id range, and membership is a pure O(1)
    function of the id (usable inside jit for any population size). Padding ids (< 0) are
    never malicious.

    Args:
      num_clients: population size K.
      num_malicious: number of adversarial clients, ``0 <= m <= K``.
      seed: non-negative seed of the permutation.

    Returns:
      A pure function of an int32 id (or array of ids) returning bool.
    """
    import math
    import numpy as np

    k = check_int("num_clients", num_clients, min_value=1, max_value=2**31 - 1)
    m = check_int("num_malicious", num_malicious, min_value=0, max_value=k)
    rng = np.random.default_rng(check_int("seed", seed, min_value=0))
    a = int(rng.integers(1, max(k, 2)))
    while math.gcd(a, k) != 1:
        a = a % k + 1
    b = int(rng.integers(0, k))

    def is_malicious(client_id: jax.Array) -> jax.Array:
        client_id = jnp.asarray(client_id)
        cid = jnp.where(client_id >= 0, client_id, 0).astype(jnp.uint32)
        perm = (_mulmod(cid, a, k).astype(jnp.uint32) + jnp.uint32(b)) % jnp.uint32(k)
        return (client_id >= 0) & (perm < jnp.uint32(m))

    return is_malicious


def _mulmod(x: jax.Array, a: int, k: int) -> jax.Array:
    """``(x * a) mod k`` for uint32 ``x < k < 2**31`` without overflow (double-and-add)."""
    x = x.astype(jnp.uint32) % jnp.uint32(k)
    out = jnp.zeros_like(x)
    k32 = jnp.uint32(k)
    for bit in reversed(range(max(a.bit_length(), 1))):
        out = (out * jnp.uint32(2)) % k32  # out < k < 2**31, so 2*out fits in uint32
        if (a >> bit) & 1:
            out = (out + x) % k32
    return out.astype(jnp.int32)


def malicious_count(num_clients: int, *, num_malicious: int | None = None,
                    malicious_fraction: float | None = None) -> int:
    """The adversary's size from a count or a fraction of the population (exactly one)."""
    if (num_malicious is None) == (malicious_fraction is None):
        fail("num_malicious", num_malicious, "give exactly one of num_malicious and "
             "malicious_fraction")
    if num_malicious is not None:
        return check_int("num_malicious", num_malicious, min_value=0, max_value=num_clients)
    f = check_float("malicious_fraction", malicious_fraction, min_value=0.0, max_value=1.0)
    return int(round(f * num_clients))


# --------------------------------------------------------------------- the wrapper

def adversarial_client(program: ClientProgram, attack: Attack,
                       is_malicious: Callable[[jax.Array], jax.Array]) -> ClientProgram:
    """``program`` where adversarial clients send the attack's result.

    Malicious means ``is_malicious(data.client_id)``; padding clients (id ``-1``) are
    always honest, so masks are honoured. Under vmap a branch is a select, so:

    * a :class:`StagedAttack` (every attack of this module) costs one local training per
      client: the client trains on ``where(malicious, poison(data), data)`` with its own
      key, and malicious clients' results go through ``rewrite``; both stages get
      ``fold_in(key, 0x5eed)``.
    * any other attack callable runs next to the honest update for every client and one
      result is selected per client. The ``honest_update`` it receives returns the
      already computed honest result when called on the client's own ``message``,
      ``data`` and ``state`` objects (any key), so only attacks that train on other data
      pay a second training pass.

    The wrapped program keeps ``program``'s per-client state and upload structure.

    Args:
      program: the honest client program (any algorithm's).
      attack: the attack (see module docstring).
      is_malicious: pure predicate on the population id.

    Returns:
      The adversarial :class:`~fedjax_sim.algorithms.ClientProgram`.
    """
    honest_update = program.update

    if isinstance(attack, StagedAttack):
        def staged_update(message, data: ClientData, key, state=()):
            flag = is_malicious(data.client_id) & (data.client_id >= 0)
            attack_key = jax.random.fold_in(key, 0x5eed)
            if attack.poison is not None:
                data = _select(flag, attack.poison(data, attack_key), data)
            out = honest_update(message, data, key, state)
            if attack.rewrite is None:
                return out
            return _select(flag, attack.rewrite(out, attack_key), out)

        return dataclasses.replace(program, update=staged_update)

    def update(message, data: ClientData, key, state=()):
        honest = honest_update(message, data, key, state)

        def reuse_honest(m, d, k, s=()):
            if m is message and d is data and s is state:
                return honest  # the same training run: reuse it
            return honest_update(m, d, k, s)

        attack_key = jax.random.fold_in(key, 0x5eed)
        bad = attack(reuse_honest, message, data, attack_key, state)
        flag = is_malicious(data.client_id) & (data.client_id >= 0)
        return _select(flag, bad, honest)

    return dataclasses.replace(program, update=update)


# --------------------------------------------------------------------- data poisoning

def label_flip(num_classes: int) -> Attack:
    """Label flipping: the client trains honestly on labels ``y -> num_classes - 1 - y``.

    Threat model: a data-poisoning adversary that controls only its clients' training data
    (not the training code): e.g. users who mislabel their own data. It sends a genuinely
    trained, well-formed update, so norm checks do not see it; its effect is limited by
    its share of the aggregate weight (Tolpegin et al. 2020; Fang et al. 2020).
    """
    k = check_int("num_classes", num_classes, min_value=2)
    return StagedAttack(poison=lambda data, key: data.replace(
        y=(k - 1 - data.y).astype(data.y.dtype)))


def pixel_trigger(size: int = 2, value: float = 1.0, corner: str = "bottom_right") -> Trigger:
    """An image trigger: a ``size x size`` square of ``value`` in a corner of ``[H, W, C]``.

    Works on one example or any batch ``[..., H, W, C]``.
    """
    size = check_int("size", size, min_value=1)
    value = check_float("value", value)

    def apply(x):
        h, w = x.shape[-3], x.shape[-2]
        rows = slice(h - size, h) if corner.startswith("bottom") else slice(0, size)
        cols = slice(w - size, w) if corner.endswith("right") else slice(0, size)
        return x.at[..., rows, cols, :].set(jnp.asarray(value, x.dtype))

    return apply


def feature_trigger(indices: tuple[int, ...], value: float) -> Trigger:
    """A tabular trigger: features ``indices`` (last axis) set to ``value``."""
    if not indices:
        fail("indices", indices, "must name at least one feature")
    idx = jnp.asarray(indices, jnp.int32)
    value = check_float("value", value)
    return lambda x: x.at[..., idx].set(jnp.asarray(value, x.dtype))


def backdoor(trigger: Trigger, target_label: int, *, poison_fraction: float = 0.5
             ) -> Attack:
    """Backdoor: train on a mix of clean and triggered examples relabelled ``target_label``.

    Each of the client's real examples is triggered and relabelled with probability
    ``poison_fraction`` (fresh per round, from the client's key); the rest stay clean, so
    the model keeps its main-task accuracy while learning "trigger => target" (Gu et al.
    2017, Bagdasaryan et al. 2020). Threat model: the adversary controls its clients' data
    and labels; without boosting its update is diluted by the honest majority.
    """
    target = check_int("target_label", target_label, min_value=0)
    frac = check_float("poison_fraction", poison_fraction, min_value=0.0, max_value=1.0)

    def poison(data, key):
        # Bernoulli(frac) per example from unrolled Threefry bits (jax.random's rolled
        # loop is slow inside a vmapped chunk on CPU): 24-bit uniforms against frac.
        n = math.prod(data.y.shape)
        u = (stream_bits(key, 0, n) >> 8).astype(jnp.float32) * (1.0 / (1 << 24))
        hit = (u < frac).reshape(data.y.shape)
        hit_x = hit.reshape(hit.shape + (1,) * (data.x.ndim - hit.ndim))
        x = jnp.where(hit_x, trigger(data.x), data.x)
        y = jnp.where(hit, jnp.asarray(target, data.y.dtype), data.y)
        return data.replace(x=x, y=y)

    return StagedAttack(poison=poison)


# --------------------------------------------------------------------- model poisoning

def model_replacement(trigger: Trigger, target_label: int, boost: float, *,
                      poison_fraction: float = 0.5) -> Attack:
    """Model replacement (Bagdasaryan et al. 2020): a backdoored delta scaled by ``boost``.

    With ``n`` clients averaged and server learning rate ``eta``, choosing
    ``boost ~= n / eta`` makes the new global model approximately the attacker's local
    model: the honest deltas, nearly cancelling near convergence, are outweighed. Threat
    model: the adversary controls its clients' training code; one client in one round
    suffices against the plain mean; the boosted norm is what norm bounding detects.
    """
    boost = check_float("boost", boost)
    return StagedAttack(
        poison=backdoor(trigger, target_label, poison_fraction=poison_fraction).poison,
        rewrite=lambda out, key: _with_upload(out, _scale(out.upload, boost)))


def constrain_and_scale(trigger: Trigger, target_label: int, max_norm: float, *,
                        poison_fraction: float = 0.5) -> Attack:
    """Constrain-and-scale: a backdoored delta rescaled to L2 norm exactly ``max_norm``.

    The adversary knows (or estimates) the server's norm bound and boosts as far as it
    allows, evading norm bounding / ``zero_above_norm`` at ``max_norm`` while keeping the
    largest admissible influence (Bagdasaryan et al. 2020, sec. 4; Sun et al. 2019).
    """
    bound = check_float("max_norm", max_norm, min_value=0.0, min_exclusive=True)

    def rewrite(out, key):
        norm = l2_norm(out.upload)
        return _with_upload(out, _scale(out.upload, bound / jnp.maximum(norm, 1e-12)))

    return StagedAttack(
        poison=backdoor(trigger, target_label, poison_fraction=poison_fraction).poison,
        rewrite=rewrite)


def sign_flip(scale: float = 1.0) -> Attack:
    """Sign flipping: the client sends ``-scale`` times its honest delta.

    Threat model: a Byzantine client that runs honest training and reverses it, pushing the
    model uphill on the loss (an untargeted attack; Damaskinos et al. 2018, Li et al. 2019).
    """
    scale = check_float("scale", scale, min_value=0.0)
    return StagedAttack(rewrite=lambda out, key: _with_upload(out, _scale(out.upload, -scale)))


def gaussian_noise_attack(std: float) -> Attack:
    """Gaussian noise: the client sends i.i.d. ``N(0, std^2)`` entries instead of a delta.

    Threat model: a Byzantine client with no knowledge of the task (the classic baseline
    of Blanchard et al. 2017): cheap to mount, large in norm, easy for robust reducers.
    """
    std = check_float("std", std, min_value=0.0)

    def rewrite(out, key):
        leaves, treedef = jax.tree.flatten(out.upload)
        keys = jax.random.split(key, len(leaves))
        noise = [(std * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype)
                 for k, x in zip(keys, leaves)]
        return _with_upload(out, jax.tree.unflatten(treedef, noise))

    return StagedAttack(rewrite=rewrite)
