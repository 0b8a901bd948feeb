"""Per-client L2 clipping: fixed, norm-bound filtering and adaptive (quantile) clipping.

All three are per-client transforms (``CohortUpdates -> CohortUpdates``). The norm is the
*global* L2 norm of a client's whole update pytree (all leaves together), which is what the
sensitivity of a sum over clients depends on. Masked clients are zeroed first
(:func:`~fedjax_sim.server.base.zero_masked`) and keep weight 0.

Sensitivity convention used in ``info``: the L2 sensitivity of the *unweighted* sum of client
updates (``sum_updates(weighted=False)``) under adding or removing one client, i.e. the
bound on one client's clipped norm. Weighted sums need weights ``<= 1`` for it to hold.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_sim._validation import ConfigError, check_float
from fedjax_sim.server.base import (CohortUpdates, ServerTransform, is_cohort,
                                    per_client_l2_norms, scale_per_client, zero_masked)

PyTree = Any

# Sensitivity of the centred unclipped-count query sum_i (b_i - 1/2) under add/remove of one
# client (Andrew et al. 2021, Sec. 3).
COUNT_SENSITIVITY = 0.5


class AdaptiveClipState(NamedTuple):
    """State of adaptive clipping.

    Attributes:
      clip_norm: float32 scalar, the clip norm the *next* update will use.
      key: PRNG key for the count noise, split on every update.
    """

    clip_norm: jax.Array
    key: jax.Array


def require_cohort(name: str, value: Any) -> None:
    """Raises TypeError unless ``value`` is stacked per-client updates."""
    if not is_cohort(value):
        raise TypeError(f"{name}: expects CohortUpdates (it acts per client)")


def check_key(field: str, key: Any) -> jax.Array:
    """Host-side check that ``key`` is a JAX PRNG key (raw uint32[2] or typed)."""
    if key is None:
        raise ConfigError(f"{field}=None: a PRNG key is required (keys are never defaulted)")
    if not hasattr(key, "dtype") or not (jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
                                         or (key.dtype == jnp.uint32 and key.shape == (2,))):
        raise ConfigError(f"{field}={key!r}: must be a jax.random key")
    return key


def clip_cohort(cohort: CohortUpdates, clip_norm: jax.Array | float) -> CohortUpdates:
    """Scales each client's update to global L2 norm ``<= clip_norm`` (zero stays zero)."""
    norms = per_client_l2_norms(cohort.updates)
    tiny = jnp.finfo(jnp.float32).tiny
    scales = jnp.minimum(1.0, clip_norm / jnp.maximum(norms, tiny))
    return cohort._replace(updates=scale_per_client(cohort.updates, scales))


def clip_per_client(clip_norm: float) -> ServerTransform:
    """Clips every client's update to global L2 norm at most ``clip_norm``.

    ``u_c <- u_c * min(1, S / ||u_c||_2)``, the per-user clipping of DP-FedAvg (McMahan et
    al. 2018, "Learning Differentially Private Recurrent Language Models"). Guarantee: after
    this transform every client's update has L2 norm ``<= S`` (up to float32 rounding, a
    relative ``~1e-6``), so the unweighted sum over clients has L2 sensitivity ``S`` under
    adding/removing one client. It is no privacy mechanism by itself: add noise
    (:func:`fedjax_sim.server.noise.gaussian_noise`) after a sum.

    Args:
      clip_norm: the bound ``S > 0``.

    Returns:
      A per-client ServerTransform with info ``{"name": "clip_per_client", "clip_norm": S,
      "sensitivity": S}``.
    """
    s = check_float("clip_norm", clip_norm, min_value=0.0, min_exclusive=True)

    def init(params):
        del params
        return ()

    def update(value, state):
        require_cohort("clip_per_client", value)
        return clip_cohort(zero_masked(value), s), state

    return ServerTransform(init, update,
                           {"name": "clip_per_client", "clip_norm": s, "sensitivity": s,
                            "per_client": True})


