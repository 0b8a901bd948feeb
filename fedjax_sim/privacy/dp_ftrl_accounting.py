"""Privacy accounting of DP-FTRL's tree aggregation (Kairouz et al. 2021).

Tree noise has no sampling, so it is not the sampled Gaussian of
:mod:`fedjax_sim.privacy.accounting`: each completed tree is one Gaussian mechanism whose
sensitivity grows with the tree depth, and trees compose. This module holds the event,
the epsilon, the noise calibration, the cyclic schedule's pass length and the
:class:`DPFTRLAccountant` that ``fedjax-sim run --aggregator dp_ftrl`` keeps (built from
the run's chain by :func:`fedjax_sim.privacy.ledger_for`).
"""

from __future__ import annotations

import math
from typing import Any

from fedjax_sim._validation import check_choice, check_float, check_int, fail
from fedjax_sim.privacy._lazy import dp_accounting
from fedjax_sim.privacy.calibration import (calibrate, check_delta, check_noise_multiplier,
                                            resolve_delta)

DP_FTRL_PARTICIPATION = ("once", "once_per_tree")


def tree_depth(steps: int) -> int:
    """ceil(log2(steps + 1)): the most completed tree nodes that hold one leaf after
    ``steps`` leaves (online tree aggregation releases only completed nodes)."""
    steps = check_int("steps", steps, min_value=0)
    return math.ceil(math.log2(steps + 1)) if steps else 0


def _tree_step_counts(rounds: int, max_rounds: int | None) -> list[int]:
    if max_rounds is None or max_rounds >= rounds:
        return [rounds]
    full, rest = divmod(rounds, max_rounds)
    return [max_rounds] * full + ([rest] if rest else [])


def dp_ftrl_dp_event(noise_multiplier: float, rounds: int, *, max_rounds: int | None = None,
                     participation: str = "once") -> dp_accounting.DpEvent:
    """The dp-accounting event of DP-FTRL with online binary-tree aggregation.

    Kairouz et al. 2021, "Practical and Private (Deep) Learning without Sampling or
    Shuffling", Appendix D (as implemented by dp-accounting's
    ``SingleEpochTreeAggregationDpEvent``): every tree node gets Gaussian noise of std
    ``z * clip_norm``; a client whose clipped update enters one leaf appears in at most
    ``tree_depth(steps)`` released nodes, so the whole tree is a Gaussian mechanism with
    sensitivity ``sqrt(depth) * clip_norm``, i.e. RDP ``alpha * depth / (2 z^2)``.
    Adjacency: replace one client's contribution with the zero ("special") contribution.
    There is no sampling amplification: cohorts are chosen by a data-independent schedule.

    Args:
      noise_multiplier: z, noise std per tree node / clip norm.
      rounds: total rounds run.
      max_rounds: tree size; the tree restarts every ``max_rounds`` rounds (as the
        :func:`fedjax_sim.server.dp_ftrl.dp_ftrl_tree_noise` transform does).
        ``None``: one tree.
      participation: ``"once"``: each client contributes to at most one round in total
        (across all trees); ``"once_per_tree"``: at most once per tree (e.g. one epoch
        per tree), the trees then compose.
    """
    z = check_noise_multiplier("noise_multiplier", noise_multiplier)
    rounds = check_int("rounds", rounds, min_value=1)
    if max_rounds is not None:
        max_rounds = check_int("max_rounds", max_rounds, min_value=1)
    check_choice("participation", participation, DP_FTRL_PARTICIPATION)
    steps = _tree_step_counts(rounds, max_rounds)
    if participation == "once":
        return dp_accounting.SingleEpochTreeAggregationDpEvent(z, steps)
    return dp_accounting.ComposedDpEvent(
        [dp_accounting.SingleEpochTreeAggregationDpEvent(z, s) for s in steps])


def dp_ftrl_epsilon(noise_multiplier: float, rounds: int, delta: float, *,
                    max_rounds: int | None = None, participation: str = "once") -> float:
    """Epsilon of DP-FTRL tree aggregation (RDP accountant, replace-with-zero adjacency).

    See :func:`dp_ftrl_dp_event` for the guarantee and its assumptions.
    """
    delta = check_delta("delta", delta)
    event = dp_ftrl_dp_event(noise_multiplier, rounds, max_rounds=max_rounds,
                             participation=participation)
    acc = _dp_ftrl_rdp_accountant()
    acc.compose(event)
    return float(acc.get_epsilon(delta))


def _dp_ftrl_rdp_accountant() -> dp_accounting.rdp.RdpAccountant:
    return dp_accounting.rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)


