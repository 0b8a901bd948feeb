"""Privacy accounting of distributed DP under secure aggregation (DDG and Skellam).

What is accounted: each round, every client rotates its update, clips it to L2 norm ``c``,
scales it by ``gamma``, rounds it conditionally to integers of L2 norm at most
``Delta_2 = inflated_norm_bound(gamma c, p, beta)`` (:mod:`fedjax_sim.secagg.discrete`)
and adds its own integer noise share of std ``sigma = z c gamma / sqrt(m)`` ring units
(``m`` the expected cohort); secure aggregation reveals only the modular sum (a
post-processing of the integer sum). With ``s`` shares in the sum the central noise has
variance ``s sigma^2``; dropout lowers ``s`` and raises epsilon.

One round, unamplified, as RDP at the orders of dp-accounting's ``RdpAccountant``:

* ``ddg``, the sum of ``s`` discrete Gaussians (Kairouz, Liu, Steinke 2021, Theorem 1 /
  Proposition 14 of arXiv:2102.06387), with ``Delta_1 = min(Delta_2^2, sqrt(p) Delta_2)``
  (integers: ``|x|_1 <= |x|_2^2``), ``tau = 10 sum_{k=1}^{s-1} exp(-2 pi^2 sigma^2 k/(k+1))``
  and ``a_i = Delta_i / (sqrt(s) sigma)``::

    eps(alpha) = min(alpha/2 a_2^2 + tau p,
                     alpha/2 (a_2^2 + 2 a_1 tau + tau^2 p),
                     alpha/2 (a_2 + sqrt(p) tau)^2);

* ``skellam`` of total variance ``mu = s sigma^2`` (Agarwal, Kairouz, Liu 2021, the
  multi-dimensional Skellam RDP, Corollary 4.1 of arXiv:2110.04995, with their
  ``Sk(mu/2, mu/2)`` parametrised by its variance), at integer orders (a fractional
  order takes the bound of the next integer; RDP grows with the order)::

    eps(alpha) = alpha Delta_2^2 / (2 mu)
                 + min(((2 alpha - 1) Delta_2^2 + 6 Delta_1) / (4 mu^2), 3 Delta_1 / (2 mu)).

Both as the papers' own code computes them (google-research/federated,
``distributed_dp/accounting_utils.py``), and both checked in the tests against exact
Renyi divergences of shifted 1-D noise. Poisson sampling at rate ``q`` amplifies them by
Zhu & Wang 2019's general upper bound for any mechanism (Theorem 5,
:func:`poisson_subsampled_rdp`); rounds compose by adding RDP, and dp-accounting's
``compute_epsilon`` converts.

Adjacency: add/remove one client, as in both papers: one client's (rounded) update moves
the sum by at most ``Delta_2`` while the noise of the ``s`` shares is held fixed. That the
noise of a share-holding client also leaves with it is not analysed (the papers do not
either). Fixed-size and cyclic schedules are refused: the general amplification bound
used here is for Poisson sampling only.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import numpy as np

from fedjax_sim._validation import check_choice, check_float, check_int, fail
from fedjax_sim.privacy._lazy import rdp_lib as _rdp_lib
from fedjax_sim.privacy._lazy import scipy_special
from fedjax_sim.privacy.calibration import check_delta, check_noise_multiplier, resolve_delta
from fedjax_sim.privacy.schedule import SamplingSpec
from fedjax_sim.secagg.discrete import (MAX_DISCRETE_GAUSSIAN_SIGMA, MAX_SKELLAM_VARIANCE,
                                        inflated_norm_bound)
from fedjax_sim.secagg.encoding import choose_scale
from fedjax_sim.secagg.ring import check_bits

RDP_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(11, 64)]
                   + [128.0, 256.0, 512.0, 1024.0])
"""The Renyi orders of every distributed-DP ledger: dp-accounting's
``DEFAULT_RDP_ORDERS`` (restated so that importing this module does not import
dp-accounting; a test checks they agree)."""
KINDS = ("ddg", "skellam")
MECHANISM = {"ddg": "distributed_discrete_gaussian", "skellam": "skellam"}
DEFAULT_BETA = math.exp(-0.5)  # TFF's distributed-DP default
RdpCurve = Callable[[np.ndarray], np.ndarray]


def _orders(orders) -> np.ndarray:
    a = np.asarray(orders, np.float64).reshape(-1)
    if a.size == 0 or not np.all(a > 1.0) or not np.all(np.isfinite(a)):
        fail("orders", orders, "must be finite RDP orders > 1")
    return a


def ddg_tau(local_std: float, num_shares: int) -> float:
    """``10 sum_{k=1}^{s-1} exp(-2 pi^2 sigma^2 k / (k+1))`` (Kairouz et al. 2021, Thm. 1)."""
    k = np.arange(1, num_shares, dtype=np.float64)
    return float(10.0 * np.sum(np.exp(-2.0 * math.pi ** 2 * local_std ** 2 * k / (k + 1.0))))


def ddg_rdp(orders, *, l2_sensitivity: float, l1_sensitivity: float, local_std: float,
            num_shares: int, dim: int) -> np.ndarray:
    """RDP of the sum of ``num_shares`` discrete Gaussians of std ``local_std`` each on a
    ``dim``-vector of integers whose L1/L2 sensitivities are given (integer units;
    Kairouz et al. 2021, Prop. 14). Zero shares: +inf (nothing hides the update)."""
    a = _orders(orders)
    if num_shares < 1 or local_std <= 0.0:
        return np.full_like(a, np.inf)
    central = math.sqrt(num_shares) * local_std
    a2, a1 = l2_sensitivity / central, l1_sensitivity / central
    tau = ddg_tau(local_std, num_shares)
    return np.minimum.reduce([a / 2 * a2 ** 2 + tau * dim,
                              a / 2 * (a2 ** 2 + 2 * a1 * tau + tau ** 2 * dim),
                              a / 2 * (a2 + math.sqrt(dim) * tau) ** 2])


def skellam_rdp(orders, *, l2_sensitivity: float, l1_sensitivity: float,
                variance: float) -> np.ndarray:
    """RDP of the multi-dimensional Skellam mechanism of total variance ``variance``
    (integer units; Agarwal et al. 2021, Cor. 4.1), each order taken up to an integer."""
    a = np.ceil(_orders(orders))
    if variance <= 0.0:
        return np.full_like(a, np.inf)
    d2, d1, mu = l2_sensitivity ** 2, l1_sensitivity, variance
    return a * d2 / (2 * mu) + np.minimum(((2 * a - 1) * d2 + 6 * d1) / (4 * mu ** 2),
                                          3 * d1 / (2 * mu))


def _logsumexp(x: np.ndarray) -> float:
    top = float(np.max(x))
    if not math.isfinite(top):
        return top
    return top + math.log(float(np.sum(np.exp(x - top))))


def _log_binom(n: float, k: np.ndarray) -> np.ndarray:
    gammaln = scipy_special.gammaln
    return gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)


def poisson_subsampled_rdp(rdp: RdpCurve, rate: float, orders) -> np.ndarray:
    """RDP of a mechanism run on a Poisson sample (rate ``q``), add/remove adjacency.

    Zhu & Wang 2019 ("Poisson Subsampled Renyi Differential Privacy"), Theorem 5, the
    general upper bound for any mechanism with RDP curve ``eps`` (their Theorem 6 drops
    the factor 3 under a condition shown for the Gaussian and Laplace mechanisms only),
    at integer ``alpha >= 2``::

      (alpha-1) eps'(alpha) <= log[(1-q)^(alpha-1) (alpha q - q + 1)
          + C(alpha,2) q^2 (1-q)^(alpha-2) e^eps(2)
          + 3 sum_{l=3}^alpha C(alpha,l) q^l (1-q)^(alpha-l) e^((l-1) eps(l))],

    in log-sum-exp form; each order keeps the smaller of this and ``eps(alpha)``. A
    fractional order takes the bound at the next integer (RDP grows with the order).
    On the Gaussian curve it upper-bounds dp-accounting's exact sampled Gaussian by at
    most ``log(3) / (alpha - 1)`` per order (tests): epsilon is ~5-10% above the exact one
    at q = 0.01, z = 1.1, up to ~50% for larger q z.

    Args:
      rdp: the unamplified curve, a function of an array of (integer) orders.
      rate: q in (0, 1]; 1 returns ``rdp(orders)``.
      orders: RDP orders > 1.

    Returns:
      float64 array, one bound per order.
    """
    q = check_float("rate", rate, min_value=0.0, max_value=1.0, min_exclusive=True)
    a = _orders(orders)
    base = np.asarray(rdp(a), np.float64)
    if q == 1.0:
        return base
    log_q, log_1q = math.log(q), math.log1p(-q)
    alphas = np.maximum(np.ceil(a), 2.0)
    ls = np.arange(2.0, alphas.max() + 1.0)
    # log of e^((l-1) eps(l)) q^l, shared by every order; C(alpha,l) (1-q)^(alpha-l) below
    shared = (ls - 1.0) * np.asarray(rdp(ls), np.float64) + ls * log_q + np.where(
        ls >= 3.0, math.log(3.0), 0.0)
    bound = {}
    for alpha in np.unique(alphas):
        m = int(alpha) - 1  # l = 2 .. alpha
        terms = shared[:m] + _log_binom(alpha, ls[:m]) + (alpha - ls[:m]) * log_1q
        first = (alpha - 1.0) * log_1q + math.log1p((alpha - 1.0) * q)
        bound[alpha] = _logsumexp(np.append(terms, first)) / (alpha - 1.0)
    out = np.minimum(base, [bound[alpha] for alpha in alphas])
    return out


def distributed_scale(bits: int, clip_norm: float, padded_dim: int, num_clients: int,
                      noise_multiplier: float, *, k_stddevs: float = 4.0,
                      expected_clients: float | None = None) -> float:
    """``gamma`` such that ``k`` standard deviations of an aggregate coordinate (the
    clipped updates' sum plus the noise shares), plus the rounding slack ``n``, fit in the
    ring's half-range ``2^(b-1) - 1``.

    The one formula of :func:`fedjax_sim.secagg.encoding.choose_scale` (what a secure-sum
    stage encodes with), with the distributed noise: ``n`` clients at most in a sum,
    shares sized for ``m`` expected clients (default ``n``).

    Raises:
      ConfigError: naming ``bits`` when the rounding slack alone fills the ring.
    """
    z = check_float("noise_multiplier", noise_multiplier, min_value=0.0)
    return choose_scale(bits, clip_norm, check_int("padded_dim", padded_dim, min_value=1),
                        num_clients, k_stddevs=k_stddevs, noise_multiplier=z,
                        expected_clients=expected_clients)


@dataclasses.dataclass(frozen=True)
class DistributedNoise:
    """Distributed discrete noise added by each client before secure aggregation.

    Attributes:
      kind: ``"ddg"`` (distributed discrete Gaussian) or ``"skellam"``.
      noise_multiplier: z > 0: the central noise std over ``clip_norm`` when the expected
        ``n`` shares reach the sum.
      clip_norm: c, the L2 clip of a (rotated) update, in float units.
      bits: b, the ring ``Z_(2^b)``.
      dim: the padded length ``p`` of an encoded update (a power of two for the rotation).
      expected_clients: m > 0, the expected clients (possibly fractional, ``q N``): the
        local std is sized so that ``m`` shares make the central ``z c``; a round
        recorded without its survivors counts ``max(1, floor(m))`` shares.
      scale: gamma (ring units per float unit); None: :func:`distributed_scale` for sums
        of at most ``ceil(m)`` clients (a run passes the scale its encoding uses).
      beta: conditional rounding's beta in [0, 1) (0: plain rounding, worst-case norm).
      k_stddevs: the automatic scale's k.
    """

    kind: str
    noise_multiplier: float
    clip_norm: float
    bits: int
    dim: int
    expected_clients: float
    scale: float | None = None
    beta: float = DEFAULT_BETA
    k_stddevs: float = 4.0

    def __post_init__(self):
        check_choice("kind", self.kind, KINDS)
        check_noise_multiplier("noise_multiplier", self.noise_multiplier)
        check_float("clip_norm", self.clip_norm, min_value=0.0, min_exclusive=True)
        check_bits(self.bits)
        check_int("dim", self.dim, min_value=1)
        check_float("expected_clients", self.expected_clients, min_value=0.0,
                    min_exclusive=True)
        check_float("beta", self.beta, min_value=0.0, max_value=1.0, max_exclusive=True)
        if self.scale is None:
            object.__setattr__(self, "scale", distributed_scale(
                self.bits, self.clip_norm, self.dim, math.ceil(self.expected_clients),
                self.noise_multiplier, k_stddevs=self.k_stddevs,
                expected_clients=self.expected_clients))
        check_float("scale", self.scale, min_value=0.0, min_exclusive=True)

    @property
    def expected_survivors(self) -> int:
        """The shares a round recorded without survivors counts: ``max(1, floor(m))``."""
        return max(1, math.floor(self.expected_clients + 1e-9))

    @property
    def mechanism(self) -> str:
        return MECHANISM[self.kind]

    @property
    def local_std(self) -> float:
        """sigma = z c gamma / sqrt(m): one client's noise std in ring units."""
        return (self.noise_multiplier * self.clip_norm * self.scale
                / math.sqrt(self.expected_clients))

    @property
    def l2_sensitivity(self) -> float:
        """Delta_2 = inflated_norm_bound(gamma c, p, beta), ring units."""
        return inflated_norm_bound(self.scale * self.clip_norm, self.dim, self.beta)

    @property
    def l1_sensitivity(self) -> float:
        """Delta_1 = min(Delta_2^2, sqrt(p) Delta_2) (integer vectors), ring units."""
        d2 = self.l2_sensitivity
        return min(d2 * d2, math.sqrt(self.dim) * d2)

    def rdp(self, survivors: int | None = None, orders=RDP_ORDERS) -> np.ndarray:
        """One round's unamplified RDP with ``survivors`` shares (None: the expected) in
        the sum; 0 survivors release nothing (no update reached the sum either): RDP 0."""
        s = self.expected_survivors if survivors is None else check_int(
            "survivors", survivors, min_value=0)
        if s == 0:
            return np.zeros_like(_orders(orders))
        sens = dict(l2_sensitivity=self.l2_sensitivity, l1_sensitivity=self.l1_sensitivity)
        if self.kind == "ddg":
            return ddg_rdp(orders, local_std=self.local_std, num_shares=s, dim=self.dim,
                           **sens)
        return skellam_rdp(orders, variance=s * self.local_std ** 2, **sens)

    def check_samplable(self) -> None:
        """Raises a one-line ConfigError (naming ``bits``) when the int32 samplers of
        :mod:`fedjax_sim.secagg.discrete` cannot draw the local shares exactly. Accounting
        needs no such limit; a stage that samples the shares calls this when built."""
        sigma = self.local_std
        if self.kind == "ddg" and sigma > MAX_DISCRETE_GAUSSIAN_SIGMA:
            fail("bits", self.bits, f"gives a local noise std of {sigma:.4g} ring units, "
                 f"above the int32 sampler's {MAX_DISCRETE_GAUSSIAN_SIGMA:g}; use fewer bits")
        if self.kind == "skellam" and sigma ** 2 > MAX_SKELLAM_VARIANCE:
            fail("bits", self.bits, f"gives a local Skellam variance of {sigma ** 2:.4g} ring "
                 f"units, above the int32 sampler's {MAX_SKELLAM_VARIANCE:g}; use fewer "
                 "bits or kind='ddg'")

    def ledger(self, sampling: SamplingSpec, *, accountant: str = "rdp",
               delta: float | None = None, bound: float | None = None
               ) -> "DistributedAccountant":
        """The :class:`DistributedAccountant` of this noise under ``sampling``.

        ``bound`` (the per-client bound of the stages before the sum) is accepted for the
        interface of :class:`~fedjax_sim.privacy.GaussianSumNoise` and not needed: the
        encoding clips to ``clip_norm`` itself, and the sensitivity is ``Delta_2``.
        """
        if accountant != "rdp":
            fail("accountant", accountant, "distributed DP (ddg, skellam) is accounted with "
                 "rdp only")
        return DistributedAccountant(self, sampling, delta=delta)

    def describe(self) -> str:
        return (f"{self.mechanism} noise (z={self.noise_multiplier:g}, {self.bits}-bit ring, "
                f"scale={self.scale:.4g}, local std={self.local_std:.4g} ring units)")


@dataclasses.dataclass(frozen=True)
class DistributedLedger:
    """What a :class:`DistributedAccountant` has recorded (no dp-accounting event exists
    for these mechanisms): the noise, the schedule, and rounds per survivors count."""

    noise: DistributedNoise
    sampling: SamplingSpec
    rounds_by_survivors: tuple[tuple[int, int], ...]


class DistributedAccountant:
    """Host-side ledger of distributed-DP rounds; the interface of
    :class:`~fedjax_sim.privacy.Accountant` plus each round's survivors.

    Guarantee: after the recorded rounds, the sequence of released sums is client-level
    (epsilon, delta)-DP (add/remove one client, Poisson sampling), under the assumptions
    in :meth:`summary`. Each round is accounted with its own survivors (one RDP curve
    per distinct count, cached); composition adds the curves.
    """

    accounts_survivors = True  # the run's reporter passes each round's survivors

    def __init__(self, noise: DistributedNoise, sampling: SamplingSpec, *,
                 delta: float | None = None):
        if not isinstance(noise, DistributedNoise):
            fail("noise", noise, "must be a DistributedNoise")
        if not isinstance(sampling, SamplingSpec):
            fail("sampling", sampling, "must be a SamplingSpec")
        if sampling.kind != "poisson":
            fail("sampling", sampling.kind, "distributed DP is accounted under Poisson "
                 "sampling only (no sound amplification bound for fixed-size or cyclic "
                 "schedules is implemented)")
        self._noise, self._sampling = noise, sampling
        self._delta = None if delta is None else check_delta("delta", delta)
        self._counts: dict[int, int] = {}
        self._curves: dict[int, np.ndarray] = {}

    @property
    def noise(self) -> DistributedNoise:
        return self._noise

    @property
    def rounds(self) -> int:
        return sum(self._counts.values())

    @property
    def noise_multiplier(self) -> float:
        return self._noise.noise_multiplier

    def record_round(self, count: int = 1, *, survivors: int | None = None) -> None:
        """Records ``count`` rounds whose sums held ``survivors`` noise shares (None:
        ``noise.expected_survivors``)."""
        count = check_int("count", count, min_value=0)
        s = (self._noise.expected_survivors if survivors is None
             else check_int("survivors", survivors, min_value=0))
        if count:
            self._counts[s] = self._counts.get(s, 0) + count

    def round_rdp(self, survivors: int | None = None) -> np.ndarray:
        """One amplified round's RDP at :data:`RDP_ORDERS` (cached per survivors)."""
        s = self._noise.expected_survivors if survivors is None else survivors
        if s not in self._curves:
            self._curves[s] = poisson_subsampled_rdp(
                lambda a: self._noise.rdp(s, a), self._sampling.rate, RDP_ORDERS)
        return self._curves[s]

    def rdp(self) -> tuple[np.ndarray, np.ndarray]:
        """``(orders, rdp)`` of everything recorded so far."""
        total = np.zeros(len(RDP_ORDERS))
        for s, count in self._counts.items():
            total = total + count * self.round_rdp(s)
        return np.asarray(RDP_ORDERS), total

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon of everything recorded so far at ``delta`` (default: the ledger's)."""
        delta = resolve_delta(delta, self._delta)
        if self.rounds == 0:
            return 0.0
        orders, rdp = self.rdp()
        return float(_rdp_lib.compute_epsilon(orders, rdp, delta)[0])

    def ledger(self) -> DistributedLedger:
        """The recorded rounds (a dp-accounting event does not exist for these)."""
        return DistributedLedger(self._noise, self._sampling,
                                 tuple(sorted(self._counts.items())))

    def summary(self, delta: float | None = None) -> dict[str, Any]:
        """The guarantee of the rounds recorded so far: figures, assumptions, a sentence."""
        eps = self.epsilon(delta)
        delta = self._delta if delta is None else delta
        nz, spec = self._noise, self._sampling
        return {"dp": True, "mechanism": nz.mechanism, "epsilon": eps, "delta": delta,
                "noise_multiplier": nz.noise_multiplier, "accountant": "rdp",
                "sampling": spec.describe(), "adjacency": spec.adjacency,
                "rounds": self.rounds, "bits": nz.bits, "scale": nz.scale,
                "local_std": nz.local_std, "l2_sensitivity": nz.l2_sensitivity,
                "expected_clients": nz.expected_clients, "beta": nz.beta,
                "rounds_by_survivors": {str(s): c for s, c in sorted(self._counts.items())},
                "assumptions": [
                    "each client's rotated update is clipped to clip_norm, scaled and "
                    "conditionally rounded to L2 norm <= l2_sensitivity (a rejected rounding "
                    "is replaced, e.g. by zeros), and carries its own secret noise share",
                    "the server sees only the modular sum; the shares of the clients whose "
                    "uploads reached it count as central noise (survivors x local variance); "
                    "a client that withholds its noise counts as dropped",
                    "one client's update moves the sum with the shares held fixed (the "
                    "papers' add/remove analysis); Poisson sampling, never truncated, "
                    "amplified by Zhu & Wang 2019's general bound",
                    "nothing else reads the clients' data"],
                "statement": f"client-level ({eps:.4g}, {delta:.3g})-DP for all {self.rounds} "
                             f"released models ({nz.mechanism}, z={nz.noise_multiplier:.4g}, "
                             f"{nz.bits}-bit ring, {spec.adjacency}, {spec.describe()}, rdp)"}


def expected_survivors(expected_clients: float, dropout: float) -> int:
    """``floor((1 - dropout) m)``, the shares counted under a dropout rate (>= 1)."""
    m = check_float("expected_clients", expected_clients, min_value=0.0, min_exclusive=True)
    d = check_float("dropout", dropout, min_value=0.0, max_value=1.0, max_exclusive=True)
    s = math.floor((1.0 - d) * m + 1e-9)
    if s < 1:
        fail("dropout", d, f"leaves no client of the expected {m:g} in the sum")
    return s


def calibrate_distributed(target_epsilon: float, delta: float, rounds: int, kind: str, *,
                          clip_norm: float, bits: int, dim: int, expected_clients: float,
                          sampling: SamplingSpec, beta: float = DEFAULT_BETA,
                          k_stddevs: float = 4.0, scale: float | Callable[[float], float]
                          | None = None,
                          dropout: float = 0.0, tol: float = 1e-4) -> float:
    """The smallest z (within relative ``tol``, by bisection) whose epsilon after
    ``rounds`` rounds with ``expected_survivors(n, dropout)`` shares is <= the target.

    The scale follows z (:func:`distributed_scale`) unless given, as a number or as a
    function of z (a run passes the scale its encoding uses for each z), so with few
    bits the rounding caps the effective noise and a target may be unreachable (a
    one-line ConfigError naming ``target_epsilon``).
    """
    target = check_float("target_epsilon", target_epsilon, min_value=0.0, min_exclusive=True)
    delta = check_delta("delta", delta)
    rounds = check_int("rounds", rounds, min_value=1)
    tol = check_float("tol", tol, min_value=0.0, min_exclusive=True, max_value=0.5)
    survivors = expected_survivors(expected_clients, dropout)

    def eps(z: float, *, probe: bool = True) -> float:
        try:
            gamma = scale(z) if callable(scale) else scale
            noise = DistributedNoise(kind, z, clip_norm, bits, dim, expected_clients, gamma,
                                     beta, k_stddevs)
        except ValueError:
            if probe:
                return math.inf
            raise
        acc = noise.ledger(sampling, delta=delta)
        acc.record_round(rounds, survivors=survivors)
        return acc.epsilon()

    eps(1.0, probe=False)  # any error of the settings themselves, as it is
    hi = 1.0
    while eps(hi) > target:
        hi *= 2.0
        if hi > 2.0 ** 20:
            fail("target_epsilon", target, f"unreachable with {kind} at bits={bits}: the "
                 "rounding and the ring's range cap the effective noise")
    lo = hi / 2.0
    while eps(lo) <= target:
        hi, lo = lo, lo / 2.0
        if lo < 1e-6:
            return hi
    while hi - lo > tol * hi:
        mid = (lo + hi) / 2.0
        lo, hi = (lo, mid) if eps(mid) <= target else (mid, hi)
    return hi


__all__ = ["DEFAULT_BETA", "DistributedAccountant", "DistributedLedger", "DistributedNoise",
           "KINDS", "MECHANISM", "RDP_ORDERS", "calibrate_distributed", "ddg_rdp", "ddg_tau",
           "distributed_scale", "expected_survivors", "poisson_subsampled_rdp",
           "skellam_rdp"]
