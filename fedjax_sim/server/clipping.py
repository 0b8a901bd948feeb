"""Per-client L2 clipping: fixed, norm-bound filtering and adaptive (quantile) clipping.

All three are ``CLIENT`` stages (:mod:`fedjax_sim.server.base`): they act on each
client's upload alone and run on the client, inside the round's chunks. The norm is the
*global* L2 norm of a client's whole upload pytree (all leaves together), which is what
the sensitivity of a sum over clients depends on.

Each declares its ``bound``: after the stage every unmasked client's upload has L2 norm
at most the bound, so an unweighted sum of the cohort has L2 sensitivity ``bound`` under
adding or removing one client (``2 * bound`` under replacing one). Weighted sums need
weights ``<= 1`` for that to hold. The privacy ledger reads the bound from the stage.

Clipping stages also record :class:`ClipDiagnostics` of the round in their state (the
clip norm used, the fraction of clients above it, their mean norm before clipping).
These are simulation diagnostics computed from the raw uploads; they are **not**
differentially private and are never released to the model.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_sim._trees import per_client_l2_norms, scale_per_client
from fedjax_sim._validation import ConfigError, check_float
from fedjax_sim.server.base import CohortUpdates, Stage, client_stage, zero_masked

PyTree = Any

# Sensitivity of the centred unclipped-count query sum_i (b_i - 1/2) under add/remove of one
# client (Andrew et al. 2021, Sec. 3).
COUNT_SENSITIVITY = 0.5


class ClipDiagnostics(NamedTuple):
    """Clipping statistics of the last round (float32 scalars; not DP, see module doc).

    Attributes:
      clip_norm: the clip norm used in the round.
      clipped_fraction: fraction of aggregated clients whose upload norm exceeded it.
      mean_update_norm: mean L2 norm of the aggregated clients' uploads before clipping.
    """

    clip_norm: jax.Array
    clipped_fraction: jax.Array
    mean_update_norm: jax.Array


class AdaptiveClipState(NamedTuple):
    """State of adaptive clipping.

    Attributes:
      clip_norm: float32 scalar, the clip norm the *next* round will use.
      key: PRNG key for the count noise, split on every round.
      diagnostics: the last round's :class:`ClipDiagnostics`.
    """

    clip_norm: jax.Array
    key: jax.Array
    diagnostics: ClipDiagnostics


def empty_diagnostics() -> ClipDiagnostics:
    zero = jnp.zeros((), jnp.float32)
    return ClipDiagnostics(zero, zero, zero)


def check_key(field: str, key: Any) -> jax.Array:
    """Host-side check that ``key`` is a JAX PRNG key (raw uint32[2] or typed)."""
    if key is None:
        raise ConfigError(f"{field}=None: a PRNG key is required (keys are never defaulted)")
    if not hasattr(key, "dtype") or not (jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
                                         or (key.dtype == jnp.uint32 and key.shape == (2,))):
        raise ConfigError(f"{field}={key!r}: must be a jax.random key")
    return key


def clip_cohort(cohort: CohortUpdates, clip_norm: jax.Array | float) -> CohortUpdates:
    """Scales each client's upload to global L2 norm ``<= clip_norm`` (zero stays zero)."""
    norms = per_client_l2_norms(cohort.updates)
    tiny = jnp.finfo(jnp.float32).tiny
    scales = jnp.minimum(1.0, clip_norm / jnp.maximum(norms, tiny))
    return cohort._replace(updates=scale_per_client(cohort.updates, scales))


def norm_stats(cohort: CohortUpdates, clip: jax.Array | float) -> jax.Array:
    """``[3]`` float32: (#clipped, #unmasked, sum of norms) of a zero-masked cohort or chunk."""
    norms = per_client_l2_norms(cohort.updates)
    valid = cohort.mask
    return jnp.stack([jnp.sum(valid & (norms > clip)).astype(jnp.float32),
                      jnp.sum(valid).astype(jnp.float32),
                      jnp.sum(jnp.where(valid, norms, 0.0))])


def diagnostics_from(stats: jax.Array, clip: jax.Array | float) -> ClipDiagnostics:
    """:class:`ClipDiagnostics` from the summed :func:`norm_stats` of a round."""
    n = jnp.maximum(stats[1], 1.0)
    return ClipDiagnostics(jnp.asarray(clip, jnp.float32), stats[0] / n, stats[2] / n)


