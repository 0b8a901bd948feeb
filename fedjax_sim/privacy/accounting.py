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
its own module, :mod:`fedjax_sim.privacy.dp_ftrl_accounting`. A run's ledger is built
from its server chain by :func:`fedjax_sim.privacy.ledger_for`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from fedjax_sim._validation import check_choice, check_float, check_int, fail
from fedjax_sim.privacy._lazy import dp_accounting
from fedjax_sim.privacy._lazy import pld_lib as _pld_lib
from fedjax_sim.privacy._lazy import rdp_lib as _rdp_lib
from fedjax_sim.privacy.calibration import (calibrate, check_delta, check_noise_multiplier,
                                            resolve_delta)
from fedjax_sim.privacy.schedule import SamplingSpec

ACCOUNTANTS = ("rdp", "pld")
SAMPLED_KINDS = ("poisson", "fixed")  # the schedules a sampled Gaussian is accounted under


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
                           check_noise_multiplier("noise_multiplier", self.noise_multiplier))
        _check_sampled(self.sampling)
        check_choice("accountant", self.accountant, ACCOUNTANTS)
        if self.delta is not None:
            object.__setattr__(self, "delta", check_delta("delta", self.delta))
        check_float("pld_value_discretization", self.pld_value_discretization,
                    min_value=0.0, min_exclusive=True, max_value=1.0)
        _check_accountant_supports(self.accountant, self.sampling)

    def round_event(self) -> dp_accounting.DpEvent:
        """The DP event of one round (see :func:`dp_event`)."""
        return dp_event(self.noise_multiplier, self.sampling)


def _check_sampled(sampling: Any) -> SamplingSpec:
    if not isinstance(sampling, SamplingSpec):
        fail("sampling", sampling, "must be a SamplingSpec")
    if sampling.kind not in SAMPLED_KINDS:
        fail("sampling", sampling.kind, "a sampled Gaussian round needs random (poisson or "
             "fixed-size) sampling; a cyclic schedule has no sampling to amplify privacy "
             "(account it as DP-FTRL tree aggregation)")
    return sampling


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
    z = check_noise_multiplier("noise_multiplier", noise_multiplier)
    _check_sampled(sampling)
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

    def summary(self, delta: float | None = None) -> dict[str, Any]:
        """The guarantee of the rounds recorded so far: figures, assumptions, a sentence."""
        spec = self._config.sampling
        eps = self.epsilon(delta)
        delta = self._config.delta if delta is None else delta
        return {"dp": True, "mechanism": "sampled_gaussian", "epsilon": eps,
                "delta": delta, "noise_multiplier": self.noise_multiplier,
                "accountant": self._config.accountant, "sampling": spec.describe(),
                "adjacency": spec.adjacency, "rounds": self._rounds,
                "assumptions": [
                    "each sampled client contributes one update per round, clipped to the "
                    "bound the noise is scaled to, and counts 1 in the sum",
                    "the sampled cohort is never truncated (see "
                    "poisson_overflow_probability) and the noise key is secret",
                    "nothing else reads the clients' data"],
                "statement": f"client-level ({eps:.4g}, {delta:.3g})-DP for all "
                             f"{self._rounds} released models ({spec.adjacency}, "
                             f"{spec.describe()}, {self._config.accountant})"}

    def record_round(self, count: int = 1) -> None:
        """Records ``count`` more rounds of the configured mechanism (host side, O(1))."""
        count = check_int("count", count, min_value=0)
        self._rounds += count

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon of everything recorded so far at ``delta`` (default: ``config.delta``)."""
        delta = resolve_delta(delta, self._config.delta)
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
    delta = check_delta("delta", delta)
    rounds = check_int("rounds", rounds, min_value=1)
    _check_sampled(sampling)
    check_choice("accountant", accountant, ACCOUNTANTS)
    _check_accountant_supports(accountant, sampling)
    tol = check_float("tol", tol, min_value=0.0, min_exclusive=True)

    def eps(z: float) -> float:
        return epsilon_for(rounds, PrivacyConfig(z, sampling, accountant), delta)

    return calibrate(
        target, delta, tol, eps, lambda: make_dp_accounting_accountant(accountant, sampling),
        lambda z: dp_accounting.SelfComposedDpEvent(dp_event(z, sampling), rounds))




def effective_noise_multiplier(update_noise_multiplier: float, count_noise_std: float,
                               count_sensitivity: float = 0.5) -> float:
    """Noise multiplier of adaptive clipping's two Gaussian queries taken together.

    Andrew et al. 2021, "Differentially Private Learning with Adaptive Clipping", Thm. 1:
    the noised update sum (multiplier z_u) and the noised count of unclipped clients (std
    sigma_b; each client's centred bit is +-1/2, so its sensitivity is 1/2 and its
    multiplier is 2 sigma_b) compose like one Gaussian query with
    ``z = (z_u^-2 + (2 sigma_b)^-2)^(-1/2)``. Either at 0 gives 0 (no privacy). The paper
    (and TFF / Flower) state it the other way round: to reach a target z, add update noise
    :func:`update_noise_multiplier_for`.

    Args:
      update_noise_multiplier: z_u >= 0, the std of the noise on the update sum / clip norm.
      count_noise_std: sigma_b >= 0, std of the noise on the (centred) unclipped count.
      count_sensitivity: L2 sensitivity of that count (1/2 for the paper's centred bits;
        1 if bits in {0, 1} are summed without centring).
    """
    z_u = check_float("update_noise_multiplier", update_noise_multiplier, min_value=0.0)
    sb = check_float("count_noise_std", count_noise_std, min_value=0.0)
    s = check_float("count_sensitivity", count_sensitivity, min_value=0.0, min_exclusive=True)
    if z_u == 0.0 or sb == 0.0:
        return 0.0
    return (z_u ** -2 + (sb / s) ** -2) ** -0.5


def update_noise_multiplier_for(noise_multiplier: float, count_noise_std: float,
                                count_sensitivity: float = 0.5) -> float:
    """Inverse of :func:`effective_noise_multiplier`: the ``z_u`` giving a target ``z``.

    Raises ConfigError unless ``z < count_noise_std / count_sensitivity`` (the count alone
    would already cost more).
    """
    z = check_float("noise_multiplier", noise_multiplier, min_value=0.0)
    sb = check_float("count_noise_std", count_noise_std, min_value=0.0)
    s = check_float("count_sensitivity", count_sensitivity, min_value=0.0, min_exclusive=True)
    if z == 0.0:
        return 0.0
    zc = sb / s
    if not z < zc:
        fail("count_noise_std", sb, f"adaptive clipping needs noise_multiplier < "
             f"count_noise_std/{s:g}, got noise_multiplier={z!r}")
    return (z ** -2 - zc ** -2) ** -0.5


__all__ = ["ACCOUNTANTS", "Accountant", "PrivacyConfig", "SAMPLED_KINDS",
           "calibrate_noise_multiplier", "dp_event", "effective_noise_multiplier",
           "epsilon_for", "make_dp_accounting_accountant", "poisson_overflow_probability",
           "update_noise_multiplier_for"]
