"""From an :class:`~fedjax_sim.config.ExperimentConfig` to the server side of a run.

:func:`build_server` turns the config's server fields into

* the **sampler** (for DP with Poisson sampling, its padded capacity is chosen so that a
  truncated cohort is negligible over the whole run, see below);
* the **server transform chain**, left to right::

      [compress]  ->  [clip]  ->  reducer  ->  [noise  ->  / expected cohort]

  ``compress`` is ``stochastic_quantize(quantize_bits)`` or
  ``top_k_sparsify(top_k_fraction)`` (before clipping, so that clipping bounds what is
  summed, as :mod:`fedjax_sim.server.compression` requires); ``clip`` is
  ``clip_per_client(clip_norm)`` or, with ``adaptive_clipping``, quantile-tracking
  clipping; the reducer is the ``aggregator``. ``aggregator="dp_fedavg"`` is
  :func:`~fedjax_sim.server.noise.dp_fedavg_aggregator`: clip, unweighted sum, Gaussian
  noise ``N(0, (z S)^2)``, divide by the expected cohort (``cohort_size`` for fixed-size
  sampling, ``sampling_rate * num_clients`` for Poisson); with adaptive clipping it is
  the fused variant of Andrew et al. 2021 whose effective multiplier is ``z``.
  ``aggregator="dp_ftrl"`` is :func:`~fedjax_sim.server.dp_ftrl.dp_ftrl_aggregator`:
  clip, unweighted sum, DP-FTRL tree noise (node std ``z S``, tree restarted every
  ``cfg.ftrl_max_rounds`` rounds; Honaker's estimator with ``ftrl_efficient``), divide
  by ``cohort_size``, under a :class:`~fedjax_sim.sampling.CyclicSampler` (seeded by
  ``cfg.seed``);
* the **privacy** settings: the noise multiplier (given, or calibrated from
  ``target_epsilon`` with :func:`~fedjax_sim.privacy.calibrate_noise_multiplier` for
  ``rounds`` rounds of the sampler's :class:`~fedjax_sim.privacy.SamplingSpec` at
  ``delta``) and the resolved ``delta``.

The accountant itself is built by :func:`accountant_for` from what runs:
``privacy_spec_from_transform_infos(transform_infos(transform), sampling_spec(sampler))``
(DP-FedAvg), or for DP-FTRL a :class:`~fedjax_sim.privacy.accounting.DPFTRLAccountant`
from the tree transform's own info and the cyclic sampler's pass length, so the ledger
cannot drift from the chain the round executes.

Guarantee of a DP run (``cfg.dp``): the sequence of all released global models is
(epsilon, delta)-DP at the client level, with add/remove-one-client adjacency for
Poisson sampling and replace-one-client adjacency for fixed-size sampling (see
:mod:`fedjax_sim.privacy.accounting`), under its assumptions: one update per client per
round, the noise key secret, and no cohort truncation. Truncation: a Poisson cohort is
padded to a static capacity; the capacity is set so that
``rounds * P[Binomial(N, q) > capacity] <= 1e-3 * delta`` (reported as
``poisson_overflow_probability``), which changes delta by a negligible amount.
DP-FTRL runs have replace-one-client-with-zero adjacency instead, and assume the cyclic
order is fixed in advance and puts a client at most once in each tree (see
:class:`~fedjax_sim.privacy.accounting.DPFTRLAccountant`).
Diagnostics in ``metrics.jsonl`` (training loss, the fraction of clients clipped, ...)
are computed from raw client data for the simulation's sake; they are not covered by the
guarantee, only the models are.

Clip diagnostics: when a clipping transform runs, :func:`with_clip_diagnostics` wraps the
clip-and-reduce part and records in its state, per round, the clip norm used, the
fraction of aggregated clients whose update norm exceeded it and their mean update norm
(before clipping). It streams like the chain it wraps (one extra norm per client).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_sim._validation import fail
from fedjax_sim.config import ExperimentConfig
from fedjax_sim.config import PLAIN_SGD_ALGORITHMS
from fedjax_sim.privacy import (Accountant, PrivacyConfig, SamplingSpec,
                                calibrate_noise_multiplier, poisson_overflow_probability,
                                privacy_spec_from_transform_infos)
from fedjax_sim.privacy.accounting import (DPFTRLAccountant,
                                           calibrate_dp_ftrl_noise_multiplier,
                                           cyclic_rounds_per_pass,
                                           dp_ftrl_accountant_from_transform_infos,
                                           dp_ftrl_participation)
from fedjax_sim.sampling import CyclicSampler, FixedSizeSampler, PoissonSampler, Sampler
from fedjax_sim.server import (AdaptiveClipState, CohortUpdates, ServerTransform, chain,
                               clip_per_client, per_client_l2_norms, transform_infos,
                               weighted_mean, zero_masked)
from fedjax_sim.server.base import StreamingReducer
from fedjax_sim.server.clipping import adaptive_clip
from fedjax_sim.server.compression import stochastic_quantize, top_k_sparsify
from fedjax_sim.server.dp_ftrl import dp_ftrl_aggregator
from fedjax_sim.server.noise import dp_fedavg_aggregator
from fedjax_sim.server.pairwise import bulyan, krum, multi_krum
from fedjax_sim.server.reducers import (centered_clipping, coordinate_median,
                                        geometric_median, trimmed_mean)

PyTree = Any

# Whole-run probability of a truncated Poisson cohort, relative to delta.
OVERFLOW_BUDGET = 1e-3
_DEFAULT_POISSON_TAIL = 1e-10


def default_delta(num_clients: int) -> float:
    """``num_clients ** -1.1`` (capped at 0.5): strictly below 1/N, shrinking with N."""
    return min(float(num_clients) ** -1.1, 0.5)


def resolved_delta(cfg: ExperimentConfig) -> float:
    """``cfg.delta``, or :func:`default_delta` of the population when it is 0."""
    return cfg.delta if cfg.delta > 0 else default_delta(cfg.num_clients)


def poisson_capacity(num_clients: int, rate: float, tail: float) -> int:
    """Smallest capacity ``M`` with ``P[Binomial(num_clients, rate) > M] <= tail``.

    Exact for tails far below what ``scipy.stats.binom.isf`` resolves (it is only used as
    the starting point of a doubling-and-bisection search on the survival function).
    """
    from scipy import stats

    if rate >= 1.0:
        return num_clients
    lo = int(stats.binom.isf(max(tail, 1e-15), num_clients, rate))
    lo = max(0, min(lo, num_clients))
    if stats.binom.sf(lo, num_clients, rate) <= tail:
        return max(1, lo)
    step = max(1, int(math.sqrt(num_clients * rate * (1 - rate))))
    hi = lo + step
    while hi < num_clients and stats.binom.sf(hi, num_clients, rate) > tail:
        lo, hi, step = hi, hi + 2 * step, 2 * step
    hi = min(hi, num_clients)
    while hi - lo > 1:  # invariant: sf(lo) > tail >= sf(hi)
        mid = (lo + hi) // 2
        if stats.binom.sf(mid, num_clients, rate) > tail:
            lo = mid
        else:
            hi = mid
    return max(1, hi)


def make_sampler(cfg: ExperimentConfig, num_clients: int) -> Sampler:
    """The config's sampler; a DP Poisson run gets an overflow-safe capacity."""
    if cfg.sampling in ("fixed", "cyclic"):
        if cfg.cohort_size > num_clients:
            fail("cohort_size", cfg.cohort_size, f"exceeds num_clients={num_clients}")
        if cfg.sampling == "cyclic":
            return CyclicSampler(num_clients, cfg.cohort_size, seed=cfg.seed)
        return FixedSizeSampler(num_clients, cfg.cohort_size)
    if not cfg.dp:  # The sampler's default: overflow below 1e-10 per round.
        return PoissonSampler(num_clients, cfg.sampling_rate)
    tail = min(_DEFAULT_POISSON_TAIL, OVERFLOW_BUDGET * resolved_delta(cfg) / cfg.rounds)
    return PoissonSampler(num_clients, cfg.sampling_rate,
                          max_cohort=poisson_capacity(num_clients, cfg.sampling_rate, tail))