def calibrate_dp_ftrl_noise_multiplier(target_epsilon: float, delta: float, rounds: int, *,
                                       max_rounds: int | None = None,
                                       participation: str = "once",
                                       tol: float = 1e-5) -> float:
    """The smallest DP-FTRL noise multiplier (within ``tol``) with
    :func:`dp_ftrl_epsilon` ``<= target_epsilon``.

    dp-accounting's ``calibrate_dp_mechanism`` (Brent's method) on a bracket found by
    doubling / halving, then a guard step so that the result meets the target.

    Args:
      target_epsilon: > 0.
      delta: target delta in (0, 1).
      rounds: rounds run, >= 1.
      max_rounds: tree size (restart period); None: one tree.
      participation: as in :func:`dp_ftrl_dp_event`.
      tol: absolute tolerance on z.
    """
    target = check_float("target_epsilon", target_epsilon, min_value=0.0, min_exclusive=True)
    delta = check_delta("delta", delta)
    rounds = check_int("rounds", rounds, min_value=1)
    tol = check_float("tol", tol, min_value=0.0, min_exclusive=True)

    def eps(z: float) -> float:
        return dp_ftrl_epsilon(z, rounds, delta, max_rounds=max_rounds,
                               participation=participation)

    return calibrate(target, delta, tol, eps, _dp_ftrl_rdp_accountant,
                      lambda z: dp_ftrl_dp_event(z, rounds, max_rounds=max_rounds,
                                                 participation=participation))


def cyclic_rounds_per_pass(num_clients: int, cohort_size: int) -> int:
    """``floor(num_clients / cohort_size)``: the most consecutive rounds in which a cyclic
    schedule trains no client twice.

    A cyclic schedule (:class:`fedjax_sim.sampling.CyclicSampler`) trains, in round r, the
    clients at positions ``r*m .. r*m + m - 1`` (mod N) of a fixed order. Any ``P``
    consecutive rounds cover ``P*m`` consecutive positions, all distinct when ``P*m <= N``;
    with ``P + 1`` rounds they wrap. When m does not divide N this is one less than
    ``ceil(N / m)`` (the rounds needed to reach everyone): the last block of a pass wraps
    around to the first clients of the order, who then train twice within ``ceil(N / m)``
    rounds.
    """
    n = check_int("num_clients", num_clients, min_value=1)
    m = check_int("cohort_size", cohort_size, min_value=1, max_value=n)
    return n // m


def dp_ftrl_participation(rounds: int, rounds_per_pass: int) -> str:
    """How often a client has contributed after ``rounds`` rounds of a schedule that trains
    no client twice in any ``rounds_per_pass`` consecutive rounds: ``"once"`` (at most once
    in total) while ``rounds <= rounds_per_pass``, else ``"once_per_tree"`` (valid when
    every tree spans at most ``rounds_per_pass`` rounds)."""
    rounds = check_int("rounds", rounds, min_value=0)
    rounds_per_pass = check_int("rounds_per_pass", rounds_per_pass, min_value=1)
    return "once" if rounds <= rounds_per_pass else "once_per_tree"


