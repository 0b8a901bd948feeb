"""Empirical privacy auditing from canary clients: scores, estimates and one-run bounds.

Setting: a run adds ``m`` canary clients. Canary ``j`` has a random unit direction ``c_j``
in parameter space (:func:`canary_direction`: an isotropic normal vector over its norm)
and is independently *inserted* (trained on: when sampled it uploads ``clip_norm * c_j``)
or *held out* (never trained on), each with probability 1/2 (:func:`canary_inclusion`), so
the same canaries serve both readings below. After training each canary gets one score
(:func:`canary_scores`): the cosine of the final model delta ``theta_T - theta_0`` with
``c_j`` ("final model"), or the largest cosine of a round's model change with ``c_j`` over
the rounds ("all iterates", :func:`max_over_iterates`).

Threat model: the auditor knows every canary direction and which canaries were inserted,
and sees the released model(s); neighbouring runs differ in one canary client. The two
readings of the scores are different kinds of number:

* :func:`one_shot_estimate` (Andrew et al., "One-shot Empirical Privacy Estimation for
  Federated Learning", ICLR 2024) fits a Gaussian to the inserted and one to the held-out
  canaries' scores and reports the epsilon of telling those two Gaussians apart at the
  run's delta (:func:`epsilon_between_gaussians`). An *estimate*, not a bound: it assumes
  Gaussian scores (cosines with random directions in high dimension nearly are; the
  all-iterates maximum is skewed) and carries the sampling error of four fitted moments.
  That error is biased upwards: fitted spreads never match exactly, and Gaussians of
  unequal spread have unbounded privacy loss, so at small delta the estimate overshoots
  (on one Gaussian release with 500 canaries per group it is over 25 % high in most runs
  at 0.5-GDP; with 10,000 per group it is tested within 25 % at 0.5-, 1- and 2-GDP).
* :func:`one_run_lower_bound` (Steinke, Nasr & Jagielski, "Privacy Auditing with One (1)
  Training Run", NeurIPS 2023) guesses membership from the scores, counts the correct
  guesses and reports the largest epsilon the count refutes at confidence ``1 - beta``:
  a high-confidence *lower bound* on the epsilon of an (epsilon, delta)-DP training run,
  valid only under the paper's assumptions (see its docstring).

Tested against the papers' closed forms and dp-accounting's privacy loss distribution of
the Gaussian mechanism. jax-privacy 2.0.0 (``jax_privacy.auditing``) implements the one-run
p-value (one-sided guesses only) but not the Gaussian-fit estimate, and is not a
dependency (its wheel needs Python >= 3.11 and installs top-level ``tests`` and ``docs``
packages); its p-value and one-sided bound agreed with these to 1e-7 in a one-off check.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim._validation import check_float, check_int, fail
from fedjax_sim.privacy._lazy import LazyModule, scipy_special
from fedjax_sim.privacy.calibration import check_delta

_MAX_EPSILON = 2.0 ** 20  # profiles still above delta here report inf
_scipy_optimize = LazyModule("scipy.optimize")


def canary_inclusion(seed: int, num_canaries: int) -> np.ndarray:
    """``[num_canaries]`` bool: canary ``j`` is inserted (True) or held out, each
    independently with probability 1/2 (NumPy's default generator seeded with ``seed``).

    The one-run bound needs exactly these fair, independent coins, drawn for the audit and
    unseen by the training run except through the canaries it trains on.
    """
    seed = check_int("seed", seed, min_value=0)
    num_canaries = check_int("num_canaries", num_canaries, min_value=1)
    return np.random.default_rng(seed).integers(0, 2, size=num_canaries) == 1


def canary_direction(key: jax.Array, index: jax.Array | int, dim: int) -> jax.Array:
    """Canary ``index``'s unit direction ``[dim]`` (float32): an isotropic normal draw from
    ``fold_in(key, index)`` over its norm. A pure function of ``(key, index)``, so a canary
    client inside the round and the auditor on the host draw the same vector."""
    z = jax.random.normal(jax.random.fold_in(key, index), (dim,), jnp.float32)
    return z / jnp.maximum(jnp.linalg.norm(z), jnp.float32(1e-30))


def canary_directions(key: jax.Array, num: int, dim: int) -> jax.Array:
    """``[num, dim]`` float32: :func:`canary_direction` of every canary, unit rows."""
    num = check_int("num", num, min_value=1)
    dim = check_int("dim", dim, min_value=1)
    return _directions(key, jnp.arange(num, dtype=jnp.int32), dim)


@functools.partial(jax.jit, static_argnums=2)
def _directions(key, indices, dim):
    return jax.vmap(lambda j: canary_direction(key, j, dim))(indices)


def canary_scores(deltas: Any, directions: Any) -> jax.Array:
    """``[m]`` float32 cosines of one flat model delta ``[P]`` with each direction
    ``[m, P]`` (0 where either norm is 0).

    Works on NumPy and JAX arrays and under ``jit`` (shapes are checked, values are not);
    the products run at full float32 precision (no reduced-precision matmul on
    accelerators: the cosines are of order ``1/sqrt(P)``).
    """
    delta = jnp.asarray(deltas).astype(jnp.float32)
    dirs = jnp.asarray(directions).astype(jnp.float32)
    if delta.ndim != 1:
        fail("deltas.shape", delta.shape, "must be a flat vector [P]")
    if dirs.ndim != 2 or dirs.shape[1] != delta.shape[0]:
        fail("directions.shape", dirs.shape, f"must be [m, {delta.shape[0]}]")
    dots = jnp.matmul(dirs, delta, precision=jax.lax.Precision.HIGHEST)
    norms = jnp.linalg.norm(dirs, axis=1) * jnp.linalg.norm(delta)
    positive = norms > jnp.float32(0.0)
    return jnp.where(positive, dots / jnp.where(positive, norms, jnp.float32(1.0)),
                     jnp.float32(0.0))


def max_over_iterates(running_max: Any, round_delta: Any, directions: Any) -> jax.Array:
    """The all-iterates statistic, one round at a time: ``max(running_max,
    canary_scores(round_delta, directions))``; pass ``running_max=None`` at the first
    round. After the last round it is ``max_t cos(Delta_t, c_j)`` for each canary."""
    scores = canary_scores(round_delta, directions)
    if running_max is None:
        return scores
    running_max = jnp.asarray(running_max).astype(jnp.float32)
    if running_max.shape != scores.shape:
        fail("running_max.shape", running_max.shape, f"must be {scores.shape}")
    return jnp.maximum(running_max, scores)


# ----------------------------------------------------------------------------- profiles


def _log_std_normal_mass(lo: float, hi: float) -> float:
    """``log P[lo < Z < hi]`` for a standard normal ``Z``, accurate in either tail."""
    sp = scipy_special
    if lo >= hi:
        return -math.inf
    if lo >= 0.0:  # both in the upper tail: P[Z > lo] - P[Z > hi]
        a, b = sp.log_ndtr(-lo), sp.log_ndtr(-hi)
    elif hi <= 0.0:  # both in the lower tail
        a, b = sp.log_ndtr(hi), sp.log_ndtr(lo)
    else:  # straddles 0: one minus two tails, each at most 1/2
        return float(np.log1p(-(sp.ndtr(lo) + sp.ndtr(-hi))))
    if b == -math.inf:
        return float(a)
    return float(a + np.log1p(-np.exp(b - a)))


def _log_mass(intervals: list[tuple[float, float]], mean: float, std: float) -> float:
    """``log P[X in union of intervals]`` for ``X ~ N(mean, std^2)`` (disjoint intervals)."""
    logs = [_log_std_normal_mass((lo - mean) / std, (hi - mean) / std) for lo, hi in intervals]
    return float(np.logaddexp.reduce(np.array(logs + [-math.inf], np.float64)))


def _llr_above(eps: float, m: float, s: float) -> list[tuple[float, float]]:
    """Where ``log p1(x) / p0(x) > eps`` for ``p0 = N(0, 1)``, ``p1 = N(m, s^2)``: the
    quadratic ``a x^2 + b x + c > 0``; an interval, its complement, a half-line or all."""
    a = 0.5 * (1.0 - 1.0 / (s * s))
    b = m / (s * s)
    c = -0.5 * m * m / (s * s) - math.log(s) - eps
    if a == 0.0:
        if b == 0.0:
            return [(-math.inf, math.inf)] if c > 0.0 else []
        return [(-c / b, math.inf)] if b > 0.0 else [(-math.inf, -c / b)]
    disc = b * b - 4.0 * a * c
    if disc <= 0.0:
        return [(-math.inf, math.inf)] if a > 0.0 else []
    q = -0.5 * (b + math.copysign(math.sqrt(disc), b))  # roots q/a, c/q without cancellation
    r1, r2 = sorted((q / a, c / q))
    return [(-math.inf, r1), (r2, math.inf)] if a > 0.0 else [(r1, r2)]


def _hockey_stick(eps: float, m: float, s: float) -> float:
    """``sup_A P1(A) - e^eps P0(A)`` for ``P0 = N(0, 1)``, ``P1 = N(m, s^2)``: attained on
    the set where the log-likelihood ratio exceeds ``eps``."""
    region = _llr_above(eps, m, s)
    if not region:
        return 0.0
    log_q = eps + _log_mass(region, 0.0, 1.0)
    if log_q > 0.0:  # e^eps P0(A) > 1 >= P1(A)
        return 0.0
    return max(0.0, math.exp(_log_mass(region, m, s)) - math.exp(log_q))


def _invert_profile(profile, delta: float) -> float:
    """Smallest ``eps >= 0`` with ``profile(eps) <= delta`` for a non-increasing profile
    (bracket by doubling, then Brent's method); inf past ``_MAX_EPSILON``."""
    if profile(0.0) <= delta:
        return 0.0
    hi = 1.0
    while profile(hi) > delta:
        hi *= 2.0
        if hi > _MAX_EPSILON:
            return math.inf
    return float(_scipy_optimize.brentq(lambda e: profile(e) - delta, 0.0, hi, xtol=1e-12,
                                        rtol=1e-12))


def gaussian_epsilon(mu: float, delta: float) -> float:
    """Epsilon of mu-GDP at ``delta`` (the Gaussian mechanism with sensitivity / sigma =
    ``mu``): the root of ``delta(eps) = Phi(mu/2 - eps/mu) - e^eps Phi(-mu/2 - eps/mu)``
    (Balle & Wang 2018; Dong, Roth & Su 2019), evaluated with ``log_ndtr``.

    0 when ``delta >= delta(0)`` (the total variation), inf for ``mu = inf``.
    """
    if isinstance(mu, (int, float, np.floating)) and mu == math.inf:
        return math.inf
    mu = check_float("mu", mu, min_value=0.0)
    delta = check_delta("delta", delta)
    if mu == 0.0:
        return 0.0
    sp = scipy_special

    def profile(eps: float) -> float:
        upper = sp.log_ndtr(mu / 2.0 - eps / mu)
        lower = eps + sp.log_ndtr(-mu / 2.0 - eps / mu)
        return float(np.exp(upper) * -np.expm1(min(lower - upper, 0.0)))

    return _invert_profile(profile, delta)


def epsilon_between_gaussians(mu0: float, sigma0: float, mu1: float, sigma1: float,
                              delta: float) -> float:
    """Epsilon at ``delta`` of telling ``N(mu0, sigma0^2)`` from ``N(mu1, sigma1^2)``: the
    smallest ``eps >= 0`` with ``max(H(P1 || P0), H(P0 || P1)) <= delta``, where
    ``H(P || Q) = sup_A P(A) - e^eps Q(A)`` is the hockey-stick divergence (the privacy
    profile of the pair, both orders).

    Exact up to root finding: the optimal ``A`` is where the log-likelihood ratio, a
    quadratic in ``x``, exceeds ``eps`` (an interval or the complement of one, a half-line
    when the variances are equal), so each ``H`` is a few normal tail masses. With equal
    sigmas this is :func:`gaussian_epsilon` of ``|mu1 - mu0| / sigma``; unequal variances
    have unbounded privacy loss, so the epsilon grows without limit as ``delta -> 0``.
    """
    mu0 = check_float("mu0", mu0)
    mu1 = check_float("mu1", mu1)
    sigma0 = check_float("sigma0", sigma0, min_value=0.0, min_exclusive=True)
    sigma1 = check_float("sigma1", sigma1, min_value=0.0, min_exclusive=True)
    delta = check_delta("delta", delta)
    m, s = (mu1 - mu0) / sigma0, sigma1 / sigma0  # affine maps leave the profile unchanged
    if m == 0.0 and s == 1.0:
        return 0.0

    def profile(eps: float) -> float:
        return max(_hockey_stick(eps, m, s), _hockey_stick(eps, -m / s, 1.0 / s))

    return _invert_profile(profile, delta)


def _check_scores(field: str, scores: Any, min_size: int) -> np.ndarray:
    x = np.asarray(scores, np.float64)
    if x.ndim != 1:
        fail(f"{field}.shape", x.shape, "must be one score per canary [m]")
    if x.size < min_size:
        fail(field, f"<{x.size} scores>", f"need at least {min_size}")
    if not np.all(np.isfinite(x)):
        fail(field, f"<{int(np.sum(~np.isfinite(x)))} non-finite of {x.size}>",
             "scores must be finite")
    return x


def one_shot_estimate(inserted_scores: Any, held_out_scores: Any, delta: float, *,
                      pooled: bool = True) -> float:
    """Andrew et al.'s one-shot epsilon estimate from the two groups' Gaussian fits.

    The held-out canaries' scores give the null distribution, the inserted ones' the
    alternative; the estimate is the epsilon of telling the two fitted Gaussians apart at
    ``delta``. With ``pooled`` (the default) both share the pooled spread (``ddof=1`` per
    group), so the estimate is ``gaussian_epsilon(|mean_1 - mean_0| / spread, delta)``: the
    Gaussian mechanism moves the inserted canaries' mean, not their spread, and a pooled
    fit does not turn the sampling error of two spreads into privacy loss. With
    ``pooled=False`` each group keeps its own spread (:func:`epsilon_between_gaussians`,
    the general form): Gaussians of unequal spread have unbounded privacy loss, so at small
    delta that fit overshoots unless the groups are large (on one Gaussian release with
    500 canaries a group it is over 25 % high in most runs at 0.5-GDP; with 10,000 a group
    it is tested within 25 %).

    An estimate, not a bound (see the module docstring): it is as good as the Gaussian fit
    and the number of canaries (its sampling error shrinks like ``1 / sqrt(m)``), and it
    assumes the inserted canaries barely interfere (``m`` small against the dimension).
    """
    inserted = _check_scores("inserted_scores", inserted_scores, 2)
    held_out = _check_scores("held_out_scores", held_out_scores, 2)
    delta = check_delta("delta", delta)
    stats = []
    for field, x in (("held_out_scores", held_out), ("inserted_scores", inserted)):
        std = float(np.std(x, ddof=1))
        if not std > 0.0:
            fail(field, f"<{x.size} equal scores>", "zero spread: no Gaussian fits")
        stats += [float(np.mean(x)), std]
    if not pooled:
        return epsilon_between_gaussians(*stats, delta)
    n0, n1 = held_out.size, inserted.size
    spread = math.sqrt(((n0 - 1) * stats[1] ** 2 + (n1 - 1) * stats[3] ** 2) / (n0 + n1 - 2))
    return gaussian_epsilon(abs(stats[2] - stats[0]) / spread, delta)


# ---------------------------------------------------------------------- one-run bound


class OneRunBound(NamedTuple):
    """:func:`one_run_lower_bound`'s answer and the numbers it came from."""

    epsilon: float  # the lower bound (0.0: nothing refuted)
    guesses: int  # r = k_plus + k_minus
    correct: int  # v
    k_plus: int
    k_minus: int
    beta: float


def _one_run_p_value(eps: float, m: int, r: int, v: int, delta: float) -> float:
    """Bound on ``P[W >= v]`` for an (eps, delta)-DP run: ``f(v) + 2 m delta max_{1<=i<=v}
    (f(v - i) - f(v)) / i`` with ``f(u) = P[Binomial(r, e^eps / (1 + e^eps)) >= u]``
    (Steinke, Nasr & Jagielski 2023, their approximate-DP analysis and reference code)."""
    q = float(scipy_special.expit(eps))
    u = np.arange(v - 1, -1, -1)  # v - i for i = 1..v
    tails = scipy_special.bdtrc(u - 1, r, q)  # P[Bin >= u] = P[Bin > u - 1]
    tails = np.where(u <= 0, 1.0, tails)
    f_v = float(scipy_special.bdtrc(v - 1, r, q)) if v > 0 else 1.0
    if delta == 0.0 or v == 0:
        return f_v
    alpha = float(np.max((tails - f_v) / np.arange(1, v + 1)))
    return min(1.0, f_v + 2.0 * m * delta * max(alpha, 0.0))


def one_run_lower_bound(scores: Any, inserted: Any, *, delta: float, k_plus: int,
                        k_minus: int | None = None, beta: float = 0.05) -> OneRunBound:
    """Steinke, Nasr & Jagielski's one-run lower bound on epsilon at ``delta``.

    The auditor guesses "inserted" for the ``k_plus`` highest scores and "held out" for
    the ``k_minus`` lowest (``None``: 0, one-sided), abstaining on the rest: ``r = k_plus +
    k_minus`` guesses, ``v`` correct. For an (eps, delta)-DP run the number correct ``W``
    obeys ``P[W >= v] <= p(eps)``, the paper's bound (``_one_run_p_value``): with
    ``delta = 0`` the tail ``f(v)`` of ``Binomial(r, e^eps / (1 + e^eps))`` at ``v``; with
    ``delta > 0`` the paper's full approximate-DP bound (as in its reference code, no
    simplification), ``f(v) + 2 m delta max_{1<=i<=v} (f(v - i) - f(v)) / i`` with ``m`` all
    canaries, guessed or not. The answer is the largest eps with ``p(eps) <= beta`` (0.0
    when even eps = 0 is plausible; a grid over ``[0, eps at delta = 0]`` and bisection,
    since ``p`` need not be monotone in eps when ``delta > 0``). Any refuted eps is a valid
    report: an (eps', delta) guarantee implies every larger eps, and ``p`` falls with ``v``
    (checked numerically wherever it is below 1/2), so each refutation is a one-sided test.

    Guarantee: if the run is (eps, delta)-DP with respect to each canary's inclusion (the
    others' fixed), the reported epsilon exceeds eps with probability at most ``beta``
    over the inclusion coins and the run. Assumptions: the coins are independent and fair
    (:func:`canary_inclusion`) and the score of each canary is a function of the released
    output and the public directions only; ``k_plus``, ``k_minus``, ``beta`` and ``delta``
    are fixed before the scores are seen (taking the best of ``n`` settings afterwards is
    valid at ``n * beta``). Ties in the scores are broken by canary index.
    """
    x = _check_scores("scores", scores, 1)
    inc = np.asarray(inserted)
    if inc.dtype != np.bool_:
        fail("inserted.dtype", str(inc.dtype), "must be bool (True: inserted)")
    if inc.shape != x.shape:
        fail("inserted.shape", inc.shape, f"must match scores {x.shape}")
    m = x.size
    delta = check_float("delta", delta, min_value=0.0, max_value=1.0, max_exclusive=True)
    beta = check_float("beta", beta, min_value=0.0, max_value=1.0, min_exclusive=True,
                       max_exclusive=True)
    k_plus = check_int("k_plus", k_plus, min_value=0, max_value=m)
    k_minus = check_int("k_minus", 0 if k_minus is None else k_minus, min_value=0,
                        max_value=m - k_plus)
    r = k_plus + k_minus
    if r == 0:
        fail("k_plus", k_plus, "k_plus + k_minus must be >= 1 (no guesses)")
    order = np.argsort(-x, kind="stable")
    v = int(np.sum(inc[order[:k_plus]]) + np.sum(~inc[order[m - k_minus:]]))
    answer = OneRunBound(0.0, r, v, k_plus, k_minus, beta)
    if _one_run_p_value(0.0, m, r, v, delta) > beta:
        return answer
    # p(eps) >= the pure-DP tail, which is increasing in eps and equals beta at eps_pure;
    # every refuted eps lies in [0, eps_pure].
    q_pure = float(scipy_special.betaincinv(v, r - v + 1, beta))
    eps_pure = float(scipy_special.logit(q_pure))
    if _one_run_p_value(eps_pure, m, r, v, delta) <= beta:
        return answer._replace(epsilon=eps_pure)
    # Take the largest refuted grid point, then bisect towards the next (unrefuted) one,
    # keeping lo refuted.
    grid = np.linspace(0.0, eps_pure, 65)
    ok = [_one_run_p_value(float(e), m, r, v, delta) <= beta for e in grid]
    k = max(i for i, good in enumerate(ok) if good)
    lo, hi = float(grid[k]), float(grid[k + 1])
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if _one_run_p_value(mid, m, r, v, delta) <= beta:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-9 * max(1.0, hi):
            break
    return answer._replace(epsilon=lo)


__all__ = ["OneRunBound", "canary_inclusion", "canary_scores", "epsilon_between_gaussians",
           "gaussian_epsilon", "max_over_iterates", "one_run_lower_bound", "one_shot_estimate",
           "canary_direction", "canary_directions"]
