"""Typed DP mechanisms: what a noise stage adds, and the ledger that accounts for it.

A noise stage of the server chain (:mod:`fedjax_sim.server.noise`,
:mod:`fedjax_sim.server.dp_ftrl`) carries one of these as its ``mechanism``. The
privacy ledger (:func:`fedjax_sim.privacy.ledger_for`) reads it, together with the
clipping bound the chain declares and the sampler's :class:`SamplingSpec`, and builds
the accountant of the run from them: nothing is re-typed, nothing is parsed from names.

Each mechanism turns "noise of std ``z * S`` on a sum whose per-client bound is ``B``"
into dp-accounting events with the accounted multiplier ``z * S / B`` (``z`` itself
when the noise is scaled to the bound the chain enforces).
"""

from __future__ import annotations

import dataclasses
import math

from fedjax_sim._validation import check_choice, check_float, check_int, fail
from fedjax_sim.privacy.accounting import (ACCOUNTANTS, Accountant, PrivacyConfig,
                                           effective_noise_multiplier)
from fedjax_sim.privacy.calibration import check_noise_multiplier
from fedjax_sim.privacy.dp_ftrl_accounting import DPFTRLAccountant
from fedjax_sim.privacy.schedule import SamplingSpec


@dataclasses.dataclass(frozen=True)
class GaussianSumNoise:
    """Gaussian noise added once per round to the sum of the cohort's bounded uploads.

    The Gaussian mechanism (Dwork & Roth 2014, Thm. A.1), amplified by sampling and
    composed over rounds by dp-accounting (Mironov 2017; Abadi et al. 2016). Under Poisson
    sampling each round is ``PoissonSampled(q, Gaussian(z))`` with add/remove-one-client
    adjacency; under fixed-size sampling ``SampledWithoutReplacement(n, m, Gaussian(z/2))``
    with replace-one (:mod:`fedjax_sim.privacy.accounting`).

    Attributes:
      noise_multiplier: z, the noise std over ``sensitivity``.
      sensitivity: the bound S the std is scaled to (std ``z S``); None when the noise
        scales with the stage's own current clip norm (the fused adaptive-clipping
        aggregator: z is then relative to the bound of each round).
      update_noise_multiplier: the fused aggregator's noise on the update sum, ``z_u``.
      count_noise_std: the fused aggregator's noise on the unclipped count, ``sigma_b``;
        with ``z_u`` it must give ``z`` (Andrew et al. 2021, Thm. 1), checked here so the
        ledger cannot drift from what the stage adds.
    """

    noise_multiplier: float
    sensitivity: float | None
    update_noise_multiplier: float | None = None
    count_noise_std: float | None = None

    def __post_init__(self):
        check_noise_multiplier("noise_multiplier", self.noise_multiplier)
        if self.sensitivity is not None:
            check_float("sensitivity", self.sensitivity, min_value=0.0, min_exclusive=True)
        fused = (self.update_noise_multiplier, self.count_noise_std)
        if (fused[0] is None) != (fused[1] is None):
            fail("count_noise_std", self.count_noise_std, "the fused adaptive mechanism "
                 "needs both update_noise_multiplier and count_noise_std")
        if fused[0] is not None:
            z = effective_noise_multiplier(*fused)
            if not math.isclose(z, self.noise_multiplier, rel_tol=1e-6):
                fail("noise_multiplier", self.noise_multiplier,
                     f"disagrees with the effective multiplier {z!r} of the update and "
                     "count noise")

    def accounted_multiplier(self, bound: float | None) -> float:
        """The z the ledger accounts: noise std over the per-client bound ``bound``."""
        if self.sensitivity is None:
            return self.noise_multiplier
        if bound is None:
            fail("server_chain", "no bound", "Gaussian noise scaled to a fixed sensitivity "
                 "needs a stage that bounds each client (clip_per_client)")
        return self.noise_multiplier * self.sensitivity / bound

    def ledger(self, sampling: SamplingSpec, *, accountant: str, delta: float | None,
               bound: float | None) -> Accountant:
        """The :class:`~fedjax_sim.privacy.Accountant` of this noise under ``sampling``."""
        check_choice("accountant", accountant, ACCOUNTANTS)
        return Accountant(PrivacyConfig(self.accounted_multiplier(bound), sampling,
                                        accountant, delta))

    def describe(self) -> str:
        return f"Gaussian sum noise (z={self.noise_multiplier:g})"


@dataclasses.dataclass(frozen=True)
class TreeAggregationNoise:
    """DP-FTRL's online tree-aggregation noise (Kairouz et al. 2021, Appendix D).

    Every tree node gets noise of std ``z * sensitivity``; a client in one leaf is in at
    most ``ceil(log2(max_rounds + 1))`` released nodes, so one tree is a Gaussian
    mechanism with sensitivity ``sqrt(depth) * bound``, under replace-one-with-zero
    adjacency and a data-independent (cyclic) schedule; trees compose.
    (:class:`~fedjax_sim.privacy.DPFTRLAccountant`.)

    Attributes:
      noise_multiplier: z, node noise std over ``sensitivity``.
      sensitivity: the clip norm the node std is scaled to.
      max_rounds: the tree size (restart period).
      efficient: Honaker's estimator (post-processing: same accounting).
    """

    noise_multiplier: float
    sensitivity: float
    max_rounds: int
    efficient: bool = False

    def __post_init__(self):
        check_noise_multiplier("noise_multiplier", self.noise_multiplier)
        check_float("sensitivity", self.sensitivity, min_value=0.0, min_exclusive=True)
        check_int("max_rounds", self.max_rounds, min_value=1)

    def ledger(self, sampling: SamplingSpec, *, accountant: str, delta: float | None,
               bound: float | None) -> DPFTRLAccountant:
        """The :class:`~fedjax_sim.privacy.DPFTRLAccountant` of this tree under a cyclic
        schedule."""
        if accountant != "rdp":
            fail("accountant", accountant, "DP-FTRL is accounted with rdp (dp-accounting's "
                 "tree-aggregation event)")
        if sampling.kind != "cyclic":
            fail("sampling", sampling.kind, "DP-FTRL is accounted only under a cyclic "
                 "schedule (a data-independent order in which a client is at most once per "
                 "tree)")
        if bound is None:
            fail("server_chain", "no bound", "tree noise needs a stage that bounds each "
                 "client (clip_per_client)")
        return DPFTRLAccountant(self.noise_multiplier * self.sensitivity / bound,
                                self.max_rounds, rounds_per_pass=sampling.rounds_per_pass,
                                delta=delta, schedule=sampling.describe())

    def describe(self) -> str:
        return (f"DP-FTRL tree noise (z={self.noise_multiplier:g}, tree of "
                f"{self.max_rounds} rounds{', efficient' if self.efficient else ''})")


__all__ = ["GaussianSumNoise", "TreeAggregationNoise"]
