"""Accounting of distributed DP (DDG, Skellam) under secure aggregation: the Poisson
amplification bound against dp-accounting, the Gaussian limit, dropout, calibration."""

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib
from scipy.special import ive, logsumexp

from fedjax_sim._validation import ConfigError
from fedjax_sim.privacy import PrivacyConfig, SamplingSpec, epsilon_for
from fedjax_sim.privacy.distributed import (RDP_ORDERS, DistributedAccountant,
                                            DistributedLedger, DistributedNoise,
                                            calibrate_distributed, ddg_rdp, ddg_tau,
                                            distributed_scale, expected_survivors,
                                            poisson_subsampled_rdp, skellam_rdp)
from fedjax_sim.secagg.discrete import inflated_norm_bound
from fedjax_sim.secagg.encoding import choose_scale

DELTA = 1e-5
ORDERS = np.asarray(RDP_ORDERS)


def _gaussian_rdp(q, z):
    acc = dp_accounting.rdp.RdpAccountant(list(RDP_ORDERS))
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)))
    return acc._rdp  # noqa: SLF001 (the composed curve; dp-accounting has no getter)


def _epsilon(noise, q, rounds, survivors=None):
    acc = noise.ledger(SamplingSpec.poisson(q), accountant="rdp", delta=DELTA, bound=None)
    acc.record_round(rounds, survivors=survivors)
    return acc.epsilon()


@pytest.mark.parametrize("q,z", [(0.01, 1.1), (0.05, 2.0), (0.2, 0.8)])
def test_poisson_bound_upper_bounds_and_tracks_dp_accounting_on_a_gaussian(q, z):
    ours = poisson_subsampled_rdp(lambda a: a / (2 * z * z), q, ORDERS)
    ref = _gaussian_rdp(q, z)
    ints = ORDERS == np.floor(ORDERS)
    # an upper bound where both are exact, and within Zhu & Wang's log(3)/(alpha-1) of the
    # exact sampled Gaussian (their general bound pays at most a factor 3 inside the log)
    assert np.all(ours[ints] >= ref[ints] * (1 - 1e-9))
    assert np.all(ours[ints] <= ref[ints] + math.log(3) / (ORDERS[ints] - 1) + 1e-9)
    assert np.all(ours <= ORDERS / (2 * z * z) + 1e-12)  # never worse than no sampling
    for rounds in (1, 100):
        eps = rdp_lib.compute_epsilon(ORDERS, rounds * ours, DELTA)[0]
        want = rdp_lib.compute_epsilon(ORDERS, rounds * ref, DELTA)[0]
        assert want <= eps <= 1.6 * want
        if q == 0.01:  # the usual DP-FL regime: close
            assert eps <= 1.1 * want
    # q = 1 is the curve itself
    np.testing.assert_array_equal(poisson_subsampled_rdp(lambda a: a / 2.0, 1.0, ORDERS),
                                  ORDERS / 2.0)


@pytest.mark.parametrize("kind,bits", [("ddg", 32), ("skellam", 20)])
def test_many_bits_tend_to_the_gaussian_mechanism(kind, bits):
    z, n, p = 1.1, 100, 1024
    noise = DistributedNoise(kind, z, 1.0, bits, p, n)
    assert noise.l2_sensitivity / (noise.scale * noise.clip_norm) < 1 + 1e-4
    gauss = epsilon_for(1, PrivacyConfig(z, SamplingSpec.poisson(1.0)), DELTA)
    assert _epsilon(noise, 1.0, 1) == pytest.approx(gauss, rel=1e-3)
    # with sampling: the same amplification bound applied to the Gaussian curve
    q = 0.02
    amplified = poisson_subsampled_rdp(lambda a: a / (2 * z * z), q, ORDERS)
    want = rdp_lib.compute_epsilon(ORDERS, 50 * amplified, DELTA)[0]
    got = _epsilon(noise, q, 50)
    assert got == pytest.approx(want, rel=2e-3) and got >= want
    assert got >= epsilon_for(50, PrivacyConfig(z, SamplingSpec.poisson(q)), DELTA)