def clip_per_client(clip_norm: float) -> Stage:
    """Clips every client's upload to global L2 norm at most ``clip_norm``.

    ``u_c <- u_c * min(1, S / ||u_c||_2)``, the per-user clipping of DP-FedAvg (McMahan et
    al. 2018, "Learning Differentially Private Recurrent Language Models"). Guarantee: after
    this stage every client's upload has L2 norm ``<= S`` (up to float32 rounding, a
    relative ``~1e-6``), so the unweighted sum over clients has L2 sensitivity ``S`` under
    adding/removing one client. It is no privacy mechanism by itself: add noise
    (:func:`fedjax_sim.server.noise.gaussian_noise`) after a sum.

    Args:
      clip_norm: the bound ``S > 0``.

    Returns:
      A ``CLIENT`` stage with ``bound = S``; its state is the round's
      :class:`ClipDiagnostics`.
    """
    s = check_float("clip_norm", clip_norm, min_value=0.0, min_exclusive=True)
    return client_stage(
        "clip_per_client", lambda cohort, state: clip_cohort(cohort, s),
        init=lambda params: empty_diagnostics(),
        stats=lambda cohort, state: norm_stats(cohort, s),
        advance=lambda total, state: diagnostics_from(total, s), bound=s)


def zero_above_norm(max_norm: float) -> Stage:
    """Drops clients whose upload norm exceeds ``max_norm`` (norm-bound filtering).

    A dropped client gets ``mask=False``, ``weight=0`` and an all-zero upload, so every
    later stage ignores it exactly like a client that never reported, and it is not
    counted in the round's ``num_aggregated``. Unlike clipping this keeps the surviving
    updates unbiased but discards the whole contribution of large clients; it is the
    simple norm-bounding defence against boosted model-replacement updates (Sun et al.
    2019, "Can You Really Backdoor Federated Learning?"). Guarantee: every surviving upload
    has L2 norm ``<= max_norm``, so the unweighted sum has sensitivity ``max_norm``. With
    DP the count of survivors varies with the data: normalise by a fixed expected weight,
    never by the survivor count.

    Args:
      max_norm: the bound ``> 0``.

    Returns:
      A stateless ``CLIENT`` stage with ``bound = max_norm``, marked ``server_side`` (the
      server checks each upload, which it cannot do behind secure aggregation).
    """
    b = check_float("max_norm", max_norm, min_value=0.0, min_exclusive=True)

    def apply(cohort, state):
        keep = cohort.mask & (per_client_l2_norms(cohort.updates) <= b)
        return zero_masked(cohort._replace(mask=keep))

    return client_stage("zero_above_norm", apply, bound=b, server_side=True)


def adaptive_count_stats(cohort: CohortUpdates, clip_norm: jax.Array) -> jax.Array:
    """``[2]``: the centred count ``sum_i (1[||u_i|| <= C] - 1/2)`` and the number of
    unmasked clients, of a zero-masked cohort or chunk (additive over chunks)."""
    norms = per_client_l2_norms(cohort.updates)
    unclipped = (norms <= clip_norm).astype(jnp.float32) - COUNT_SENSITIVITY
    return jnp.stack([jnp.sum(jnp.where(cohort.mask, unclipped, 0.0)),
                      jnp.sum(cohort.mask.astype(jnp.float32))])


def next_clip_norm(count_stats: jax.Array, clip_norm: jax.Array, key: jax.Array, *,
                   target_quantile: float, learning_rate: float, count_noise_std: float,
                   expected_clients: float | None) -> jax.Array:
    """The next clip norm from a round's summed :func:`adaptive_count_stats`.

    One step of Andrew et al. 2021, Alg. 1 with the centred count of Sec. 3:
    ``b_bar = (sum_i (b_i - 1/2) + N(0, sigma_b^2)) / m + 1/2`` and
    ``C' = C * exp(-eta * (b_bar - gamma))``. ``m`` is ``expected_clients`` or, if None,
    the number of unmasked clients (then an empty round leaves ``C`` unchanged).
    """
    centred, num_valid = count_stats[0], count_stats[1]
    noisy = centred + count_noise_std * jax.random.normal(key, (), jnp.float32)
    denom = (jnp.maximum(num_valid, 1.0) if expected_clients is None
             else jnp.float32(expected_clients))
    b_bar = noisy / denom + COUNT_SENSITIVITY
    new_clip = clip_norm * jnp.exp(-learning_rate * (b_bar - target_quantile))
    if expected_clients is None:
        new_clip = jnp.where(num_valid > 0, new_clip, clip_norm)
    return new_clip.astype(jnp.float32)


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