def sampling_spec(sampler: Sampler) -> SamplingSpec:
    """The accounting view of a random sampler, read from its ``privacy_sampling``."""
    s = sampler.privacy_sampling
    if s["sampling"] not in ("poisson", "fixed"):
        fail("sampling", s["sampling"], "has no sampling amplification to account; a "
             "cyclic schedule is accounted with DP-FTRL (aggregator='dp_ftrl')")
    if s["sampling"] == "poisson":
        return SamplingSpec.poisson(s["rate"], population_size=s["num_clients"])
    return SamplingSpec.fixed(s["cohort_size"], s["num_clients"])


def privacy_config_for(transform: ServerTransform, sampler: Sampler, *, accountant: str,
                       delta: float) -> PrivacyConfig:
    """The :class:`PrivacyConfig` of one round of ``transform`` under ``sampler``."""
    return privacy_spec_from_transform_infos(transform_infos(transform),
                                             sampling_spec(sampler), accountant=accountant,
                                             delta=delta)


def rounds_per_pass(sampler: Sampler) -> int:
    """A cyclic sampler's no-repeat window, ``num_clients // cohort_size`` rounds."""
    s = sampler.privacy_sampling
    if s["sampling"] != "cyclic":
        fail("sampling", s["sampling"], "DP-FTRL is accounted only under a cyclic schedule "
             "(a data-independent order in which a client is at most once per tree)")
    return cyclic_rounds_per_pass(s["num_clients"], s["cohort_size"])


