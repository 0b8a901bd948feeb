"""Differential privacy on the aggregate: Gaussian noise, DP-FedAvg normalisation and chain.

DP-FedAvg (McMahan, Ramage, Talwar, Zhang 2018, "Learning Differentially Private Recurrent
Language Models") is the composition

    clip_per_client(S) -> sum_updates() -> gaussian_noise(z, S) -> dp_mean_normalize(qN)

which :func:`dp_fedavg_aggregator` builds. Its adaptive-clipping variant (Andrew et al. 2021)
fuses clipping, the noisy unclipped count and the noisy sum into one streaming reducer
because the update noise must scale with the clip norm held in that stage's state.

The noise stages carry a typed mechanism (:class:`~fedjax_sim.privacy.GaussianSumNoise`):
the privacy ledger (:func:`fedjax_sim.privacy.ledger_for`) reads it with the clipping
bound and the sampler's schedule. The sampling (Poisson or fixed size) and the number of
rounds are the sampler's and the round's business, not these stages'.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_sim._trees import weighted_sum
from fedjax_sim._validation import check_float
from fedjax_sim.privacy.accounting import update_noise_multiplier_for
from fedjax_sim.privacy.mechanisms import GaussianSumNoise
from fedjax_sim.server.base import Chain, Stage, StageKind, chain
from fedjax_sim.server.clipping import (AdaptiveClipState, adaptive_state_stats,
                                        check_adaptive_args, check_key, clip_cohort,
                                        clip_per_client, diagnostics_from, empty_diagnostics,
                                        next_clip_norm)
from fedjax_sim.server.reducers import sum_updates

PyTree = Any


class GaussianNoiseState(NamedTuple):
    """State of :func:`gaussian_noise`: the PRNG key, split on every update."""

    key: jax.Array


def add_gaussian_noise(tree: PyTree, std: jax.Array | float, key: jax.Array) -> PyTree:
    """Adds independent ``N(0, std^2)`` to every coordinate of every leaf (one key per leaf)."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, max(len(leaves), 1))
    noisy = [leaf + (std * jax.random.normal(k, leaf.shape, jnp.float32)).astype(leaf.dtype)
             for leaf, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, noisy)


def gaussian_noise(noise_multiplier: float, sensitivity: float, *, key: jax.Array) -> Stage:
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
      noise_multiplier: ``z >= 0`` (0 disables the noise: no privacy, no mechanism).
      sensitivity: ``S > 0``, the L2 sensitivity of the incoming aggregate (the clip norm).
      key: PRNG key for the noise.

    Returns:
      An ``AGGREGATE`` stage with state :class:`GaussianNoiseState` and mechanism
      ``GaussianSumNoise(z, S)`` (None when z is 0).
    """
    z = check_float("noise_multiplier", noise_multiplier, min_value=0.0)
    s = check_float("sensitivity", sensitivity, min_value=0.0, min_exclusive=True)
    key = check_key("key", key)
    std = z * s

    def apply(value, state):
        next_key, noise_key = jax.random.split(state.key)
        return add_gaussian_noise(value, std, noise_key), GaussianNoiseState(next_key)

    return Stage("gaussian_noise", StageKind.AGGREGATE,
                 init=lambda upload: GaussianNoiseState(key), apply=apply,
                 mechanism=GaussianSumNoise(z, s) if z > 0 else None)


def dp_mean_normalize(expected_weight: float) -> Stage:
    """Divides the (noisy) aggregate sum by a fixed expected total weight.

    McMahan et al. 2018's fixed-denominator estimator ``sum_k w_k u_k / (q W)``: dividing by
    the *expected* weight (``q W``; with unit weights the expected number of sampled
    clients) rather than the realised one keeps the division data-independent, so it is
    post-processing and costs no privacy. The estimate is unbiased for the population mean.

    Args:
      expected_weight: ``q W > 0``.

    Returns:
      A stateless ``AGGREGATE`` stage.
    """
    w = check_float("expected_weight", expected_weight, min_value=0.0, min_exclusive=True)
    return Stage("dp_mean_normalize", StageKind.AGGREGATE, apply=lambda value, state: (
        jax.tree.map(lambda x: x / jnp.asarray(w, x.dtype), value), state))


def _adaptive_clipped_gaussian_sum(initial_clip_norm, noise_multiplier, target_quantile,
                                   learning_rate, count_noise_std, expected_clients,
                                   key) -> Stage:
    """Streaming reducer: adaptive clip, unweighted sum, ``N(0, (z_u C)^2)`` noise, new ``C``.

    Per chunk: the clipped unit sum at this round's ``C``, the centred unclipped count and
    the clip diagnostics. Per round: the noisy sum and the next ``C``.
    """
    c0, gamma, eta, sigma_b, m = check_adaptive_args(
        initial_clip_norm, target_quantile, learning_rate, count_noise_std, expected_clients)
    z = check_float("noise_multiplier", noise_multiplier, min_value=0.0)
    z_u = update_noise_multiplier_for(z, sigma_b)
    key = check_key("key", key)

    def init(upload):
        del upload
        return AdaptiveClipState(jnp.asarray(c0, jnp.float32), key, empty_diagnostics())

    def partial(chunk, state):
        clipped = clip_cohort(chunk, state.clip_norm)
        total = weighted_sum(clipped.updates, clipped.mask.astype(jnp.float32))
        return total, adaptive_state_stats(chunk, state)

    def finalize(contribution, state):
        total, (count_stats, clip_stats) = contribution
        next_key, count_key, noise_key = jax.random.split(state.key, 3)
        new_clip = next_clip_norm(count_stats, state.clip_norm, count_key,
                                  target_quantile=gamma, learning_rate=eta,
                                  count_noise_std=sigma_b, expected_clients=m)
        noisy = add_gaussian_noise(total, z_u * state.clip_norm, noise_key)
        return noisy, AdaptiveClipState(new_clip, next_key,
                                        diagnostics_from(clip_stats, state.clip_norm))

    mechanism = GaussianSumNoise(z, None, z_u, sigma_b) if z > 0 else None
    return Stage("adaptive_clipped_gaussian_sum", StageKind.REDUCE, init=init,
                 partial=partial, finalize=finalize, bound="state",
                 bound_of=lambda state: state.clip_norm, mechanism=mechanism, unit_sum=True)


def dp_fedavg_aggregator(clip_norm: float, noise_multiplier: float, expected_clients: float,
                         *, key: jax.Array, adaptive: bool = False,
                         target_quantile: float = 0.5, clip_learning_rate: float = 0.2,
                         count_noise_std: float | None = None) -> Chain:
    """The DP-FedAvg server aggregator as a chain.

    Fixed clipping (McMahan et al. 2018): ``clip_per_client(S) -> sum_updates() ->
    gaussian_noise(z, S) -> dp_mean_normalize(expected_clients)``. Client weights are not
    used (every unmasked client counts 1), which keeps the sum's sensitivity at ``S``.

    Adaptive clipping (Andrew et al. 2021): ``clip_norm`` is the initial clip norm and the
    chain is ``adaptive_clipped_gaussian_sum -> dp_mean_normalize(expected_clients)``; the
    sum gets noise ``z_u * C_t`` with ``z_u`` chosen so that the round's effective
    multiplier (their Theorem 1) equals ``noise_multiplier``. Its mechanism reports the
    effective z (for the ledger), ``update_noise_multiplier`` and ``count_noise_std``; read
    the current ``C_t`` with ``chain.clip_norm(state)``.

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
      The chain (a complete one: cohort -> aggregate).
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