def adaptive_state_stats(cohort: CohortUpdates, state: AdaptiveClipState) -> tuple:
    """The per-chunk statistics adaptive clipping sums: (count stats, norm stats)."""
    return adaptive_count_stats(cohort, state.clip_norm), norm_stats(cohort, state.clip_norm)


def adaptive_clip(initial_clip_norm: float, target_quantile: float, learning_rate: float,
                  count_noise_std: float, *, key: jax.Array,
                  expected_clients: float | None = None) -> Stage:
    """Clips per client at a norm that tracks a target quantile of the upload norms.

    Andrew, Thakkar, McMahan, Ramaswamy 2021, "Differentially Private Learning with
    Adaptive Clipping": each round clips at the current ``C``, privately estimates the
    fraction ``b_bar`` of clients with ``||u_i|| <= C`` (a sum of centred indicators plus
    ``N(0, count_noise_std^2)``, divided by ``m``) and moves
    ``C <- C * exp(-learning_rate * (b_bar - target_quantile))``. In expectation ``C``
    converges to the ``target_quantile`` quantile of the norm distribution. The count is a
    per-round statistic summed over the round's chunks, so the stage streams.

    Privacy: the count query has sensitivity 1/2 (``COUNT_SENSITIVITY``), so its noise
    multiplier is ``2 * count_noise_std``. Composed with a Gaussian sum of the clipped
    uploads with noise ``z_delta * C`` (``C`` this round's clip norm), the round is a
    Gaussian mechanism with effective noise multiplier ``z = (z_delta^-2 +
    (2 sigma_b)^-2)^-1/2`` (their Theorem 1;
    :func:`fedjax_sim.privacy.effective_noise_multiplier`). The update noise must scale
    with the *current* clip norm, which a separate fixed ``gaussian_noise`` cannot see:
    for DP use ``dp_fedavg_aggregator(..., adaptive=True)``, which fuses the two.
    Standalone, this stage is meant for non-private or robust aggregation. With Poisson
    sampling pass ``expected_clients`` (the unmasked count is itself private).

    Args:
      initial_clip_norm: ``C_0 > 0``.
      target_quantile: ``gamma`` in ``[0, 1]`` (0.5: clip at the median norm).
      learning_rate: ``eta >= 0`` of the geometric update (the paper uses 0.2).
      count_noise_std: ``sigma_b >= 0``, std of the noise on the unclipped count (the paper
        recommends ``expected_clients / 20``).
      key: PRNG key for the count noise; kept in the state and split on every round.
      expected_clients: the denominator ``m``; None uses the number of unmasked clients.

    Returns:
      A ``CLIENT`` stage with state :class:`AdaptiveClipState` and a bound kept in the
      state (``bound_of(state)`` is the clip norm of the next round).
    """
    c0, gamma, eta, sigma_b, m = check_adaptive_args(
        initial_clip_norm, target_quantile, learning_rate, count_noise_std, expected_clients)
    key = check_key("key", key)

    def init(params):
        del params
        return AdaptiveClipState(jnp.asarray(c0, jnp.float32), key, empty_diagnostics())

    def advance(total, state):
        count_stats, clip_stats = total
        next_key, count_key = jax.random.split(state.key)
        new_clip = next_clip_norm(count_stats, state.clip_norm, count_key,
                                  target_quantile=gamma, learning_rate=eta,
                                  count_noise_std=sigma_b, expected_clients=m)
        return AdaptiveClipState(new_clip, next_key,
                                 diagnostics_from(clip_stats, state.clip_norm))

    return client_stage("adaptive_clip", lambda cohort, state: clip_cohort(
        cohort, state.clip_norm), init=init, stats=adaptive_state_stats, advance=advance,
        bound="state", bound_of=lambda state: state.clip_norm)


def clip_diagnostics(transform_state: PyTree) -> ClipDiagnostics | None:
    """The :class:`ClipDiagnostics` inside a (chain's) state, or None."""
    nodes = jax.tree.leaves(transform_state, is_leaf=lambda x: isinstance(x, ClipDiagnostics))
    return next((n for n in nodes if isinstance(n, ClipDiagnostics)), None)