def accountant_for(transform: ServerTransform, sampler: Sampler, *, accountant: str,
                   delta: float) -> Accountant | DPFTRLAccountant:
    """The privacy ledger of ``transform`` run under ``sampler``, read from the chain.

    A chain with a DP-FTRL tree transform gets a
    :class:`~fedjax_sim.privacy.accounting.DPFTRLAccountant` (its noise multiplier and tree
    size from the transform's info, the no-repeat window from the cyclic sampler); any
    other noisy chain an :class:`~fedjax_sim.privacy.Accountant` of
    :func:`privacy_config_for`.
    """
    infos = transform_infos(transform)
    flat = list(_flat_infos(infos))
    if any(i.get("name") == "dp_ftrl_tree" for i in flat):
        if accountant != "rdp":
            fail("accountant", accountant, "DP-FTRL is accounted with rdp")
        return dp_ftrl_accountant_from_transform_infos(
            infos, rounds_per_pass=rounds_per_pass(sampler), delta=delta)
    return Accountant(privacy_config_for(transform, sampler, accountant=accountant,
                                         delta=delta))


def _flat_infos(infos):
    for info in infos:
        if "chain" in info:
            yield from _flat_infos(info["chain"])
        else:
            yield info


# ------------------------------------------------------------------ clip diagnostics


class ClipDiagnostics(NamedTuple):
    """Per-round clipping statistics (float32 scalars) of the last round.

    Attributes:
      clip_norm: the clip norm used in the round.
      clipped_fraction: fraction of aggregated clients whose update norm exceeded it.
      mean_update_norm: mean L2 norm of the aggregated clients' updates before clipping.
    """

    clip_norm: jax.Array
    clipped_fraction: jax.Array
    mean_update_norm: jax.Array


def _clip_norm_in(state: PyTree, fixed: float | None) -> jax.Array:
    if fixed is not None:
        return jnp.float32(fixed)
    nodes = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, AdaptiveClipState))
    for node in nodes:
        if isinstance(node, AdaptiveClipState):
            return node.clip_norm
    raise ValueError("with_clip_diagnostics: no fixed clip norm and no adaptive clip state")


def _norm_stats(cohort: CohortUpdates, clip: jax.Array) -> jax.Array:
    """``[3]``: (#clipped, #aggregated, sum of norms) of a cohort or chunk."""
    cohort = zero_masked(cohort)
    norms = per_client_l2_norms(cohort.updates)
    valid = cohort.mask
    return jnp.stack([jnp.sum(valid & (norms > clip)).astype(jnp.float32),
                      jnp.sum(valid).astype(jnp.float32),
                      jnp.sum(jnp.where(valid, norms, 0.0))])


def _diagnostics(stats: jax.Array, clip: jax.Array) -> ClipDiagnostics:
    n = jnp.maximum(stats[1], 1.0)
    return ClipDiagnostics(clip.astype(jnp.float32), stats[0] / n, stats[2] / n)


def with_clip_diagnostics(transform: ServerTransform,
                          clip_norm: float | None = None) -> ServerTransform:
    """Wraps a clip-then-reduce transform so that its state records :class:`ClipDiagnostics`.

    The wrapped transform runs unchanged (same output, same ``info``, so privacy
    accounting sees through the wrapper); streaming is kept when the inner transform
    streams. Statistics are simulation diagnostics computed from the raw updates: they
    are *not* differentially private.

    Args:
      transform: a reducer chain starting with clipping.
      clip_norm: the fixed clip norm, or None to read the current one from the
        :class:`~fedjax_sim.server.clipping.AdaptiveClipState` inside the inner state.

    Returns:
      A ServerTransform with state ``(inner_state, ClipDiagnostics)``.
    """

    def init(params):
        zero = jnp.zeros((), jnp.float32)
        return transform.init(params), ClipDiagnostics(zero, zero, zero)

    def update(value, state):
        inner_state, _ = state
        clip = _clip_norm_in(inner_state, clip_norm)
        stats = _norm_stats(value, clip)
        out, inner_state = transform.update(value, inner_state)
        return out, (inner_state, _diagnostics(stats, clip))

    streaming = None
    if transform.streaming is not None:
        inner = transform.streaming

        def partial(chunk, state):
            clip = _clip_norm_in(state[0], clip_norm)
            return inner.partial(chunk, state[0]), _norm_stats(chunk, clip)

        def finalize(total, state):
            contribution, stats = total
            clip = _clip_norm_in(state[0], clip_norm)
            out, inner_state = inner.finalize(contribution, state[0])
            return out, (inner_state, _diagnostics(stats, clip))

        streaming = StreamingReducer(partial, finalize)
    return ServerTransform(init, update, transform.info, streaming)


