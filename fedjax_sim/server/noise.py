"""Differential privacy on the aggregate: Gaussian noise, DP-FedAvg normalisation and chain.

DP-FedAvg (McMahan, Ramage, Talwar, Zhang 2018, "Learning Differentially Private Recurrent
Language Models") is the composition

    clip_per_client(S) -> sum_updates() -> gaussian_noise(z, S) -> dp_mean_normalize(qN)

which :func:`dp_fedavg_aggregator` builds. Its adaptive-clipping variant (Andrew et al. 2021)
fuses clipping, the noisy unclipped count and the noisy sum into one transform because the
update noise must scale with the clip norm held in that transform's state.

What the accountant reads from ``info`` (see :func:`fedjax_sim.server.transform_infos`):
``noise_multiplier`` (the z of one Gaussian mechanism per round over the sampled cohort,
with respect to adding/removing one client) plus ``sensitivity`` and ``noise_std``. The
sampling (Poisson or fixed size) and the number of rounds are the sampler's and the
round's business, not these transforms'.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_sim._validation import ConfigError, check_float
from fedjax_sim.server.base import (ServerTransform, chain, is_cohort, weighted_sum,
                                    zero_masked)
from fedjax_sim.server.clipping import (COUNT_SENSITIVITY, AdaptiveClipState,
                                        adaptive_clip_step, check_adaptive_args, check_key,
                                        clip_per_client, require_cohort)
from fedjax_sim.server.reducers import sum_updates

PyTree = Any


class GaussianNoiseState(NamedTuple):
    """State of :func:`gaussian_noise`: the PRNG key, split on every update."""

    key: jax.Array


def _require_aggregate(name: str, value: Any) -> None:
    if is_cohort(value):
        raise TypeError(f"{name}: expects an aggregate (put a reducer such as sum_updates "
                        "before it)")


def add_gaussian_noise(tree: PyTree, std: jax.Array | float, key: jax.Array) -> PyTree:
    """Adds independent ``N(0, std^2)`` to every coordinate of every leaf (one key per leaf)."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, max(len(leaves), 1))
    noisy = [leaf + (std * jax.random.normal(k, leaf.shape, jnp.float32)).astype(leaf.dtype)
             for leaf, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, noisy)


def gaussian_noise(noise_multiplier: float, sensitivity: float, *,
                   key: jax.Array) -> ServerTransform:
    """Adds ``N(0, (z * S)^2)`` to every coordinate of the aggregate.

    The Gaussian mechanism (Dwork & Roth 2014, Thm. A.1; analysed for composition and
    subsampling by Mironov 2017 / Abadi et al. 2016). Guarantee: if the aggregate it acts on
    is a sum whose L2 sensitivity under adding/removing one client is at most ``S`` (e.g.
    ``clip_per_client(S) -> sum_updates()``), its output is a Gaussian mechanism with noise
    multiplier ``z``, i.e. ``(eps, delta)``-DP per round for every pair with
    ``delta >= delta_Gauss(eps; z)``; compose over rounds and amplify by sampling with an
    accountant. It assumes the noise is added once to the *sum* (not the mean of a random
    number of clients) and that the key is secret and never reused: the key lives in the
    state and is split on every call.

    Args:
      noise_multiplier: ``z >= 0`` (0 disables the noise: no privacy).
      sensitivity: ``S > 0``, the L2 sensitivity of the incoming aggregate (the clip norm).
      key: PRNG key for the noise.

    Returns:
      An aggregate ServerTransform with state :class:`GaussianNoiseState` and info
      ``{"name": "gaussian_noise", "noise_multiplier": z, "sensitivity": S,
      "noise_std": z * S}``.
    """
    z = check_float("noise_multiplier", noise_multiplier, min_value=0.0)
    s = check_float("sensitivity", sensitivity, min_value=0.0, min_exclusive=True)
    key = check_key("key", key)
    std = z * s

    def init(params):
        del params
        return GaussianNoiseState(key)

    def update(value, state):
        _require_aggregate("gaussian_noise", value)
        next_key, noise_key = jax.random.split(state.key)
        return add_gaussian_noise(value, std, noise_key), GaussianNoiseState(next_key)

    return ServerTransform(init, update, {"name": "gaussian_noise", "noise_multiplier": z,
                                          "sensitivity": s, "noise_std": std})


