"""Client-level DP accounting for federated rounds, on top of Google's ``dp-accounting``.

What is accounted: one round releases the sum of the sampled clients' clipped updates
(L2 norm <= ``clip_norm`` each, one update per client per round) plus Gaussian noise of
standard deviation ``noise_multiplier * clip_norm`` (scaled alike if the server divides
by a *fixed* denominator). The unit of privacy is a **client** (all of its examples):
client-level DP as in McMahan et al. 2018, "Learning Differentially Private Recurrent
Language Models". Every model the server releases after every round is covered (the
guarantee is on the whole sequence of noised aggregates; anything computed from them is
post-processing).

Sampling and the neighbouring relation:

* ``poisson`` (rate q): every client joins a round independently with probability q. The
  event is ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` under **add/remove-one-client**
  adjacency, where the L2 sensitivity of the sum is ``clip_norm``. Assumes no sampled
  client is ever dropped: if the sampler pads to a maximum cohort and could overflow,
  pick the maximum so that :func:`poisson_overflow_probability` is negligible (a dropped
  client breaks the Poisson analysis; dp-accounting's ``TruncatedSubsampledGaussianDpEvent``
  covers random truncation but is not wired here).
* ``fixed`` (cohort m of population n, uniformly without replacement): the event is
  ``SampledWithoutReplacementDpEvent(n, m, GaussianDpEvent(z / 2))`` under
  **replace-one-client** adjacency (the population size n is public). Replacing a client
  moves the sum by up to ``2 * clip_norm``, so the Gaussian's noise multiplier relative to
  that sensitivity is ``z / 2`` (the same convention as jax_privacy's
  ``clipping.py`` / ``accounting/analysis.py``). Replace-one epsilons are not comparable
  one-to-one with add/remove epsilons (replace-one is roughly add/remove composed twice).
  Only the RDP accountant supports this event (dp-accounting 0.6.0's PLD accountant
  rejects it); asking for ``accountant="pld"`` raises a :class:`ConfigError`.

Not covered: data-dependent denominators (a weighted mean whose total weight depends on
the cohort), clients contributing more than one update per round, adaptive choices of the
noise or cohort from private data, secure-aggregation or quantisation effects, privacy
of the sampling outcome itself, and DP-FTRL (tree aggregation, no sampling), which has
its own module, :mod:`fedjax_sim.privacy.dp_ftrl_accounting` (its names are re-exported
here).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import dp_accounting
import numpy as np
from dp_accounting.pld import privacy_loss_distribution as _pld_lib
from dp_accounting.rdp import rdp_privacy_accountant as _rdp_lib

from fedjax_sim._validation import (ConfigError, check_choice, check_float, check_int,
                                    fail)

SAMPLING_KINDS = ("poisson", "fixed")
ACCOUNTANTS = ("rdp", "pld")
DP_FTRL_PARTICIPATION = ("once", "once_per_tree")

_NeighborRel = dp_accounting.NeighboringRelation


# --------------------------------------------------------------------------- specs


def _check_delta(field: str, delta: Any) -> float:
    return check_float(field, delta, min_value=0.0, max_value=1.0, min_exclusive=True,
                       max_exclusive=True)


def _check_noise_multiplier(field: str, z: Any) -> float:
    return check_float(field, z, min_value=0.0, min_exclusive=True)


@dataclasses.dataclass(frozen=True)
class SamplingSpec:
    """How a round's cohort is drawn, as far as privacy accounting is concerned.

    Build it with :meth:`poisson` or :meth:`fixed`.

    Attributes:
      kind: ``"poisson"`` or ``"fixed"``.
      rate: Poisson inclusion probability q in (0, 1] (``None`` for fixed).
      cohort_size: fixed cohort size m (``None`` for Poisson).
      population_size: population size n; required for fixed, optional for Poisson
        (informational, e.g. for :func:`poisson_overflow_probability`).
    """

    kind: str
    rate: float | None = None
    cohort_size: int | None = None
    population_size: int | None = None

    def __post_init__(self):
        check_choice("sampling.kind", self.kind, SAMPLING_KINDS)
        if self.population_size is not None:
            check_int("sampling.population_size", self.population_size, min_value=1)
        if self.kind == "poisson":
            if self.rate is None:
                fail("sampling.rate", self.rate, "Poisson sampling needs a rate q in (0, 1]")
            check_float("sampling.rate", self.rate, min_value=0.0, max_value=1.0,
                        min_exclusive=True)
            if self.cohort_size is not None:
                fail("sampling.cohort_size", self.cohort_size,
                     "Poisson sampling has no fixed cohort size (use kind='fixed')")
        else:
            if self.rate is not None:
                fail("sampling.rate", self.rate,
                     "fixed-size sampling takes cohort_size and population_size, not a rate")
            if self.cohort_size is None:
                fail("sampling.cohort_size", self.cohort_size,
                     "fixed-size sampling needs a cohort size m >= 1")
            if self.population_size is None:
                fail("sampling.population_size", self.population_size,
                     "fixed-size sampling needs the population size n")
            m = check_int("sampling.cohort_size", self.cohort_size, min_value=1)
            if m > self.population_size:
                fail("sampling.cohort_size", m,
                     f"must be <= population_size={self.population_size}")
            object.__setattr__(self, "cohort_size", m)
        if self.rate is not None:
            object.__setattr__(self, "rate", float(self.rate))
        if self.population_size is not None:
            object.__setattr__(self, "population_size", int(self.population_size))

    @classmethod
    def poisson(cls, rate: float, *, population_size: int | None = None) -> "SamplingSpec":
        """Poisson sampling: each client joins a round independently with probability ``rate``."""
        return cls("poisson", rate=rate, population_size=population_size)

    @classmethod
    def fixed(cls, cohort_size: int, population_size: int) -> "SamplingSpec":
        """Uniform fixed-size sampling of ``cohort_size`` clients out of ``population_size``."""
        return cls("fixed", cohort_size=cohort_size, population_size=population_size)

    @property
    def sampling_probability(self) -> float:
        """A client's chance to be in a given round: q, or m / n."""
        if self.kind == "poisson":
            return float(self.rate)
        return self.cohort_size / self.population_size

    @property
    def neighboring_relation(self) -> dp_accounting.NeighboringRelation:
        """Add/remove-one-client for Poisson, replace-one-client for fixed-size."""
        if self.kind == "poisson":
            return _NeighborRel.ADD_OR_REMOVE_ONE
        return _NeighborRel.REPLACE_ONE

    def describe(self) -> str:
        if self.kind == "poisson":
            return f"poisson(q={self.rate:g})"
        return f"fixed(m={self.cohort_size}, n={self.population_size})"


