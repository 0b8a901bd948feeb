"""The server side of a run: the aggregator registry, the chain and the privacy plan.

:func:`build_chain` assembles, left to right::

    [compress] -> [norm filter] -> [clip] -> reducer -> [noise -> / expected cohort]

``compress`` is ``stochastic_quantize(quantize_bits)`` or ``top_k_sparsify(top_k_fraction)``
(before clipping, so that clipping bounds what is summed); the norm filter is
``zero_above_norm(norm_bound)``; ``clip`` is ``clip_per_client(clip_norm)`` or, with
``adaptive_clipping``, quantile-tracking clipping; the reducer is the ``aggregator``:

* ``mean``: FedAvg's weighted mean;
* ``dp_fedavg`` (McMahan et al. 2018): clip, unweighted sum, Gaussian noise
  ``N(0, (z S)^2)``, divide by the expected cohort; with adaptive clipping the fused
  variant of Andrew et al. 2021 whose effective multiplier is ``z``;
* ``dp_ftrl`` (Kairouz et al. 2021): clip, unweighted sum, online tree-aggregation noise
  (node std ``z S``, tree restarted every ``ftrl_restart_rounds`` rounds, by default one
  pass ``num_clients // cohort_size``), divide by ``cohort_size``, under a cyclic
  sampler (the tree's guarantee assumes a data-independent schedule and claims no
  amplification by sampling);
* the robust reducers ``median``, ``trimmed_mean``, ``krum``, ``multi_krum``,
  ``bulyan``, ``geometric_median``, ``centered_clipping``, ``dnc``.

DP noise only comes with ``dp_fedavg``/``dp_ftrl``: a robust reducer is not a sum, so the
Gaussian mechanism's sensitivity analysis does not cover it. DP runs weight every client
1 (``weighting`` automatic resolves to uniform; explicit ``examples`` is an error). The
:class:`PrivacyPlan` resolves delta (``num_clients ** -1.1`` by default: strictly below
1/N, as Ponomareva et al. 2023 recommend), calibrates ``z`` from ``target_epsilon`` for
``rounds`` rounds of the sampler's schedule, and sizes a DP Poisson cohort so that
``rounds * P[overflow] <= 1e-3 * delta``. The ledger itself is read from the chain that
runs (:func:`fedjax_sim.privacy.ledger_for`).

Diagnostics in ``metrics.jsonl`` (training loss, the fraction of clients clipped, ...)
are computed from raw client data for the simulation's sake; they are not covered by the
guarantee, only the models are.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from fedjax_sim._validation import fail
from fedjax_sim.experiment.registry import Entry, Registry
from fedjax_sim.experiment.sampling import expected_cohort
from fedjax_sim.experiment.secure import secure_settings, secure_stage
from fedjax_sim.privacy import (calibrate_dp_ftrl_noise_multiplier,
                                calibrate_noise_multiplier, dp_ftrl_participation,
                                poisson_overflow_probability)
from fedjax_sim.privacy.distributed import calibrate_distributed
from fedjax_sim.sampling import Sampler
from fedjax_sim.server import (Chain, Stage, adaptive_clip, bulyan, centered_clipping, chain,
                               clip_per_client, coordinate_median, dp_fedavg_aggregator,
                               dp_ftrl_aggregator, dp_mean_normalize, gaussian_noise,
                               geometric_median, krum, multi_krum,
                               stochastic_quantize, top_k_sparsify, trimmed_mean,
                               weighted_mean, zero_above_norm)

OVERFLOW_BUDGET = 1e-3  # whole-run probability of a truncated Poisson cohort, / delta
_DEFAULT_POISSON_TAIL = 1e-10
_SERVER_KEY_TAG = 1_000_003


def server_key(base_key: jax.Array) -> jax.Array:
    """The server stages' PRNG key (noise, quantisation), derived from the run's key."""
    return jax.random.fold_in(base_key, _SERVER_KEY_TAG)


def default_delta(num_clients: int) -> float:
    """``num_clients ** -1.1`` (capped at 0.5): strictly below 1/N, shrinking with N."""
    return min(float(num_clients) ** -1.1, 0.5)


@dataclasses.dataclass(frozen=True)
class AggregatorMeta:
    """Facts about an aggregator.

    Attributes:
      mechanism: ``"gaussian"`` or ``"tree"`` for the DP aggregators, else None.
      min_cohort: ``cfg -> the smallest cohort the reducer's guarantee needs``.
      secure: for a sum, ``(cfg, context, secure_sum stage) -> chain``: the aggregator
        behind secure aggregation (:mod:`fedjax_sim.experiment.secure`); None for a
        reducer that is not a sum.
    """

    mechanism: str | None = None
    min_cohort: Callable[[Any], int] | None = None
    secure: Callable[[Any, Any, Stage], Chain] | None = None


@dataclasses.dataclass(frozen=True)
class PrivacyPlan:
    """What the server section decided about privacy.

    Attributes:
      dp: the run adds DP noise (and is accounted).
      noise_multiplier: the z the chain runs with (0 without DP).
      delta: the target delta (resolved; reported even without DP).
      calibrated: z was calibrated from ``target_epsilon``.
      overflow_tail: a DP Poisson cohort's per-round overflow bound (None otherwise).
      ftrl_max_rounds: the DP-FTRL tree size (None without DP-FTRL).
      notes: one-line messages for the user.
    """

    dp: bool
    noise_multiplier: float
    delta: float
    calibrated: bool = False
    overflow_tail: float | None = None
    ftrl_max_rounds: int | None = None
    notes: tuple[str, ...] = ()


def _mechanism(cfg: Any) -> str | None:
    return REGISTRY[cfg.server.aggregator].meta.mechanism


def is_dp(cfg: Any) -> bool:
    """True when the run adds DP noise: a DP aggregator with a noise multiplier or a
    target epsilon."""
    s = cfg.server
    return _mechanism(cfg) is not None and (s.noise_multiplier is not None
                                            or s.target_epsilon is not None)


def resolved_delta(cfg: Any) -> float:
    return cfg.server.delta if cfg.server.delta is not None else default_delta(
        cfg.data.num_clients)


# ------------------------------------------------------------------ the rules (checks)

def _check_clipping(cfg: Any) -> None:
    """Rules of the fields every aggregator shares: clipping and compression."""
    s = cfg.server
    if s.adaptive_clipping and s.clip_norm is None:
        fail("adaptive_clipping", True, "needs clip_norm > 0 (the initial clip norm)")
    for name in ("target_quantile", "clip_learning_rate"):
        if getattr(s, name) is not None and not s.adaptive_clipping:
            fail(name, getattr(s, name), "only applies with adaptive_clipping=true")
    if s.quantize_bits is not None and s.top_k_fraction is not None:
        fail("top_k_fraction", s.top_k_fraction,
             f"pick one compressor: quantize_bits={s.quantize_bits} is also set")


def _check_noise(cfg: Any) -> None:
    """Rules shared by the DP aggregators (noise, delta, weighting)."""
    s = cfg.server
    z, eps = s.noise_multiplier, s.target_epsilon
    if z is not None and eps is not None:
        fail("target_epsilon", eps, f"give noise_multiplier or target_epsilon, not both "
             f"(noise_multiplier={z!r})")
    noisy = ("noise_multiplier", z) if z is not None else ("target_epsilon", eps)
    if noisy[1] is not None and s.clip_norm is None:
        fail(*noisy, "Gaussian noise needs a bound on each client's update: set clip_norm "
             "> 0 (the noise std is noise_multiplier * clip_norm)")
    if s.clip_norm is None:
        fail("clip_norm", s.clip_norm, f"aggregator={s.aggregator!r} needs clip_norm > 0 "
             "(each client's bound in the sum)")
    if cfg.algorithm.weighting == "examples":
        fail("weighting", "examples", f"{s.aggregator} weights every client 1 so the sum's "
             "sensitivity is clip_norm (McMahan et al. 2018); use weighting='uniform' or "
             "leave it automatic")
    if is_dp(cfg) and s.delta is not None and s.delta >= 1.0 / cfg.data.num_clients:
        fail("delta", s.delta, f"must be < 1/num_clients = {1.0 / cfg.data.num_clients:g} "
             "(a delta of 1/N allows releasing one client's data in the clear)")


def _check_dp_fedavg(cfg: Any) -> None:
    s = cfg.server
    _check_noise(cfg)
    dp = is_dp(cfg)
    if dp and cfg.sampling.kind == "cyclic":
        fail("sampling", "cyclic", "DP-FedAvg's accounting relies on random (fixed-size or "
             "Poisson) sampling; a cyclic schedule has no sampling to amplify privacy (use "
             "aggregator='dp_ftrl' for cyclic participation)")
    if s.adaptive_clipping and not dp:
        fail("adaptive_clipping", True, "with aggregator='dp_fedavg' and no noise the private "
             "quantile estimate protects nothing; set noise_multiplier or target_epsilon, or "
             "use aggregator='mean' for non-private adaptive clipping")
    z, m = s.noise_multiplier, expected_cohort(cfg)
    if s.adaptive_clipping and z is not None and z >= m / 10:
        fail("noise_multiplier", z, f"adaptive clipping spends noise std expected_cohort/20 "
             f"= {m / 20:g} on the clipped count, which caps noise_multiplier below "
             f"{m / 10:g}; use a larger cohort or adaptive_clipping=false")
    if dp and s.accountant == "pld" and cfg.sampling.kind == "fixed":
        fail("accountant", "pld", "dp-accounting's PLD accountant does not support "
             "fixed-size sampling (replace-one, without replacement); use sampling='poisson' "
             "or accountant='rdp'")


def _ftrl_pass(cfg: Any) -> int:
    return cfg.data.num_clients // cfg.sampling.cohort_size


def _check_dp_ftrl(cfg: Any) -> None:
    s = cfg.server
    if cfg.sampling.kind != "cyclic":
        fail("sampling", cfg.sampling.kind, "aggregator='dp_ftrl' needs sampling='cyclic': "
             "the tree mechanism's guarantee assumes a data-independent participation "
             "schedule, and amplification by sampling is not claimed")
    if s.noise_multiplier is None and s.target_epsilon is None:
        if s.clip_norm is None:
            fail("clip_norm", None, "aggregator='dp_ftrl' needs clip_norm > 0 (each "
                 "client's bound in the sum)")
        fail("noise_multiplier", None, "aggregator='dp_ftrl' needs noise_multiplier > 0 "
             "(tree-node noise std / clip_norm) or target_epsilon > 0")
    _check_noise(cfg)
    if s.adaptive_clipping:
        fail("adaptive_clipping", True, "not with aggregator='dp_ftrl': adaptive clipping's "
             "noised count of unclipped clients is not a tree query, so the tree accounting "
             "would not cover it; use a fixed clip_norm")
    if s.accountant != "rdp":
        fail("accountant", s.accountant, "DP-FTRL is accounted with RDP (dp-accounting's "
             "tree-aggregation event); use accountant='rdp'")
    per_pass = _ftrl_pass(cfg)
    if s.ftrl_restart_rounds is not None and s.ftrl_restart_rounds > per_pass:
        fail("ftrl_restart_rounds", s.ftrl_restart_rounds,
             f"exceeds one pass over the population, num_clients // cohort_size = {per_pass} "
             "rounds: a client would contribute twice to one tree, which the tree "
             "accounting does not cover")
    if (s.ftrl_restart_rounds or per_pass) >= 2 ** 30:
        fail("ftrl_restart_rounds", s.ftrl_restart_rounds, "a tree of 2**30 rounds or more "
             "is too large; set a smaller restart period")


def _check_min_cohort(cfg: Any) -> None:
    entry = REGISTRY[cfg.server.aggregator]
    need = entry.meta.min_cohort(cfg)
    cohort = expected_cohort(cfg)
    if cohort < need:
        f = cfg.server.num_byzantine or 0
        what = "expected cohort" if cfg.sampling.kind == "poisson" else "cohort"
        fail("num_byzantine", f, f"{entry.name} needs cohort >= {need}, got {what} "
             f"{cohort:g}")
    selected = cfg.server.multi_krum_selected
    if selected is not None and selected > cohort:
        fail("multi_krum_selected", selected, f"exceeds the "
             f"{'expected ' if cfg.sampling.kind == 'poisson' else ''}cohort {cohort:g}")


def _robust_check(cfg: Any) -> None:
    _check_clipping(cfg)
    _check_min_cohort(cfg)


def _dp_check(specific: Callable[[Any], None]) -> Callable[[Any], None]:
    def check(cfg: Any) -> None:
        specific(cfg)
        _check_clipping(cfg)

    return check


# ---------------------------------------------------------------- reducer builders
# A builder: (cfg, context) -> the reducer chain (with its own clipping and noise for the
# DP aggregators). ``context`` holds what the plan resolved.

@dataclasses.dataclass(frozen=True)
class ChainContext:
    """What a reducer builder may use besides the configuration."""

    sampler: Sampler
    plan: PrivacyPlan
    noise_key: jax.Array
    clip_key: jax.Array
    upload_dim: int | None = None


def _f(cfg: Any) -> int:
    return cfg.server.num_byzantine or 0


def _dp_fedavg(cfg: Any, ctx: ChainContext) -> Chain:
    s = cfg.server
    return dp_fedavg_aggregator(
        s.clip_norm, ctx.plan.noise_multiplier, expected_cohort(cfg), key=ctx.noise_key,
        adaptive=s.adaptive_clipping, target_quantile=0.5 if s.target_quantile is None
        else s.target_quantile, clip_learning_rate=0.2 if s.clip_learning_rate is None
        else s.clip_learning_rate)


def _dp_ftrl(cfg: Any, ctx: ChainContext) -> Chain:
    return dp_ftrl_aggregator(cfg.server.clip_norm, ctx.plan.noise_multiplier,
                              cfg.sampling.cohort_size, ctx.plan.ftrl_max_rounds,
                              key=ctx.noise_key, efficient=cfg.server.ftrl_efficient)


def _secure_mean(cfg: Any, ctx: ChainContext, secure: Stage) -> Chain:
    return chain(secure)  # the secure sum divides by its survivors itself


def _secure_dp_fedavg(cfg: Any, ctx: ChainContext, secure: Stage) -> Chain:
    if secure.mechanism is not None:  # distributed DP: the clients added the noise
        return chain(secure, dp_mean_normalize(expected_cohort(cfg)))
    # Central noise on the decoded sum, scaled to the bound the sum has after rounding.
    return chain(secure, gaussian_noise(ctx.plan.noise_multiplier, secure.bound,
                                        key=ctx.noise_key),
                 dp_mean_normalize(expected_cohort(cfg)))


def _secure_dp_ftrl(cfg: Any, ctx: ChainContext, secure: Stage) -> Chain:
    plain = dp_ftrl_aggregator(secure.bound, ctx.plan.noise_multiplier,
                               cfg.sampling.cohort_size, ctx.plan.ftrl_max_rounds,
                               key=ctx.noise_key, efficient=cfg.server.ftrl_efficient)
    return chain(secure, *plain.post)  # the tree noise and the division, after the sum


def _multi_krum(cfg: Any, ctx: ChainContext) -> Stage:
    f = _f(cfg)
    selected = cfg.server.multi_krum_selected or max(1, int(expected_cohort(cfg)) - f)
    return multi_krum(f, min(selected, ctx.sampler.capacity))


def _dnc(cfg: Any, ctx: ChainContext) -> Stage:
    from fedjax_sim.server import dnc

    return dnc(_f(cfg), key=jax.random.fold_in(ctx.clip_key, 1))


_CLIPPING = frozenset({"clip_norm", "adaptive_clipping", "target_quantile",
                       "clip_learning_rate", "norm_bound", "quantize_bits", "top_k_fraction"})
_NOISE = frozenset({"noise_multiplier", "target_epsilon", "delta", "accountant"})
_NOISE_REASON = ("DP noise needs aggregator='dp_fedavg' or 'dp_ftrl' (clip, sum, noise), got "
                 "aggregator={cfg.server.aggregator!r}; robust reducers are not sums, so the "
                 "Gaussian mechanism's sensitivity analysis does not cover them")
REGISTRY = Registry("aggregators", "server", "aggregator", governed={
    **{k: None for k in _CLIPPING}, "noise_multiplier": _NOISE_REASON,
    "target_epsilon": _NOISE_REASON, "delta": None, "accountant": None,
    "ftrl_restart_rounds": None, "ftrl_efficient": None, "num_byzantine": None,
    "trim_fraction": None, "multi_krum_selected": None, "centered_clipping_tau": None})


def _robust(name: str, build, help: str, uses=(), min_cohort=lambda cfg: 1) -> Entry:
    return REGISTRY.add(Entry(name, build, help, uses=_CLIPPING | frozenset(uses),
                              check=_robust_check, meta=AggregatorMeta(min_cohort=min_cohort)))


REGISTRY.add(Entry("mean", lambda cfg, ctx: weighted_mean(), "FedAvg's weighted mean",
                   uses=_CLIPPING, check=_robust_check,
                   meta=AggregatorMeta(min_cohort=lambda cfg: 1, secure=_secure_mean)))
REGISTRY.add(Entry("dp_fedavg", _dp_fedavg, "DP-FedAvg: clip, sum, Gaussian noise, / "
                   "expected cohort", uses=_CLIPPING | _NOISE,
                   check=_dp_check(_check_dp_fedavg),
                   meta=AggregatorMeta("gaussian", secure=_secure_dp_fedavg)))
REGISTRY.add(Entry("dp_ftrl", _dp_ftrl, "DP-FTRL: clip, sum, tree-aggregation noise",
                   uses=_CLIPPING | _NOISE | {"ftrl_restart_rounds", "ftrl_efficient"},
                   check=_dp_check(_check_dp_ftrl),
                   meta=AggregatorMeta("tree", secure=_secure_dp_ftrl)))
_robust("median", lambda cfg, ctx: coordinate_median(), "coordinate-wise median")
_robust("trimmed_mean", lambda cfg, ctx: trimmed_mean(
    0.1 if cfg.server.trim_fraction is None else cfg.server.trim_fraction),
    "coordinate-wise trimmed mean", uses={"trim_fraction"})
_robust("krum", lambda cfg, ctx: krum(_f(cfg)), "Krum", uses={"num_byzantine"},
        min_cohort=lambda cfg: 2 * _f(cfg) + 3)
_robust("multi_krum", _multi_krum, "Multi-Krum", uses={"num_byzantine",
                                                      "multi_krum_selected"},
        min_cohort=lambda cfg: 2 * _f(cfg) + 3)
_robust("bulyan", lambda cfg, ctx: bulyan(_f(cfg)), "Bulyan", uses={"num_byzantine"},
        min_cohort=lambda cfg: 4 * _f(cfg) + 3)
_robust("geometric_median", lambda cfg, ctx: geometric_median(), "geometric median "
        "(smoothed Weiszfeld)")
_robust("centered_clipping", lambda cfg, ctx: centered_clipping(
    cfg.server.centered_clipping_tau or 1.0), "centred clipping around the last aggregate",
        uses={"centered_clipping_tau"})
_robust("dnc", _dnc, "Divide-and-Conquer (Shejwalkar & Houmansadr 2021)",
        uses={"num_byzantine"}, min_cohort=lambda cfg: 2 * _f(cfg) + 1)


# ------------------------------------------------------------------------- the plan

def privacy_plan(cfg: Any) -> PrivacyPlan:
    """The privacy decisions that need no data (DP or not, delta, the overflow tail)."""
    delta = resolved_delta(cfg)
    notes = []
    dp = is_dp(cfg)
    ftrl = None
    if REGISTRY[cfg.server.aggregator].meta.mechanism == "tree":
        ftrl = cfg.server.ftrl_restart_rounds or _ftrl_pass(cfg)
        from fedjax_sim.experiment.algorithms import REGISTRY as ALGORITHMS
        if not ALGORITHMS[cfg.algorithm.name].meta.plain_sgd_server:
            notes.append(f"note: algorithm={cfg.algorithm.name!r} post-processes DP-FTRL's "
                         "noisy prefix sums (same guarantee), but its server step is not "
                         "FTRL; use fedavg, fedsgd or fedprox for DP-FTRL proper")
    if not dp:
        why = (f"aggregator={cfg.server.aggregator!r} adds no noise"
               if _mechanism(cfg) is None else "no noise_multiplier or target_epsilon")
        notes.append(f"note: this run has no formal DP guarantee ({why}); epsilon is "
                     "reported as infinite (JSON null)")
    tail = None
    if dp and cfg.sampling.kind == "poisson":
        tail = min(_DEFAULT_POISSON_TAIL, OVERFLOW_BUDGET * delta / cfg.sampling.rounds)
    return PrivacyPlan(dp=dp, noise_multiplier=cfg.server.noise_multiplier or 0.0,
                       delta=delta, overflow_tail=tail, ftrl_max_rounds=ftrl,
                       notes=tuple(notes))


def calibrated(cfg: Any, plan: PrivacyPlan, sampler: Sampler,
               upload_dim: int | None = None) -> PrivacyPlan:
    """The plan with ``z`` calibrated from ``target_epsilon`` (when set), and the Poisson
    overflow checked against the budget. Distributed DP calibrates with the scale its
    encoding uses for each z (which needs ``upload_dim``) and the expected survivors."""
    s = cfg.server
    if plan.dp and cfg.sampling.kind == "poisson":
        overflow = cfg.sampling.rounds * poisson_overflow_probability(
            sampler.spec.rate, sampler.num_clients, sampler.capacity)
        if overflow > OVERFLOW_BUDGET * plan.delta * (1 + 1e-6):
            fail("sampling_rate", cfg.sampling.sampling_rate, "a Poisson cohort would "
                 f"overflow its capacity {sampler.capacity} with probability "
                 f"{overflow:.2g} over the run (> {OVERFLOW_BUDGET:g}*delta)")
    if not (plan.dp and s.target_epsilon is not None):
        return plan
    rounds = cfg.sampling.rounds
    if cfg.secure.mechanism != "none":
        def scale_for(z: float) -> float:
            return secure_settings(cfg, dim=_upload_dim(upload_dim),
                                   capacity=sampler.capacity, noise_multiplier=z).scale

        settings = secure_settings(cfg, dim=_upload_dim(upload_dim),
                                   capacity=sampler.capacity, noise_multiplier=1.0)
        z = calibrate_distributed(
            s.target_epsilon, plan.delta, rounds, cfg.secure.mechanism,
            clip_norm=s.clip_norm, bits=settings.bits, dim=settings.padded,
            expected_clients=settings.expected_clients, sampling=sampler.spec,
            beta=settings.beta, k_stddevs=settings.k_stddevs, scale=scale_for,
            dropout=settings.dropout)
    elif _mechanism(cfg) == "tree":
        per_pass = sampler.spec.rounds_per_pass
        z = calibrate_dp_ftrl_noise_multiplier(
            s.target_epsilon, plan.delta, rounds, max_rounds=plan.ftrl_max_rounds,
            participation=dp_ftrl_participation(rounds, per_pass))
    else:
        z = calibrate_noise_multiplier(s.target_epsilon, plan.delta, rounds, sampler.spec,
                                       accountant=s.accountant)
    m = expected_cohort(cfg)
    if s.adaptive_clipping and z >= m / 10:
        fail("target_epsilon", s.target_epsilon, f"needs noise_multiplier {z:.4g}, but "
             f"adaptive clipping's count noise (std expected_cohort/20) caps it below "
             f"{m / 10:g}; use a larger cohort, more epsilon or adaptive_clipping=false")
    note = (f"calibrated noise_multiplier={z:.4f} for target_epsilon={s.target_epsilon:g} "
            f"over {rounds} rounds at delta={plan.delta:.3g}")
    return dataclasses.replace(plan, noise_multiplier=float(z), calibrated=True,
                               notes=plan.notes + (note,))


def _upload_dim(upload_dim: int | None) -> int:
    if upload_dim is None:
        fail("upload_dim", None, "secure aggregation needs the upload's size")
    return upload_dim


def build_chain(cfg: Any, *, sampler: Sampler, plan: PrivacyPlan, key: jax.Array,
                upload_dim: int | None = None) -> Chain:
    """The server chain of ``cfg`` (module docstring). ``key`` seeds its noise and
    randomised compression (:func:`server_key` of the run's key); ``upload_dim`` is the
    number of coordinates a client uploads (needed by secure aggregation)."""
    s = cfg.server
    noise_key, compress_key, clip_key = jax.random.split(key, 3)
    pre: list[Stage | Chain] = []
    if s.quantize_bits is not None:
        pre.append(stochastic_quantize(s.quantize_bits, key=compress_key))
    if s.top_k_fraction is not None:
        pre.append(top_k_sparsify(fraction=s.top_k_fraction))
    if s.norm_bound is not None:
        pre.append(zero_above_norm(s.norm_bound))
    entry = REGISTRY[s.aggregator]
    if cfg.secure.enabled:  # the secure sum clips, encodes and sums on its own
        stage = secure_stage(cfg, dim=_upload_dim(upload_dim), capacity=sampler.capacity,
                             noise_multiplier=plan.noise_multiplier,
                             key=jax.random.fold_in(noise_key, 2))
        return entry.meta.secure(cfg, ChainContext(sampler, plan, noise_key, clip_key,
                                                   upload_dim), stage)
    if entry.meta.mechanism is None and s.clip_norm is not None:
        if s.adaptive_clipping:  # Non-private: no noise on the count.
            pre.append(adaptive_clip(
                s.clip_norm, 0.5 if s.target_quantile is None else s.target_quantile,
                0.2 if s.clip_learning_rate is None else s.clip_learning_rate, 0.0,
                key=clip_key))
        else:
            pre.append(clip_per_client(s.clip_norm))
    core = entry.build(cfg, ChainContext(sampler, plan, noise_key, clip_key))
    return chain(*pre, core)


__all__ = ["AggregatorMeta", "ChainContext", "OVERFLOW_BUDGET", "PrivacyPlan", "REGISTRY",
           "build_chain", "calibrated", "default_delta", "is_dp", "privacy_plan",
           "resolved_delta", "server_key"]
