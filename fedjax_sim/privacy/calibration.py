"""Shared helpers of the privacy ledgers: argument checks and noise calibration.

Both ledgers (:mod:`fedjax_sim.privacy.accounting` for sampled Gaussian rounds,
:mod:`fedjax_sim.privacy.dp_ftrl_accounting` for tree aggregation) calibrate their noise
multiplier with :func:`calibrate`, so the bracketing, dp-accounting's Brent search and
the final guard step exist once.
"""

from __future__ import annotations

from typing import Any, Callable

from fedjax_sim._validation import check_float, fail
from fedjax_sim.privacy._lazy import dp_accounting


def check_delta(field: str, delta: Any) -> float:
    """delta in the open interval (0, 1)."""
    return check_float(field, delta, min_value=0.0, max_value=1.0, min_exclusive=True,
                       max_exclusive=True)


def resolve_delta(delta: Any, default: float | None) -> float:
    """The delta an epsilon query uses: ``delta``, else the ledger's ``default``; checked
    (a one-line error when neither is given)."""
    if delta is None:
        delta = default
        if delta is None:
            fail("delta", None, "pass a delta in (0, 1) or give the ledger a delta")
    return check_delta("delta", delta)


def check_noise_multiplier(field: str, z: Any) -> float:
    """A noise multiplier > 0 (0 would be no privacy, which is not accounted)."""
    return check_float(field, z, min_value=0.0, min_exclusive=True)


def calibrate(target: float, delta: float, tol: float, eps: Callable[[float], float],
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


__all__ = ["calibrate", "check_delta", "check_noise_multiplier"]