@dataclasses.dataclass(frozen=True)
class PrivacyConfig:
    """The mechanism one round runs, plus how to account for it.

    Attributes:
      noise_multiplier: z = (std of the Gaussian noise on the sum) / clip_norm, > 0.
      sampling: a :class:`SamplingSpec`.
      accountant: ``"rdp"`` (default; cheap per-round queries) or ``"pld"`` (tighter,
        Poisson only, ~10-100 ms per newly composed round).
      delta: default target delta in (0, 1) for :meth:`Accountant.epsilon` (optional).
      pld_value_discretization: PLD discretisation interval (pessimistic rounding, so the
        epsilon stays an upper bound; smaller is tighter and slower).
    """

    noise_multiplier: float
    sampling: SamplingSpec
    accountant: str = "rdp"
    delta: float | None = None
    pld_value_discretization: float = 1e-4

    def __post_init__(self):
        object.__setattr__(self, "noise_multiplier",
                           _check_noise_multiplier("noise_multiplier", self.noise_multiplier))
        if not isinstance(self.sampling, SamplingSpec):
            fail("sampling", self.sampling, "must be a SamplingSpec")
        check_choice("accountant", self.accountant, ACCOUNTANTS)
        if self.delta is not None:
            object.__setattr__(self, "delta", _check_delta("delta", self.delta))
        check_float("pld_value_discretization", self.pld_value_discretization,
                    min_value=0.0, min_exclusive=True, max_value=1.0)
        _check_accountant_supports(self.accountant, self.sampling)

    def round_event(self) -> dp_accounting.DpEvent:
        """The DP event of one round (see :func:`dp_event`)."""
        return dp_event(self.noise_multiplier, self.sampling)


def _check_accountant_supports(accountant: str, sampling: SamplingSpec) -> None:
    if accountant == "pld" and sampling.kind == "fixed":
        pld = dp_accounting.pld.PLDAccountant(sampling.neighboring_relation)
        if not pld.supports(dp_event(1.0, sampling)):
            fail("accountant", accountant,
                 "dp-accounting's PLD accountant does not support fixed-size sampling "
                 "(SampledWithoutReplacementDpEvent); use accountant='rdp'")