def test_few_bits_cost_privacy():
    eps = [_epsilon(DistributedNoise("ddg", 1.0, 1.0, b, 4096, 100), 0.01, 100)
           for b in (32, 12, 10)]
    assert eps[0] < eps[1] < eps[2]


@pytest.mark.parametrize("kind,bits", [("ddg", 32), ("skellam", 20)])
def test_dropout_raises_epsilon_like_less_noise(kind, bits):
    noise = DistributedNoise(kind, 3.0, 1.0, bits, 1024, 100)
    eps0 = _epsilon(noise, 1.0, 1)
    for d in (0.2, 0.5):
        eps = _epsilon(noise, 1.0, 1, survivors=expected_survivors(100, d))
        assert eps > eps0
        assert eps == pytest.approx(eps0 / math.sqrt(1 - d), rel=0.1)


def test_rounds_with_different_survivors_compose():
    noise = DistributedNoise("ddg", 1.0, 1.0, 16, 1024, 50)
    acc = DistributedAccountant(noise, SamplingSpec.poisson(0.05), delta=DELTA)
    assert acc.epsilon() == 0.0 and acc.rounds == 0
    acc.record_round(3)
    acc.record_round(2, survivors=40)
    acc.record_round(survivors=0)  # nothing reached the sum: no cost
    assert acc.rounds == 6 and acc.noise_multiplier == 1.0
    want = 3 * acc.round_rdp(50) + 2 * acc.round_rdp(40)
    orders, rdp = acc.rdp()
    np.testing.assert_allclose(rdp, want)
    assert acc.epsilon() == pytest.approx(rdp_lib.compute_epsilon(orders, want, DELTA)[0])
    assert acc.epsilon(1e-3) < acc.epsilon()
    ledger = acc.ledger()
    assert isinstance(ledger, DistributedLedger)
    assert ledger.rounds_by_survivors == ((0, 1), (40, 2), (50, 3))
    s = acc.summary()
    assert s["dp"] is True and s["mechanism"] == "distributed_discrete_gaussian"
    assert s["epsilon"] == acc.epsilon() and s["delta"] == DELTA and s["rounds"] == 6
    assert s["adjacency"] == "add/remove one client" and s["assumptions"]
    assert "released models" in s["statement"]
    assert DistributedNoise("skellam", 1.0, 1.0, 16, 1024, 50).ledger(
        SamplingSpec.poisson(0.1)).summary(DELTA)["mechanism"] == "skellam"


def test_rdp_formulas_against_closed_forms():
    # one share: a single discrete Gaussian, alpha/2 (Delta_2 / sigma)^2 exactly
    np.testing.assert_allclose(ddg_rdp(ORDERS, l2_sensitivity=3.0, l1_sensitivity=9.0,
                                       local_std=2.0, num_shares=1, dim=16),
                               ORDERS / 2 * (3.0 / 2.0) ** 2)
    assert ddg_tau(0.5, 4) == pytest.approx(
        10 * sum(math.exp(-2 * math.pi ** 2 * 0.25 * k / (k + 1)) for k in (1, 2, 3)))
    # the tau term makes small shares cost more than the Gaussian alone
    small = ddg_rdp(ORDERS, l2_sensitivity=3.0, l1_sensitivity=9.0, local_std=0.5,
                    num_shares=100, dim=1024)
    assert np.all(small > ORDERS / 2 * (3.0 / 5.0) ** 2)
    # Skellam: alpha D2^2/(2 mu) + min(((2 alpha - 1) D2^2 + 6 D1)/(4 mu^2), 3 D1/(2 mu))
    a, d2, d1, mu = 7.0, 4.0, 10.0, 50.0
    want = a * d2 ** 2 / (2 * mu) + min(((2 * a - 1) * d2 ** 2 + 6 * d1) / (4 * mu ** 2),
                                        3 * d1 / (2 * mu))
    got = skellam_rdp(np.asarray([6.5, 7.0]), l2_sensitivity=d2, l1_sensitivity=d1,
                      variance=mu)
    np.testing.assert_allclose(got, [want, want])  # 6.5 is bounded by order 7