def clip_diagnostics(transform_state: PyTree) -> ClipDiagnostics | None:
    """The :class:`ClipDiagnostics` inside a transform state, or None."""
    nodes = jax.tree.leaves(transform_state,
                            is_leaf=lambda x: isinstance(x, ClipDiagnostics))
    return next((n for n in nodes if isinstance(n, ClipDiagnostics)), None)


# ------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class ServerPlan:
    """What :func:`build_server` decided.

    Attributes:
      sampler: the round's sampler.
      transform: the server transform chain.
      weighting: the resolved client weighting for ``make_algorithm``.
      dp: True when the chain adds DP noise (the run is accounted).
      noise_multiplier: the z the chain runs with (0 without DP).
      delta: the target delta (resolved; reported even without DP).
      calibrated: True when z was calibrated from ``target_epsilon``.
      clipping: True when a clipping transform runs (clip diagnostics are recorded).
      poisson_overflow_probability: ``rounds * P[cohort overflow]`` for Poisson, else 0.
      notes: one-line messages for the user (host side).
      ftrl_max_rounds: the DP-FTRL tree size the chain runs with (0 without DP-FTRL).
    """

    sampler: Sampler
    transform: ServerTransform
    weighting: str
    dp: bool
    noise_multiplier: float
    delta: float
    calibrated: bool
    clipping: bool
    poisson_overflow_probability: float
    notes: tuple[str, ...] = ()
    ftrl_max_rounds: int = 0


_SERVER_KEY_TAG = 1_000_003


def server_key(base_key: jax.Array) -> jax.Array:
    """The server transforms' PRNG key (noise, quantisation), derived from the run's key."""
    return jax.random.fold_in(base_key, _SERVER_KEY_TAG)


def _reducer(cfg: ExperimentConfig, capacity: int) -> ServerTransform:
    agg, f = cfg.aggregator, cfg.num_byzantine
    if agg == "mean":
        return weighted_mean()
    if agg == "median":
        return coordinate_median()
    if agg == "trimmed_mean":
        return trimmed_mean(cfg.trim_fraction)
    if agg == "krum":
        return krum(f)
    if agg == "multi_krum":
        selected = cfg.multi_krum_selected or max(1, int(cfg.expected_cohort) - f)
        return multi_krum(f, min(selected, capacity))
    if agg == "bulyan":
        return bulyan(f)
    if agg == "geometric_median":
        return geometric_median()
    if agg == "centered_clipping":
        return centered_clipping(cfg.centered_clipping_tau)
    raise AssertionError(agg)  # unreachable: validated by ExperimentConfig


def _check_adaptive_noise(cfg: ExperimentConfig, z: float) -> None:
    if cfg.adaptive_clipping and z >= cfg.expected_cohort / 10:
        fail("target_epsilon", cfg.target_epsilon,
             f"needs noise_multiplier {z:.4g}, but adaptive clipping's count noise (std "
             f"expected_cohort/20) caps it below {cfg.expected_cohort / 10:g}; use a larger "
             "cohort, more epsilon or adaptive_clipping=false")