def dp_event(noise_multiplier: float, sampling: SamplingSpec) -> dp_accounting.DpEvent:
    """The dp-accounting event of one round.

    Args:
      noise_multiplier: z, the noise std divided by the clip norm (the add/remove
        sensitivity of the sum of clipped client updates).
      sampling: how the cohort is drawn.

    Returns:
      ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` for Poisson sampling (add/remove
      adjacency), ``SampledWithoutReplacementDpEvent(n, m, GaussianDpEvent(z / 2))`` for
      fixed-size sampling (replace-one adjacency: the sum's sensitivity is 2 * clip_norm).
    """
    z = _check_noise_multiplier("noise_multiplier", noise_multiplier)
    if not isinstance(sampling, SamplingSpec):
        fail("sampling", sampling, "must be a SamplingSpec")
    if sampling.kind == "poisson":
        return dp_accounting.PoissonSampledDpEvent(float(sampling.rate),
                                                   dp_accounting.GaussianDpEvent(z))
    return dp_accounting.SampledWithoutReplacementDpEvent(
        int(sampling.population_size), int(sampling.cohort_size),
        dp_accounting.GaussianDpEvent(z / 2.0))


def make_dp_accounting_accountant(accountant: str, sampling: SamplingSpec,
                                  pld_value_discretization: float = 1e-4
                                  ) -> dp_accounting.PrivacyAccountant:
    """A fresh dp-accounting accountant with the neighbouring relation ``sampling`` needs."""
    check_choice("accountant", accountant, ACCOUNTANTS)
    if accountant == "rdp":
        return dp_accounting.rdp.RdpAccountant(
            neighboring_relation=sampling.neighboring_relation)
    return dp_accounting.pld.PLDAccountant(
        sampling.neighboring_relation, value_discretization_interval=pld_value_discretization)


def poisson_overflow_probability(rate: float, population_size: int, max_cohort: int) -> float:
    """P[Binomial(population_size, rate) > max_cohort]: one round's chance that a Poisson
    cohort padded to ``max_cohort`` would have to drop clients (which the Poisson
    guarantee does not cover)."""
    from scipy import stats
    q = check_float("rate", rate, min_value=0.0, max_value=1.0, min_exclusive=True)
    n = check_int("population_size", population_size, min_value=1)
    c = check_int("max_cohort", max_cohort, min_value=0)
    return float(stats.binom.sf(c, n, q))


# --------------------------------------------------------------------------- accountant