def _renyi_of_shift(log_pmf, shift, alpha):
    """D_alpha(P(. - shift) || P) of a pmf given as logs on consecutive integers."""
    p, q = log_pmf[:len(log_pmf) - shift], log_pmf[shift:]
    return logsumexp(alpha * p + (1 - alpha) * q) / (alpha - 1)


def test_rdp_bounds_hold_against_exact_one_dimensional_divergences():
    """The exact Renyi divergence of a shifted 1-D noise (d = 1, Delta_1 = Delta_2) is
    under each bound, and the bounds are nearly tight in their Gaussian regime."""
    k = np.arange(-150, 151)
    alphas = np.arange(2.0, 21.0)

    def convolve(a, b):  # log-pmf of the sum of two independent shares
        out = np.empty_like(a)
        for i, kk in enumerate(k):
            j = kk - k
            ok = np.abs(j) <= 150
            out[i] = logsumexp(a[ok] + b[j[ok] + 150])
        return out

    for sigma, shares in [(0.4, 4), (0.6, 3), (1.0, 2), (2.0, 1)]:
        one = -k.astype(np.float64) ** 2 / (2 * sigma * sigma)
        one = one - logsumexp(one)
        total = one
        for _ in range(shares - 1):
            total = convolve(total, one)
        for shift in (1, 2):
            exact = np.array([_renyi_of_shift(total, shift, a) for a in alphas])
            bound = ddg_rdp(alphas, l2_sensitivity=shift, l1_sensitivity=shift,
                            local_std=sigma, num_shares=shares, dim=1)
            assert np.all(exact <= bound * (1 + 1e-9))
            if sigma >= 1.0:
                assert np.all(exact >= 0.995 * bound)
    k = np.arange(-120, 121)
    for mu in (0.5, 8.0, 30.0):
        log_pmf = np.log(ive(np.abs(k), mu))  # Skellam of variance mu
        for shift in (1, 3):
            exact = np.array([_renyi_of_shift(log_pmf, shift, a) for a in alphas])
            bound = skellam_rdp(alphas, l2_sensitivity=shift, l1_sensitivity=shift,
                                variance=mu)
            assert np.all(exact <= bound * (1 + 1e-9))
        if mu == 30.0:
            assert np.all(exact >= 0.65 * bound)


def test_sensitivities_and_local_std():
    noise = DistributedNoise("ddg", 0.8, 2.0, 16, 256, 64, scale=10.0, beta=0.1)
    d2 = inflated_norm_bound(20.0, 256, 0.1)
    assert noise.l2_sensitivity == d2
    assert noise.l1_sensitivity == min(d2 * d2, 16.0 * d2)
    assert noise.local_std == pytest.approx(0.8 * 2.0 * 10.0 / 8.0)
    assert noise.expected_survivors == 64
    assert DistributedNoise("ddg", 0.8, 2.0, 16, 256, 12.7).expected_survivors == 12
    assert "z=0.8" in noise.describe()


def test_distributed_scale_is_the_encodings_scale_with_noise():
    b, c, p, n, z, k = 20, 0.5, 4096, 200, 1.3, 3.0
    assert distributed_scale(16, 1.0, 1024, 50, 0.0) == choose_scale(16, 1.0, 1000, 50)
    gamma = distributed_scale(b, c, p, n, z, k_stddevs=k, expected_clients=150.0)
    assert gamma == choose_scale(b, c, p, n, k_stddevs=k, noise_multiplier=z,
                                 expected_clients=150.0)
    more_noise = distributed_scale(b, c, p, n, 2 * z, k_stddevs=k, expected_clients=150.0)
    assert more_noise < gamma  # the ring must hold the noise too
    noise = DistributedNoise("ddg", z, c, b, p, 150.0, k_stddevs=k)
    assert noise.scale == distributed_scale(b, c, p, 150, z, k_stddevs=k,
                                            expected_clients=150.0)
    with pytest.raises(ConfigError, match=r"^bits=8: is too few for a cohort of 200"):
        distributed_scale(8, c, p, 200, z)