def zero_above_norm(max_norm: float) -> ServerTransform:
    """Drops clients whose update norm exceeds ``max_norm`` (norm-bound filtering).

    A dropped client gets ``mask=False``, ``weight=0`` and an all-zero update, so every later
    reducer ignores it exactly like a client that never reported. Unlike clipping this keeps
    the surviving updates unbiased but discards the whole contribution of large clients; it
    is the simple norm-bounding defence against boosted model-replacement updates (Sun et
    al. 2019, "Can You Really Backdoor Federated Learning?"). Guarantee: every surviving
    update has L2 norm ``<= max_norm``, so the unweighted sum has sensitivity ``max_norm``.
    Note that with DP the count of survivors varies with the data: normalise by a fixed
    expected weight, never by the survivor count.

    Args:
      max_norm: the bound ``> 0``.

    Returns:
      A per-client ServerTransform with info ``{"name": "zero_above_norm", "max_norm": B,
      "sensitivity": B}``.
    """
    b = check_float("max_norm", max_norm, min_value=0.0, min_exclusive=True)

    def init(params):
        del params
        return ()

    def update(value, state):
        require_cohort("zero_above_norm", value)
        cohort = zero_masked(value)
        keep = cohort.mask & (per_client_l2_norms(cohort.updates) <= b)
        return zero_masked(cohort._replace(mask=keep)), state

    return ServerTransform(init, update,
                           {"name": "zero_above_norm", "max_norm": b, "sensitivity": b})


def adaptive_clip_step(cohort: CohortUpdates, clip_norm: jax.Array, key: jax.Array, *,
                       target_quantile: float, learning_rate: float, count_noise_std: float,
                       expected_clients: float | None) -> tuple[CohortUpdates, jax.Array]:
    """Clips a (zero-masked) cohort at ``clip_norm`` and returns the next clip norm.

    Implements one step of Andrew et al. 2021, Alg. 1 with the centred count of Sec. 3:
    ``b_bar = (sum_i (b_i - 1/2) + N(0, sigma_b^2)) / m + 1/2`` with ``b_i = 1[||u_i|| <=
    C]`` and ``C' = C * exp(-eta * (b_bar - gamma))``. ``m`` is ``expected_clients`` or, if
    None, the number of unmasked clients (then an empty round leaves ``C`` unchanged).

    Args:
      cohort: zero-masked stacked updates.
      clip_norm: float32 scalar, the clip norm used this round.
      key: PRNG key for the count noise (used once).
      target_quantile: gamma.
      learning_rate: eta.
      count_noise_std: sigma_b.
      expected_clients: m, or None for the unmasked count.

    Returns:
      ``(clipped cohort, next clip norm)``.
    """
    norms = per_client_l2_norms(cohort.updates)
    unclipped = (norms <= clip_norm).astype(jnp.float32) - COUNT_SENSITIVITY
    centred = jnp.sum(jnp.where(cohort.mask, unclipped, 0.0))
    noisy = centred + count_noise_std * jax.random.normal(key, (), jnp.float32)
    num_valid = jnp.sum(cohort.mask.astype(jnp.float32))
    if expected_clients is None:
        denom = jnp.maximum(num_valid, 1.0)
    else:
        denom = jnp.float32(expected_clients)
    b_bar = noisy / denom + COUNT_SENSITIVITY
    new_clip = clip_norm * jnp.exp(-learning_rate * (b_bar - target_quantile))
    if expected_clients is None:
        new_clip = jnp.where(num_valid > 0, new_clip, clip_norm)
    return clip_cohort(cohort, clip_norm), new_clip.astype(jnp.float32)


def check_adaptive_args(initial_clip_norm, target_quantile, learning_rate, count_noise_std,
                        expected_clients) -> tuple[float, float, float, float, float | None]:
    """Host-side validation shared by :func:`adaptive_clip` and the adaptive DP-FedAvg."""
    c0 = check_float("initial_clip_norm", initial_clip_norm, min_value=0.0,
                     min_exclusive=True)
    gamma = check_float("target_quantile", target_quantile, min_value=0.0, max_value=1.0)
    eta = check_float("learning_rate", learning_rate, min_value=0.0)
    sigma_b = check_float("count_noise_std", count_noise_std, min_value=0.0)
    m = None if expected_clients is None else check_float(
        "expected_clients", expected_clients, min_value=0.0, min_exclusive=True)
    return c0, gamma, eta, sigma_b, m