class Accountant:
    """Host-side privacy ledger: record rounds as they run, ask for epsilon at any time.

    Guarantee: after ``rounds`` recorded rounds, the sequence of every round's noised
    aggregate is (epsilon, delta)-DP at the client level, with the adjacency of
    ``config.sampling`` (add/remove-one-client for Poisson, replace-one for fixed-size),
    under the assumptions listed in this module's docstring.

    Cost: RDP computes one round's RDP curve once; each epsilon query is then O(number of
    orders) (composition is ``rounds * rdp_one_round``) and cached by (rounds, delta).
    PLD composes newly recorded rounds incrementally into a stored PLD on the next
    query (one PLD convolution per query, ~10-100 ms), also cached.
    """

    def __init__(self, config: PrivacyConfig):
        if not isinstance(config, PrivacyConfig):
            fail("config", config, "must be a PrivacyConfig")
        self._config = config
        self._event = config.round_event()
        self._rounds = 0
        self._cache: dict[tuple[int, float], float] = {}
        self._rdp_orders: np.ndarray | None = None
        self._rdp_one: np.ndarray | None = None
        self._pld_one = None
        self._pld = None
        self._pld_rounds = 0

    @property
    def config(self) -> PrivacyConfig:
        return self._config

    @property
    def rounds(self) -> int:
        """Number of rounds recorded so far."""
        return self._rounds

    @property
    def noise_multiplier(self) -> float:
        """The accounted z (``config.noise_multiplier``)."""
        return self._config.noise_multiplier

    @property
    def round_event(self) -> dp_accounting.DpEvent:
        return self._event

    def ledger(self) -> dp_accounting.DpEvent:
        """Everything recorded so far as one dp-accounting event."""
        return dp_accounting.SelfComposedDpEvent(self._event, self._rounds)

    def record_round(self, count: int = 1) -> None:
        """Records ``count`` more rounds of the configured mechanism (host side, O(1))."""
        count = check_int("count", count, min_value=0)
        self._rounds += count

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon of everything recorded so far at ``delta`` (default: ``config.delta``)."""
        if delta is None:
            delta = self._config.delta
            if delta is None:
                fail("delta", delta, "pass a delta in (0, 1) or set PrivacyConfig.delta")
        delta = _check_delta("delta", delta)
        if self._rounds == 0:
            return 0.0
        key = (self._rounds, delta)
        if key not in self._cache:
            if self._config.accountant == "rdp":
                orders, rdp = self.rdp()
                eps = _rdp_lib.compute_epsilon(orders, rdp, delta)[0]
            else:
                eps = self._pld_up_to_date().get_epsilon_for_delta(delta)
            self._cache[key] = float(eps)
        return self._cache[key]

    def rdp(self) -> tuple[np.ndarray, np.ndarray]:
        """``(orders, rdp)`` of everything recorded so far (RDP accountant only)."""
        if self._config.accountant != "rdp":
            fail("accountant", self._config.accountant, "rdp() needs accountant='rdp'")
        if self._rdp_one is None:
            acc = make_dp_accounting_accountant("rdp", self._config.sampling)
            acc.compose(self._event)
            self._rdp_orders, self._rdp_one = acc.orders, acc.rdp
        return self._rdp_orders.copy(), self._rounds * self._rdp_one

    def _pld_up_to_date(self):
        cfg = self._config
        if self._pld_one is None:
            self._pld_one = _pld_lib.from_gaussian_mechanism(
                standard_deviation=cfg.noise_multiplier,
                sampling_prob=cfg.sampling.sampling_probability,
                value_discretization_interval=cfg.pld_value_discretization,
                neighboring_relation=cfg.sampling.neighboring_relation)
        pending = self._rounds - self._pld_rounds
        if pending > 0:
            step = self._pld_one if pending == 1 else self._pld_one.self_compose(pending)
            self._pld = step if self._pld is None else self._pld.compose(step)
            self._pld_rounds = self._rounds
        return self._pld


def epsilon_for(rounds: int, config: PrivacyConfig, delta: float | None = None) -> float:
    """Epsilon after ``rounds`` rounds of ``config``'s mechanism (see :class:`Accountant`).

    Args:
      rounds: number of rounds, >= 0.
      config: the mechanism and accountant.
      delta: target delta (default ``config.delta``).
    """
    rounds = check_int("rounds", rounds, min_value=0)
    acc = Accountant(config)
    acc.record_round(rounds)
    return acc.epsilon(delta)


def _calibrate(target: float, delta: float, tol: float, eps: Callable[[float], float],
               make_accountant: Callable[[], Any],
               make_event: Callable[[float], dp_accounting.DpEvent]) -> float:
    """Smallest z (within ``tol``) with ``eps(z) <= target``.

    Brackets z by doubling / halving, runs dp-accounting's ``calibrate_dp_mechanism``
    (Brent's method) on the bracket, then steps up by ``tol`` until ``eps(z)`` meets the
    target (the accountant path and ``eps`` may differ in the last bits).
    """
    hi = 1.0
    while eps(hi) > target:
        hi *= 2.0
        if hi > 2.0 ** 24:
            fail("target_epsilon", target,
                 f"unreachable with noise multiplier <= {2.0 ** 24:g} for these settings")
    lo = hi / 2.0
    while eps(lo) <= target:
        hi = lo
        lo /= 2.0
        if lo < 1e-6:
            return hi
    z = float(dp_accounting.calibrate_dp_mechanism(
        make_accountant, make_event, target, delta,
        bracket_interval=dp_accounting.ExplicitBracketInterval(lo, hi), tol=tol))
    while eps(z) > target:
        z += tol
    return z


def calibrate_noise_multiplier(target_epsilon: float, delta: float, rounds: int,
                               sampling: SamplingSpec, *, accountant: str = "rdp",
                               tol: float = 1e-5) -> float:
    """The smallest noise multiplier (within ``tol``) whose epsilon is <= ``target_epsilon``.

    Uses dp-accounting's ``calibrate_dp_mechanism`` (Brent's method, with a final check
    that the returned z meets the target) on a bracket found by doubling / halving.

    Args:
      target_epsilon: > 0.
      delta: target delta in (0, 1).
      rounds: number of rounds, >= 1.
      sampling: how cohorts are drawn.
      accountant: ``"rdp"`` or ``"pld"``.
      tol: absolute tolerance on z.

    Returns:
      z with ``epsilon_for(rounds, PrivacyConfig(z, sampling, accountant), delta) <=
      target_epsilon`` and z - tol above the optimum at most.
    """
    target = check_float("target_epsilon", target_epsilon, min_value=0.0, min_exclusive=True)
    delta = _check_delta("delta", delta)
    rounds = check_int("rounds", rounds, min_value=1)
    if not isinstance(sampling, SamplingSpec):
        fail("sampling", sampling, "must be a SamplingSpec")
    check_choice("accountant", accountant, ACCOUNTANTS)
    _check_accountant_supports(accountant, sampling)
    tol = check_float("tol", tol, min_value=0.0, min_exclusive=True)

    def eps(z: float) -> float:
        return epsilon_for(rounds, PrivacyConfig(z, sampling, accountant), delta)

    return _calibrate(
        target, delta, tol, eps, lambda: make_dp_accounting_accountant(accountant, sampling),
        lambda z: dp_accounting.SelfComposedDpEvent(dp_event(z, sampling), rounds))


# ------------------------------------------------------------- spec from server transforms

_BOUND_KEYS = ("sensitivity", "clip_norm", "max_norm")


def _flatten_infos(infos: Any) -> list[Mapping[str, Any]]:
    if hasattr(infos, "info") and hasattr(infos, "update") and hasattr(infos, "init"):
        infos = [infos.info]  # a ServerTransform
    elif isinstance(infos, Mapping):
        infos = [infos]
    out: list[Mapping[str, Any]] = []
    for info in infos:
        if not isinstance(info, Mapping):
            fail("infos", info, "each entry must be a mapping (a transform's info)")
        if "chain" in info:
            out.extend(_flatten_infos(info["chain"]))
        else:
            out.append(info)
    return out


def effective_noise_multiplier(update_noise_multiplier: float, count_noise_std: float,
                               count_sensitivity: float = 0.5) -> float:
    """Noise multiplier of adaptive clipping's two Gaussian queries taken together.

    Andrew et al. 2021, "Differentially Private Learning with Adaptive Clipping", Sec. 3:
    the noised update sum (multiplier z_u) and the noised count of unclipped clients (std
    sigma_b; each client's centred bit is +-1/2, so its sensitivity is 1/2 and its
    multiplier is 2 sigma_b) compose like one Gaussian query with
    ``z_eff = (z_u^-2 + (2 sigma_b)^-2)^(-1/2)``. The paper (and TFF / Flower) state it the
    other way round: to reach a target z, add update noise ``z_u = (z^-2 - (2 sigma_b)^-2)^(-1/2)``.

    Args:
      update_noise_multiplier: z_u, the std of the noise on the update sum / clip norm.
      count_noise_std: sigma_b, std of the noise on the (centred) unclipped-client count.
      count_sensitivity: L2 sensitivity of that count (1/2 for the paper's centred bits;
        1 if bits in {0, 1} are summed without centring).
    """
    z_u = _check_noise_multiplier("noise_multiplier", update_noise_multiplier)
    sb = check_float("count_noise_std", count_noise_std, min_value=0.0, min_exclusive=True)
    s = check_float("count_sensitivity", count_sensitivity, min_value=0.0, min_exclusive=True)
    return (z_u ** -2 + (sb / s) ** -2) ** -0.5


def privacy_spec_from_transform_infos(infos: Any, sampling: SamplingSpec, *,
                                      accountant: str = "rdp",
                                      delta: float | None = None) -> PrivacyConfig:
    """Builds the :class:`PrivacyConfig` from what the server transforms report.

    ``infos``: a ServerTransform, one info mapping, or an iterable of them (chains are
    flattened). The conventions are those of ``fedjax_sim.server.clipping`` / ``noise``:

    * exactly one transform reports ``noise_multiplier`` (> 0): the noise transform.
    * Fused adaptive clipping (``dp_fedavg_aggregator(adaptive=True)``: the info also has
      ``update_noise_multiplier``): its ``noise_multiplier`` already is the effective z of
      the update-sum and count queries together (Andrew et al. 2021, Theorem 1); it is
      re-derived from ``update_noise_multiplier``, ``count_noise_std`` and
      ``count_sensitivity`` and must agree (a mismatch raises: the ledger must not drift).
    * Fixed noise (``gaussian_noise(z, S)``): z is relative to the noise transform's own
      ``sensitivity`` S; the per-client bound B is the smallest ``sensitivity`` (else
      ``clip_norm`` / ``max_norm``) reported by the other transforms, and the accounted
      multiplier is ``z * S / B`` (= noise std / the real bound; z itself when S == B).
      A per-client transform whose bound is not fixed (``sensitivity: None``, e.g. a
      standalone ``adaptive_clip``) cannot be paired with fixed noise and raises.
    * a DP-FTRL tree transform (``name == "dp_ftrl_tree"``) raises: use
      :func:`dp_ftrl_accountant_from_transform_infos`.

    Args:
      infos: transform infos.
      sampling: how cohorts are drawn.
      accountant: ``"rdp"`` or ``"pld"``.
      delta: optional default delta.

    Returns:
      The PrivacyConfig of one round.
    """
    if not isinstance(sampling, SamplingSpec):
        fail("sampling", sampling, "must be a SamplingSpec")
    flat = _flatten_infos(infos)
    names = [i.get("name") for i in flat]
    for info in flat:
        if info.get("name") == "dp_ftrl_tree":
            fail("infos", info.get("name"),
                 "DP-FTRL tree noise is not a sampled Gaussian; use "
                 "dp_ftrl_accountant_from_transform_infos (or dp_ftrl_epsilon)")
    noisy = [i for i in flat if i.get("noise_multiplier") is not None]
    if len(noisy) > 1:
        fail("infos", [i.get("name") for i in noisy],
             "more than one transform reports a noise_multiplier; cannot tell which one "
             "the accountant should use")
    if not noisy:
        fail("infos", names, "no transform reports a noise_multiplier; nothing to account")
    noise = noisy[0]
    z = _check_noise_multiplier("noise_multiplier", noise["noise_multiplier"])
    if noise.get("update_noise_multiplier") is not None:  # fused adaptive clipping
        if noise.get("count_noise_std") is None:
            fail("infos", noise.get("name"),
                 "reports update_noise_multiplier but no count_noise_std")
        z_check = effective_noise_multiplier(noise["update_noise_multiplier"],
                                             noise["count_noise_std"],
                                             noise.get("count_sensitivity", 0.5))
        if not math.isclose(z, z_check, rel_tol=1e-6):
            fail("noise_multiplier", z,
                 f"disagrees with the effective multiplier {z_check!r} recomputed from "
                 f"{noise.get('name')}'s update and count noise")
        return PrivacyConfig(z, sampling, accountant, delta)
    others = [i for i in flat if i is not noise]
    if any("sensitivity" in i and i["sensitivity"] is None for i in others):
        fail("infos", names,
             "a per-client transform has no fixed sensitivity (adaptive clipping?); fixed "
             "Gaussian noise cannot be accounted against it (use the fused adaptive "
             "aggregator)")
    bounds = []
    for i in others:
        for k in _BOUND_KEYS:
            if i.get(k) is not None:
                bounds.append(check_float(f"{i.get('name')}.{k}", i[k], min_value=0.0,
                                          min_exclusive=True))
                break
    if not bounds:
        fail("infos", names,
             "no transform bounds a client's contribution (clip_norm / sensitivity); "
             "without it the noise gives no DP")
    s_noise = noise.get("sensitivity")
    if s_noise is not None:
        s_noise = check_float("sensitivity", s_noise, min_value=0.0, min_exclusive=True)
        z = z * s_noise / min(bounds)
    return PrivacyConfig(z, sampling, accountant, delta)


# DP-FTRL's accounting lives in its own module; its names stay importable from here.
from fedjax_sim.privacy.dp_ftrl_accounting import (  # noqa: E402  (after the helpers it uses)
    DPFTRLAccountant, calibrate_dp_ftrl_noise_multiplier, cyclic_rounds_per_pass,
    dp_ftrl_accountant_from_transform_infos, dp_ftrl_dp_event, dp_ftrl_epsilon,
    dp_ftrl_participation, tree_depth)

__all__ = [
    "ACCOUNTANTS", "Accountant", "ConfigError", "DPFTRLAccountant", "PrivacyConfig",
    "SAMPLING_KINDS", "SamplingSpec", "calibrate_dp_ftrl_noise_multiplier",
    "calibrate_noise_multiplier", "cyclic_rounds_per_pass", "dp_event",
    "dp_ftrl_accountant_from_transform_infos", "dp_ftrl_dp_event", "dp_ftrl_epsilon",
    "dp_ftrl_participation", "effective_noise_multiplier", "epsilon_for",
    "make_dp_accounting_accountant", "poisson_overflow_probability",
    "privacy_spec_from_transform_infos", "tree_depth",
]