@pytest.mark.parametrize("kind,dropout", [("ddg", 0.0), ("skellam", 0.3)])
def test_calibration_round_trips(kind, dropout):
    sampling = SamplingSpec.poisson(0.02)
    settings = dict(clip_norm=1.0, bits=16, dim=1024, expected_clients=100)
    z = calibrate_distributed(2.0, DELTA, 200, kind, sampling=sampling, dropout=dropout,
                              tol=1e-4, **settings)
    survivors = expected_survivors(100, dropout)

    def eps(zz):
        return _epsilon(DistributedNoise(kind, zz, **settings), 0.02, 200, survivors)

    assert eps(z) <= 2.0 < eps(z * (1 - 3e-4))
    with pytest.raises(ConfigError, match=r"^target_epsilon=0.5: unreachable"):
        calibrate_distributed(0.5, DELTA, 200, kind, sampling=sampling, clip_norm=1.0,
                              bits=6, dim=1024, expected_clients=10)


@pytest.mark.parametrize("build,field", [
    (lambda: DistributedNoise("ddg", -1.0, 1.0, 16, 64, 10), "noise_multiplier"),
    (lambda: DistributedNoise("ddg", 1.0, 1.0, 33, 64, 10), "bits"),
    (lambda: DistributedNoise("ddg", 1.0, 1.0, 0, 64, 10), "bits"),
    (lambda: DistributedNoise("ddg", 1.0, 1.0, 16, 64, 0), "expected_clients"),
    (lambda: DistributedNoise("ddg", 1.0, 1.0, 16, 64, 10, beta=1.0), "beta"),
    (lambda: DistributedNoise("gauss", 1.0, 1.0, 16, 64, 10), "kind"),
    (lambda: DistributedNoise("ddg", 1.0, 0.0, 16, 64, 10), "clip_norm"),
    (lambda: DistributedNoise("ddg", 1.0, 1.0, 16, 64, 10).ledger(
        SamplingSpec.poisson(0.1), accountant="pld"), "accountant"),
    (lambda: DistributedNoise("ddg", 1.0, 1.0, 16, 64, 10).ledger(
        SamplingSpec.fixed(10, 100)), "sampling"),
    (lambda: DistributedNoise("ddg", 1.0, 1.0, 16, 64, 10).ledger(
        SamplingSpec.poisson(0.1)).record_round(survivors=-1), "survivors"),
    (lambda: DistributedNoise("ddg", 1.0, 1.0, 16, 64, 10).ledger(
        SamplingSpec.poisson(0.1)).record_round(1).__class__, None),
    (lambda: DistributedNoise("ddg", 1.0, 1.0, 16, 64, 10).ledger(
        SamplingSpec.poisson(0.1)).epsilon(), "delta"),
    (lambda: expected_survivors(10, 1.0), "dropout"),
    (lambda: expected_survivors(10, 0.95), "dropout"),
    (lambda: DistributedNoise("skellam", 1.0, 1.0, 32, 1024, 100).check_samplable(), "bits"),
])
def test_bad_inputs_are_one_line_errors(build, field):
    if field is None:
        build()  # record_round(1) itself is fine
        return
    with pytest.raises(ConfigError) as e:
        build()
    msg = str(e.value)
    assert msg.startswith(f"{field}=") and "\n" not in msg


def test_rdp_orders_are_dp_accountings_and_importing_needs_no_dp_accounting():
    from dp_accounting.rdp import rdp_privacy_accountant

    from fedjax_sim.privacy.distributed import RDP_ORDERS

    assert RDP_ORDERS == tuple(float(a) for a in rdp_privacy_accountant.DEFAULT_RDP_ORDERS)
    import subprocess
    import sys
    code = ("import sys, fedjax_sim, fedjax_sim.privacy; "
            "print('dp_accounting' in sys.modules, 'scipy.stats' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.split() == ["False", "False"], out.stderr[-1000:]