class DPFTRLAccountant:
    """Host-side ledger of DP-FTRL tree aggregation under a data-independent schedule.

    Guarantee: after ``rounds`` recorded rounds, the released noisy prefix sums (and every
    model computed from them) are (epsilon, delta)-DP at the client level under
    replace-one-client-with-zero ("special") adjacency, with epsilon
    ``dp_ftrl_epsilon(noise_multiplier, rounds, delta, max_rounds=max_rounds,
    participation=p)`` (Kairouz et al. 2021, Appendix D, via dp-accounting's RDP
    accountant), where

    * ``p = "once"`` while ``rounds <= rounds_per_pass``: no client has contributed twice,
      so the trees so far are one epoch and cost what the deepest of them costs;
    * ``p = "once_per_tree"`` afterwards: a tree spans ``max_rounds <= rounds_per_pass``
      consecutive rounds, so a client contributes to each tree at most once and the trees
      compose. Every tree is counted, also those a client skipped (an upper bound).

    Assumes: the schedule is fixed in advance, independently of the data (no sampling
    amplification is claimed), and trains no client twice in any ``rounds_per_pass``
    consecutive rounds (a cyclic schedule: :func:`cyclic_rounds_per_pass`); each
    contribution is clipped to the bound the tree noise is scaled to; the trees restart
    every ``max_rounds`` rounds from round 0; nothing else reads the clients' data.

    Args:
      noise_multiplier: z, tree-node noise std / the per-client bound.
      max_rounds: tree size; the tree restarts every ``max_rounds`` rounds.
      rounds_per_pass: the schedule's no-repeat window (>= ``max_rounds``).
      delta: default target delta for :meth:`epsilon` (optional).
      schedule: the schedule in words, for the summary (e.g. ``cyclic(m=20, n=60)``).
    """

    def __init__(self, noise_multiplier: float, max_rounds: int, *, rounds_per_pass: int,
                 delta: float | None = None, schedule: str | None = None):
        self._z = check_noise_multiplier("noise_multiplier", noise_multiplier)
        self._max_rounds = check_int("max_rounds", max_rounds, min_value=1)
        self._per_pass = check_int("rounds_per_pass", rounds_per_pass, min_value=1)
        if self._max_rounds > self._per_pass:
            fail("max_rounds", max_rounds,
                 f"exceeds the schedule's {self._per_pass} rounds without a repeated client: "
                 "a client could contribute twice to one tree, which the tree accounting "
                 "does not cover")
        self._delta = None if delta is None else check_delta("delta", delta)
        self._schedule = schedule
        self._rounds = 0
        self._cache: dict[tuple[int, float], float] = {}

    @property
    def noise_multiplier(self) -> float:
        return self._z

    @property
    def max_rounds(self) -> int:
        return self._max_rounds

    @property
    def rounds_per_pass(self) -> int:
        return self._per_pass

    @property
    def rounds(self) -> int:
        """Number of rounds recorded so far."""
        return self._rounds

    @property
    def delta(self) -> float | None:
        return self._delta

    @property
    def participation(self) -> str:
        """The participation the epsilon of the rounds recorded so far assumes."""
        return dp_ftrl_participation(self._rounds, self._per_pass)

    def record_round(self, count: int = 1) -> None:
        """Records ``count`` more rounds (host side, O(1))."""
        count = check_int("count", count, min_value=0)
        self._rounds += count

    def ledger(self) -> dp_accounting.DpEvent:
        """Everything recorded so far (at least one round) as one dp-accounting event."""
        if self._rounds == 0:
            fail("rounds", 0, "nothing recorded yet")
        return dp_ftrl_dp_event(self._z, self._rounds, max_rounds=self._max_rounds,
                                participation=self.participation)

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon of the rounds recorded so far at ``delta`` (default: the ledger's)."""
        delta = resolve_delta(delta, self._delta)
        if self._rounds == 0:
            return 0.0
        key = (self._rounds, delta)
        if key not in self._cache:
            self._cache[key] = dp_ftrl_epsilon(self._z, self._rounds, delta,
                                               max_rounds=self._max_rounds,
                                               participation=self.participation)
        return self._cache[key]

    def describe(self) -> str:
        return (f"DP-FTRL tree aggregation (z={self._z:g}, tree restarted every "
                f"{self._max_rounds} rounds, no client twice in {self._per_pass} rounds)")

    def summary(self, delta: float | None = None) -> dict[str, Any]:
        """The guarantee of the rounds recorded so far: figures, assumptions, a sentence."""
        eps = self.epsilon(delta)
        delta = self._delta if delta is None else delta
        adjacency = "replace one client with zero (special)"
        passes = ("one pass or less: each client contributed at most once"
                  if self.participation == "once" else
                  "several passes: the trees compose, one contribution per tree")
        return {"dp": True, "mechanism": "dp_ftrl_tree", "epsilon": eps, "delta": delta,
                "noise_multiplier": self._z, "accountant": "rdp",
                "sampling": self._schedule, "tree_restart_rounds": self._max_rounds,
                "rounds_per_pass": self._per_pass, "participation": self.participation,
                "adjacency": adjacency, "rounds": self._rounds,
                "assumptions": [
                    f"each client contributes to at most one round per tree (the tree "
                    f"restarts every {self._max_rounds} rounds; the cyclic order trains no "
                    f"client twice in {self._per_pass} consecutive rounds)",
                    "the cyclic order is fixed in advance, independently of the data; no "
                    "amplification by sampling is claimed",
                    "each client's update is clipped to the bound the tree noise is scaled "
                    "to, and every client counts 1 in the sum",
                    "the noise key is secret and nothing else reads the clients' data"],
                "statement": f"client-level ({eps:.4g}, {delta:.3g})-DP for all "
                             f"{self._rounds} released models (DP-FTRL tree aggregation, "
                             f"z={self._z:.4g} per node, tree restarted every "
                             f"{self._max_rounds} rounds, {passes}; {adjacency}; "
                             f"{self._schedule + ', ' if self._schedule else ''}a fixed "
                             "data-independent order, no sampling amplification; rdp)"}


__all__ = [
    "DP_FTRL_PARTICIPATION", "DPFTRLAccountant", "calibrate_dp_ftrl_noise_multiplier",
    "cyclic_rounds_per_pass", "dp_ftrl_dp_event", "dp_ftrl_epsilon",
    "dp_ftrl_participation", "tree_depth",
]