def dp_mean_normalize(expected_weight: float) -> ServerTransform:
    """Divides the (noisy) aggregate sum by a fixed expected total weight.

    McMahan et al. 2018's fixed-denominator estimator ``sum_k w_k u_k / (q W)``: dividing by
    the *expected* weight (``q W``; with unit weights the expected number of sampled
    clients) rather than the realised one keeps the division data-independent, so it is
    post-processing and costs no privacy. The estimate is unbiased for the population mean.

    Args:
      expected_weight: ``q W > 0``.

    Returns:
      An aggregate ServerTransform with info ``{"name": "dp_mean_normalize",
      "expected_weight": qW}``.
    """
    w = check_float("expected_weight", expected_weight, min_value=0.0, min_exclusive=True)

    def init(params):
        del params
        return ()

    def update(value, state):
        _require_aggregate("dp_mean_normalize", value)
        return jax.tree.map(lambda x: x / jnp.asarray(w, x.dtype), value), state

    return ServerTransform(init, update, {"name": "dp_mean_normalize", "expected_weight": w})


def effective_noise_multiplier(update_noise_multiplier: float, count_noise_std: float) -> float:
    """The z of adaptive clipping's round: ``(z_delta^-2 + (2 sigma_b)^-2)^-1/2``.

    Andrew et al. 2021, Theorem 1: the noisy clipped sum (multiplier ``z_delta``) and the
    noisy centred unclipped count (std ``sigma_b``, sensitivity 1/2) together are one Gaussian
    mechanism with this multiplier. Either at 0 gives 0 (no privacy).
    """
    zd = check_float("update_noise_multiplier", update_noise_multiplier, min_value=0.0)
    sb = check_float("count_noise_std", count_noise_std, min_value=0.0)
    if zd == 0.0 or sb == 0.0:
        return 0.0
    return (zd ** -2 + (sb / COUNT_SENSITIVITY) ** -2) ** -0.5


def update_noise_multiplier_for(noise_multiplier: float, count_noise_std: float) -> float:
    """Inverse of :func:`effective_noise_multiplier`: the ``z_delta`` giving a target ``z``.

    Raises ConfigError unless ``z < 2 * sigma_b`` (the count alone would already cost more).
    """
    z = check_float("noise_multiplier", noise_multiplier, min_value=0.0)
    sb = check_float("count_noise_std", count_noise_std, min_value=0.0)
    if z == 0.0:
        return 0.0
    zc = sb / COUNT_SENSITIVITY
    if not z < zc:
        raise ConfigError(f"count_noise_std={sb!r}: adaptive clipping needs noise_multiplier "
                          f"< 2*count_noise_std, got noise_multiplier={z!r}")
    return (z ** -2 - zc ** -2) ** -0.5