def adaptive_clip(initial_clip_norm: float, target_quantile: float, learning_rate: float,
                  count_noise_std: float, *, key: jax.Array,
                  expected_clients: float | None = None) -> ServerTransform:
    """Clips per client at a norm that tracks a target quantile of the update norms.

    Andrew, Thakkar, McMahan, Ramaswamy 2021, "Differentially Private Learning with
    Adaptive Clipping": each round clips at the current ``C``, privately estimates the
    fraction ``b_bar`` of clients with ``||u_i|| <= C`` (a sum of centred indicators plus
    ``N(0, count_noise_std^2)``, divided by ``m``) and moves
    ``C <- C * exp(-learning_rate * (b_bar - target_quantile))``. In expectation ``C``
    converges to the ``target_quantile`` quantile of the norm distribution.

    Privacy: the count query has sensitivity 1/2 (``COUNT_SENSITIVITY``), so its noise
    multiplier is ``2 * count_noise_std``. Composed with a Gaussian sum of the clipped updates
    with noise ``z_delta * C`` (``C`` this round's clip norm), the round is a Gaussian
    mechanism with effective noise multiplier ``z = (z_delta^-2 + (2 sigma_b)^-2)^-1/2``
    (their Theorem 1; :func:`fedjax_sim.server.noise.effective_noise_multiplier`). The
    update noise must scale with the *current* clip norm, which a separate fixed
    ``gaussian_noise`` cannot see: for DP use
    ``dp_fedavg_aggregator(..., adaptive=True)``, which fuses the two. Standalone, this
    transform is meant for non-private or robust aggregation. With Poisson sampling pass
    ``expected_clients`` (the unmasked count is itself private).

    Args:
      initial_clip_norm: ``C_0 > 0``.
      target_quantile: ``gamma`` in ``[0, 1]`` (0.5: clip at the median norm).
      learning_rate: ``eta >= 0`` of the geometric update (the paper uses 0.2).
      count_noise_std: ``sigma_b >= 0``, std of the noise on the unclipped count (the paper
        recommends ``expected_clients / 20``).
      key: PRNG key for the count noise; kept in the state and split on every update.
      expected_clients: the denominator ``m``; None uses the number of unmasked clients.

    Returns:
      A per-client ServerTransform with state :class:`AdaptiveClipState` and info keys
      ``name, initial_clip_norm, target_quantile, learning_rate, count_noise_std,
      count_sensitivity, count_noise_multiplier, expected_clients, sensitivity`` (the last
      is None: it is the current clip norm, see :func:`current_clip_norm`).
    """
    c0, gamma, eta, sigma_b, m = check_adaptive_args(
        initial_clip_norm, target_quantile, learning_rate, count_noise_std, expected_clients)
    key = check_key("key", key)

    def init(params):
        del params
        return AdaptiveClipState(jnp.asarray(c0, jnp.float32), key)

    def update(value, state):
        require_cohort("adaptive_clip", value)
        next_key, count_key = jax.random.split(state.key)
        clipped, new_clip = adaptive_clip_step(
            zero_masked(value), state.clip_norm, count_key, target_quantile=gamma,
            learning_rate=eta, count_noise_std=sigma_b, expected_clients=m)
        return clipped, AdaptiveClipState(new_clip, next_key)

    info = {"name": "adaptive_clip", "initial_clip_norm": c0, "target_quantile": gamma,
            "learning_rate": eta, "count_noise_std": sigma_b,
            "count_sensitivity": COUNT_SENSITIVITY,
            "count_noise_multiplier": sigma_b / COUNT_SENSITIVITY,
            "expected_clients": m, "sensitivity": None}
    return ServerTransform(init, update, info)


def current_clip_norm(state: PyTree) -> jax.Array:
    """The clip norm held by the first adaptive-clipping state inside a (chained) state.

    Works on the state of :func:`adaptive_clip`, of ``dp_fedavg_aggregator(adaptive=True)``
    and of any chain containing them; usable inside jit (e.g. for round metrics).

    Args:
      state: a transform state pytree.

    Returns:
      float32 scalar, the clip norm the next round will use.
    """
    nodes = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, AdaptiveClipState))
    for node in nodes:
        if isinstance(node, AdaptiveClipState):
            return node.clip_norm
    raise ValueError("current_clip_norm: state holds no AdaptiveClipState")