def build_server(cfg: ExperimentConfig, *, key: jax.Array,
                 num_clients: int | None = None) -> ServerPlan:
    """Builds the sampler, the server chain and the privacy settings of ``cfg``.

    Args:
      cfg: the validated configuration.
      key: PRNG key for the chain's noise and randomised compression (e.g.
        :func:`server_key` of the run's key); it is never reused elsewhere.
      num_clients: the population size (default ``cfg.num_clients``).

    Returns:
      The :class:`ServerPlan`.

    Raises:
      ConfigError: when ``target_epsilon`` cannot be met with these settings.
    """
    n = cfg.num_clients if num_clients is None else num_clients
    sampler = make_sampler(cfg, n)
    delta = resolved_delta(cfg)
    notes = []
    z = cfg.noise_multiplier
    calibrated = False
    ftrl_max_rounds = 0
    if cfg.aggregator == "dp_ftrl":
        ftrl_max_rounds = cfg.ftrl_restart_rounds or rounds_per_pass(sampler)
        if ftrl_max_rounds > rounds_per_pass(sampler):
            fail("ftrl_restart_rounds", cfg.ftrl_restart_rounds,
                 f"exceeds one pass over the {n} clients ({rounds_per_pass(sampler)} rounds)")
        if cfg.algorithm not in PLAIN_SGD_ALGORITHMS:
            notes.append(f"note: algorithm={cfg.algorithm!r} post-processes DP-FTRL's noisy "
                         "prefix sums (same guarantee), but its server step is not FTRL; "
                         "use fedavg, fedsgd or fedprox for DP-FTRL proper")
    if cfg.dp and cfg.target_epsilon > 0:
        if cfg.aggregator == "dp_ftrl":
            z = calibrate_dp_ftrl_noise_multiplier(
                cfg.target_epsilon, delta, cfg.rounds, max_rounds=ftrl_max_rounds,
                participation=dp_ftrl_participation(cfg.rounds, rounds_per_pass(sampler)))
        else:
            z = calibrate_noise_multiplier(cfg.target_epsilon, delta, cfg.rounds,
                                           sampling_spec(sampler), accountant=cfg.accountant)
        calibrated = True
        _check_adaptive_noise(cfg, z)
        notes.append(f"calibrated noise_multiplier={z:.4f} for target_epsilon="
                     f"{cfg.target_epsilon:g} over {cfg.rounds} rounds at delta={delta:.3g}")
    noise_key, compress_key, clip_key = jax.random.split(key, 3)

    pre = []
    if cfg.quantize_bits:
        pre.append(stochastic_quantize(cfg.quantize_bits, key=compress_key))
    if cfg.top_k_fraction:
        pre.append(top_k_sparsify(fraction=cfg.top_k_fraction))

    clipping = cfg.clip_norm > 0
    fixed_clip = None if cfg.adaptive_clipping else cfg.clip_norm
    if cfg.aggregator == "dp_ftrl":
        core = dp_ftrl_aggregator(cfg.clip_norm, z, cfg.cohort_size, ftrl_max_rounds,
                                  key=noise_key, efficient=cfg.ftrl_efficient)
    elif cfg.aggregator == "dp_fedavg":
        core = dp_fedavg_aggregator(cfg.clip_norm, z, cfg.expected_cohort, key=noise_key,
                                    adaptive=cfg.adaptive_clipping,
                                    target_quantile=cfg.target_quantile,
                                    clip_learning_rate=cfg.clip_learning_rate)
    else:
        core = _reducer(cfg, sampler.capacity)
        if cfg.adaptive_clipping:  # Non-private: no noise on the count.
            core = chain(adaptive_clip(cfg.clip_norm, cfg.target_quantile,
                                       cfg.clip_learning_rate, 0.0, key=clip_key,
                                       expected_clients=None), core)
        elif clipping:
            core = chain(clip_per_client(cfg.clip_norm), core)
    if clipping:
        core = with_clip_diagnostics(core, fixed_clip)
    transform = chain(*pre, core) if pre else core

    overflow = 0.0
    if cfg.sampling == "poisson":
        overflow = cfg.rounds * poisson_overflow_probability(cfg.sampling_rate, n,
                                                             sampler.capacity)
        if cfg.dp and overflow > OVERFLOW_BUDGET * delta * (1 + 1e-6):
            fail("sampling_rate", cfg.sampling_rate,
                 f"a Poisson cohort would overflow its capacity {sampler.capacity} with "
                 f"probability {overflow:.2g} over the run (> {OVERFLOW_BUDGET:g}*delta)")
    if not cfg.dp:
        why = ("noise_multiplier=0" if cfg.aggregator == "dp_fedavg"
               else f"aggregator={cfg.aggregator!r} adds no noise")
        notes.append(f"note: this run has no formal DP guarantee ({why}); epsilon is "
                     "reported as infinite (JSON null)")
    return ServerPlan(sampler=sampler, transform=transform, weighting=cfg.client_weighting,
                      dp=cfg.dp, noise_multiplier=float(z) if cfg.dp else 0.0, delta=delta,
                      calibrated=calibrated, clipping=clipping,
                      poisson_overflow_probability=float(overflow), notes=tuple(notes),
                      ftrl_max_rounds=ftrl_max_rounds)


__all__ = ["ClipDiagnostics", "OVERFLOW_BUDGET", "ServerPlan", "accountant_for",
           "build_server", "clip_diagnostics", "default_delta", "make_sampler",
           "poisson_capacity", "privacy_config_for", "resolved_delta", "rounds_per_pass",
           "sampling_spec", "server_key", "with_clip_diagnostics"]