def _adaptive_clipped_gaussian_sum(initial_clip_norm, noise_multiplier, target_quantile,
                                   learning_rate, count_noise_std, expected_clients,
                                   key) -> ServerTransform:
    """Reducer: adaptive clip, unweighted sum, ``N(0, (z_delta C)^2)`` noise, new ``C``."""
    c0, gamma, eta, sigma_b, m = check_adaptive_args(
        initial_clip_norm, target_quantile, learning_rate, count_noise_std, expected_clients)
    z = check_float("noise_multiplier", noise_multiplier, min_value=0.0)
    z_delta = update_noise_multiplier_for(z, sigma_b)
    key = check_key("key", key)

    def init(params):
        del params
        return AdaptiveClipState(jnp.asarray(c0, jnp.float32), key)

    def update(value, state):
        require_cohort("adaptive_clipped_gaussian_sum", value)
        next_key, count_key, noise_key = jax.random.split(state.key, 3)
        clipped, new_clip = adaptive_clip_step(
            zero_masked(value), state.clip_norm, count_key, target_quantile=gamma,
            learning_rate=eta, count_noise_std=sigma_b, expected_clients=m)
        total = weighted_sum(clipped.updates, clipped.mask.astype(jnp.float32))
        noisy = add_gaussian_noise(total, z_delta * state.clip_norm, noise_key)
        return noisy, AdaptiveClipState(new_clip, next_key)

    info = {"name": "adaptive_clipped_gaussian_sum", "noise_multiplier": z,
            "update_noise_multiplier": z_delta, "count_noise_std": sigma_b,
            "count_sensitivity": COUNT_SENSITIVITY, "initial_clip_norm": c0,
            "target_quantile": gamma, "learning_rate": eta, "expected_clients": m,
            "sensitivity": None, "noise_std": None}
    return ServerTransform(init, update, info)


def dp_fedavg_aggregator(clip_norm: float, noise_multiplier: float, expected_clients: float,
                         *, key: jax.Array, adaptive: bool = False,
                         target_quantile: float = 0.5, clip_learning_rate: float = 0.2,
                         count_noise_std: float | None = None) -> ServerTransform:
    """The DP-FedAvg server aggregator as a chain.

    Fixed clipping (McMahan et al. 2018): ``clip_per_client(S) -> sum_updates() ->
    gaussian_noise(z, S) -> dp_mean_normalize(expected_clients)``. Client weights are not
    used (every unmasked client counts 1), which keeps the sum's sensitivity at ``S``.

    Adaptive clipping (Andrew et al. 2021): ``clip_norm`` is the initial clip norm and the
    chain is ``adaptive_clipped_gaussian_sum -> dp_mean_normalize(expected_clients)``; the
    sum gets noise ``z_delta * C_t`` with ``z_delta`` chosen so that the round's effective
    multiplier (their Theorem 1) equals ``noise_multiplier``. Its info reports
    ``noise_multiplier`` (the effective z, for the accountant), ``update_noise_multiplier``
    and ``count_noise_std``; read the current ``C_t`` with
    :func:`fedjax_sim.server.clipping.current_clip_norm`.

    Guarantee (both): each round is one Gaussian mechanism with multiplier
    ``noise_multiplier`` w.r.t. adding/removing one client of the sampled cohort; the
    accountant adds sampling amplification and composition over rounds. Assumes a client
    contributes at most one update per round and that nothing else reads the raw updates.

    Args:
      clip_norm: ``S`` (initial clip norm when adaptive).
      noise_multiplier: ``z >= 0``.
      expected_clients: expected number of unmasked clients per round (``q N``).
      key: PRNG key for all the noise of this aggregator.
      adaptive: use adaptive clipping.
      target_quantile: adaptive clipping's ``gamma``.
      clip_learning_rate: adaptive clipping's ``eta``.
      count_noise_std: adaptive clipping's ``sigma_b``; default ``expected_clients / 20``
        (the paper's recommendation).

    Returns:
      The chained ServerTransform (a reducer: CohortUpdates -> aggregate delta).
    """
    key = check_key("key", key)
    m = check_float("expected_clients", expected_clients, min_value=0.0, min_exclusive=True)
    if not adaptive:
        return chain(clip_per_client(clip_norm), sum_updates(),
                     gaussian_noise(noise_multiplier, clip_norm, key=key),
                     dp_mean_normalize(m))
    sigma_b = m / 20.0 if count_noise_std is None else count_noise_std
    return chain(_adaptive_clipped_gaussian_sum(clip_norm, noise_multiplier, target_quantile,
                                                clip_learning_rate, sigma_b, m, key),
                 dp_mean_normalize(m))

