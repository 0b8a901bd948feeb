"""Canary auditing (fedjax_sim.privacy.auditing): privacy profiles, the one-shot estimate and
the one-run bound, checked against dp-accounting, the papers' closed forms and simulated
single Gaussian releases."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

from fedjax_sim._validation import ConfigError
from fedjax_sim.privacy.auditing import (canary_inclusion, canary_scores,
                                         epsilon_between_gaussians, gaussian_epsilon,
                                         max_over_iterates, one_run_lower_bound,
                                         one_shot_estimate, canary_directions)

DELTA = 1e-5


# ------------------------------------------------------------------- privacy profiles


@pytest.mark.parametrize("mu", [0.5, 1.0, 2.0])
def test_gaussian_epsilon_matches_dp_accounting_pld(mu):
    from dp_accounting.pld import privacy_loss_distribution as pld

    # One release of the Gaussian mechanism with sensitivity 1 and noise std 1/mu.
    ref = pld.from_gaussian_mechanism(standard_deviation=1.0 / mu, sensitivity=1.0,
                                      value_discretization_interval=1e-3)
    assert gaussian_epsilon(mu, DELTA) == pytest.approx(ref.get_epsilon_for_delta(DELTA),
                                                        rel=1e-2)


def test_gaussian_epsilon_edges():
    assert gaussian_epsilon(math.inf, DELTA) == math.inf
    assert gaussian_epsilon(0.0, DELTA) == 0.0
    tv = stats.norm.cdf(0.5) - stats.norm.cdf(-0.5)  # delta(0) of 1-GDP
    assert gaussian_epsilon(1.0, tv + 1e-3) == 0.0
    assert 0.0 < gaussian_epsilon(1.0, tv - 1e-3) < 0.01
    assert gaussian_epsilon(1.0, 1e-3) < gaussian_epsilon(1.0, DELTA)  # smaller delta costs


@pytest.mark.parametrize("mu0,sigma,gap", [(0.0, 1.0, 0.5), (3.0, 2.0, 2.0), (-1.0, 0.01, 0.02),
                                           (0.0, 1.0, 5.0)])
def test_equal_variances_are_gaussian_dp(mu0, sigma, gap):
    want = gaussian_epsilon(gap / sigma, DELTA)
    assert epsilon_between_gaussians(mu0, sigma, mu0 + gap, sigma, DELTA) == pytest.approx(
        want, rel=1e-8)
    assert epsilon_between_gaussians(mu0, sigma, mu0 - gap, sigma, DELTA) == pytest.approx(
        want, rel=1e-8)


def test_profile_symmetric_and_affine_invariant():
    # The profile takes both orders, and x -> a x + b is an invertible post-processing.
    for args in [(0.0, 1.0, 1.0, 0.5), (0.2, 0.7, -0.4, 1.3), (0.0, 1.0, 0.0, 1.2)]:
        mu0, s0, mu1, s1 = args
        eps = epsilon_between_gaussians(mu0, s0, mu1, s1, DELTA)
        assert epsilon_between_gaussians(mu1, s1, mu0, s0, DELTA) == pytest.approx(eps, rel=1e-9)
        a, b = 3.0, -7.0
        assert epsilon_between_gaussians(a * mu0 + b, a * s0, a * mu1 + b, a * s1,
                                          DELTA) == pytest.approx(eps, rel=1e-7)


def test_profile_monotone_in_mean_gap():
    eps = [epsilon_between_gaussians(0.0, 1.0, g, 1.0, DELTA) for g in (0.0, 0.1, 0.5, 1, 2, 4)]
    assert eps[0] == 0.0 and np.all(np.diff(eps) > 0)


def test_unequal_variances_post_processing_and_exact_delta():
    # Adding the same independent N(0, tau^2) to both is post-processing: epsilon cannot grow.
    eps = [epsilon_between_gaussians(0.0, math.sqrt(1 + t * t), 1.0, math.sqrt(0.25 + t * t),
                                     DELTA) for t in (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)]
    assert np.all(np.diff(eps) <= 1e-9) and eps[-1] < eps[0]
    # Unequal variances are distinguishable even with equal means.
    assert epsilon_between_gaussians(0.0, 1.0, 0.0, 1.2, DELTA) > 0.5
    # At the returned epsilon the hockey-stick divergence, by quadrature, is delta.
    def hockey(p, q, eps):
        return integrate.quad(lambda x: max(0.0, p.pdf(x) - math.exp(eps) * q.pdf(x)), -40, 40,
                              points=[-5, 0, 5], limit=500, epsabs=1e-13, epsrel=1e-10)[0]

    for mu0, s0, mu1, s1, delta in [(0.0, 1.0, 1.0, 0.8, DELTA), (0.0, 1.0, 0.5, 1.3, 1e-3)]:
        e = epsilon_between_gaussians(mu0, s0, mu1, s1, delta)
        p0, p1 = stats.norm(mu0, s0), stats.norm(mu1, s1)
        assert max(hockey(p1, p0, e), hockey(p0, p1, e)) == pytest.approx(delta, rel=1e-4)


# -------------------------------------------------------- single Gaussian release tests


def test_one_shot_estimate_recovers_gaussian_mechanism_epsilon():
    """Release = sum of the inserted canaries (clip norm 1) + N(0, z^2 I_d); score = cosine.

    The canaries are a random orthonormal frame (each row uniform on the sphere, no mutual
    interference); cosines are invariant to the frame's common rotation, so the frame is
    taken as the first m coordinate axes. Each canary then sees exactly the Gaussian
    mechanism with sensitivity 1 and noise z (mu = 1/z). The fitted Gaussians need many
    canaries: a sampled spread mismatch makes the fitted pair's privacy loss unbounded and
    biases the unpooled estimate up (at 500 per group it overshoots by > 25 % in most runs
    at z = 2), hence 10,000 per group; the pooled default is checked at 500 a group below.
    """
    m, d = 20_000, 40_000
    inserted = canary_inclusion(0, m)
    rng = np.random.default_rng(1)
    for z in (0.5, 1.0, 2.0):
        release = z * rng.standard_normal(d)
        release[:m] += inserted
        scores = release[:m] / np.linalg.norm(release)
        want = gaussian_epsilon(1.0 / z, DELTA)
        for pooled in (True, False):
            est = one_shot_estimate(scores[inserted], scores[~inserted], DELTA,
                                    pooled=pooled)
            assert est == pytest.approx(want, rel=0.25), (z, pooled)


@pytest.fixture(scope="module")
def isotropic_release():
    """m = 1000 isotropic random canaries in d = 20,000, half inserted, and the scores
    (:func:`canary_scores` on JAX arrays) of the release ``sum_inserted c_j + z N(0, I_d)``
    for each z. The directions are drawn as :func:`canary_directions` draws them (normal
    over its norm) but with NumPy: JAX's CPU generator at the suite's optimisation level
    takes seconds for 2e7 normals."""
    m, d = 1000, 20_000
    rng = np.random.default_rng(0)
    dirs = rng.standard_normal((m, d), dtype=np.float32)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    inserted = canary_inclusion(3, m)
    signal = inserted.astype(np.float32) @ dirs
    noise = rng.standard_normal(d, dtype=np.float32)
    dirs_jax = jnp.asarray(dirs)
    scores = {z: np.asarray(canary_scores(jnp.asarray(signal + np.float32(z) * noise), dirs_jax))
              for z in (1e-3, 0.5, 1.0, 2.0)}
    return dirs, inserted, scores


def test_canary_scores_are_cosines(isotropic_release):
    dirs, inserted, scores = isotropic_release
    release = inserted.astype(np.float64) @ dirs
    d64 = dirs.astype(np.float64)
    want = d64 @ release / (np.linalg.norm(d64, axis=1) * np.linalg.norm(release))
    got = canary_scores(release, dirs)  # NumPy float64 input: cast to float32
    assert got.dtype == jnp.float32 and got.shape == (1000,)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-6)
    np.testing.assert_array_equal(np.asarray(canary_scores(np.zeros(20, np.float32),
                                                           dirs[:4, :20])), 0.0)


def test_pooled_estimate_with_a_thousand_random_canaries(isotropic_release):
    """The default (pooled) fit on 1,000 isotropic random canaries in d = 20,000 (their
    mutual interference included) is within 25 % of the Gaussian mechanism's epsilon."""
    _, inserted, scores = isotropic_release
    for z in (0.5, 1.0, 2.0):
        est = one_shot_estimate(scores[z][inserted], scores[z][~inserted], DELTA)
        assert est == pytest.approx(gaussian_epsilon(1.0 / z, DELTA), rel=0.25), z


def test_no_noise_estimate_is_large(isotropic_release):
    _, inserted, scores = isotropic_release
    s = scores[1e-3]
    # Capped only by the canaries' mutual interference (about sqrt(d / (m / 2)) = 6.3 GDP).
    assert one_shot_estimate(s[inserted], s[~inserted], DELTA) > 20


@pytest.mark.parametrize("k_plus,k_minus", [(50, None), (100, 0), (50, 50)])
def test_one_run_bound_below_true_epsilon(isotropic_release, k_plus, k_minus):
    _, inserted, scores = isotropic_release
    for z in (0.5, 1.0, 2.0):
        bound = one_run_lower_bound(scores[z], inserted, delta=DELTA, k_plus=k_plus,
                                    k_minus=k_minus, beta=0.05)
        assert 0.0 <= bound.epsilon <= gaussian_epsilon(1.0 / z, DELTA)
        assert bound.guesses == k_plus + (k_minus or 0) and bound.correct <= bound.guesses
    # The signal is there: at z = 0.5 the audit refutes a nontrivial epsilon.
    assert one_run_lower_bound(scores[0.5], inserted, delta=DELTA, k_plus=k_plus,
                               k_minus=k_minus).epsilon > 1.0


# --------------------------------------------------------------------- one-run bound


def _guesses(m, r, v, k_minus=0):
    """Scores and inclusion for ``r`` guesses (top ``r - k_minus``, bottom ``k_minus``) of
    which exactly ``v`` are right: the first ``r - v`` top guesses are wrong."""
    k_plus = r - k_minus
    assert r - v <= k_plus
    scores = np.arange(m, 0, -1).astype(np.float64)
    inserted = np.arange(m) % 2 == 0  # the abstentions: anything
    inserted[:k_plus] = np.arange(k_plus) >= r - v
    inserted[m - k_minus:] = False
    return scores, inserted


@pytest.mark.parametrize("r,k_minus", [(10, 0), (100, 0), (100, 40)])
def test_perfect_separation_closed_form(r, k_minus):
    scores, inserted = _guesses(500, r, r, k_minus)
    beta = 0.05
    p = beta ** (1.0 / r)  # P[Binomial(r, p) = r] = p^r = beta
    bound = one_run_lower_bound(scores, inserted, delta=0.0, k_plus=r - k_minus,
                                k_minus=k_minus, beta=beta)
    assert bound.correct == r and bound.guesses == r
    assert bound.epsilon == pytest.approx(math.log(p / (1 - p)), rel=1e-6)
    with_delta = one_run_lower_bound(scores, inserted, delta=DELTA, k_plus=r - k_minus,
                                     k_minus=k_minus, beta=beta)
    assert 0.0 < with_delta.epsilon <= bound.epsilon


def _reference_p_value(eps, m, r, v, delta):
    """The paper's reference loop: the binomial tail plus ``2 m delta`` times the largest
    average pmf mass just below ``v``."""
    q = 1.0 / (1.0 + math.exp(-eps))
    below, alpha = 0.0, 0.0
    for i in range(1, v + 1):
        below += stats.binom.pmf(v - i, r, q)
        alpha = max(alpha, below / i)
    return stats.binom.sf(v - 1, r, q) + alpha * delta * 2 * m


def test_bound_is_the_binomial_crossing():
    scores, inserted = _guesses(1000, 80, 65)
    for delta in (0.0, DELTA):
        b = one_run_lower_bound(scores, inserted, delta=delta, k_plus=80, beta=0.05)
        assert b.correct == 65 and b.guesses == 80
        assert _reference_p_value(b.epsilon, 1000, 80, 65, delta) <= 0.05 + 1e-9
        assert _reference_p_value(b.epsilon + 1e-5, 1000, 80, 65, delta) > 0.05


def test_zero_without_signal():
    scores, inserted = _guesses(400, 60, 30)  # half right: eps = 0 is plausible
    assert one_run_lower_bound(scores, inserted, delta=0.0, k_plus=60).epsilon == 0.0
    # Scores independent of the coins: a positive bound is a false claim, at rate <= beta.
    rng = np.random.default_rng(0)
    positive = sum(
        one_run_lower_bound(rng.normal(size=200), canary_inclusion(t, 200), delta=0.0,
                            k_plus=20, k_minus=20, beta=0.05).epsilon > 0 for t in range(200))
    assert positive <= 20  # Binomial(200, <= 0.05): mean <= 10


@pytest.mark.parametrize("delta", [0.0, DELTA])
def test_bound_monotone_in_correct(delta):
    eps = [one_run_lower_bound(*_guesses(400, 60, v), delta=delta, k_plus=60).epsilon
           for v in range(61)]
    assert np.all(np.diff(eps) >= 0) and eps[0] == 0.0 and eps[-1] > 2.0


# ------------------------------------------------------------------- helpers and errors


def test_inclusion_and_directions():
    a = canary_inclusion(7, 10_000)
    assert a.dtype == np.bool_ and a.shape == (10_000,) and abs(a.mean() - 0.5) < 0.03
    np.testing.assert_array_equal(a, canary_inclusion(7, 10_000))
    assert not np.array_equal(a, canary_inclusion(8, 10_000))
    dirs = canary_directions(jax.random.PRNGKey(2), 5, 64)
    assert dirs.shape == (5, 64) and dirs.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(np.asarray(dirs), axis=1), 1.0, atol=1e-6)


def test_max_over_iterates_under_jit():
    dirs = np.random.default_rng(0).standard_normal((6, 32)).astype(np.float32)
    rounds = np.random.default_rng(1).standard_normal((3, 32)).astype(np.float32)
    step = jax.jit(max_over_iterates)
    running = step(None, jnp.asarray(rounds[0]), jnp.asarray(dirs))
    for t in (1, 2):
        running = step(running, jnp.asarray(rounds[t]), jnp.asarray(dirs))
    cos = rounds @ dirs.T / np.outer(np.linalg.norm(rounds, axis=1),
                                     np.linalg.norm(dirs, axis=1))
    assert running.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(running), cos.max(axis=0), rtol=1e-5, atol=1e-6)


def _one_line(excinfo, field):
    msg = str(excinfo.value)
    assert "\n" not in msg and msg.startswith(f"{field}="), msg


@pytest.mark.parametrize("call,field", [
    (lambda: one_shot_estimate([0.1], [0.0, 0.2], DELTA), "inserted_scores"),
    (lambda: one_shot_estimate([0.1, 0.3], [0.0, np.nan], DELTA), "held_out_scores"),
    (lambda: one_shot_estimate([0.1, 0.1], [0.0, 0.2], DELTA), "inserted_scores"),
    (lambda: one_shot_estimate([0.1, 0.3], [0.0, 0.2], 0.0), "delta"),
    (lambda: one_run_lower_bound(np.zeros(5), np.zeros(4, bool), delta=0.0, k_plus=1),
     "inserted.shape"),
    (lambda: one_run_lower_bound(np.zeros(5), np.zeros(5, int), delta=0.0, k_plus=1),
     "inserted.dtype"),
    (lambda: one_run_lower_bound(np.zeros(5), np.zeros(5, bool), delta=-1e-5, k_plus=1),
     "delta"),
    (lambda: one_run_lower_bound(np.zeros(5), np.zeros(5, bool), delta=0.0, k_plus=6),
     "k_plus"),
    (lambda: one_run_lower_bound(np.zeros(5), np.zeros(5, bool), delta=0.0, k_plus=3,
                                 k_minus=3), "k_minus"),
    (lambda: one_run_lower_bound(np.zeros(5), np.zeros(5, bool), delta=0.0, k_plus=0),
     "k_plus"),
    (lambda: one_run_lower_bound(np.zeros(5), np.zeros(5, bool), delta=0.0, k_plus=1,
                                 beta=0.0), "beta"),
    (lambda: gaussian_epsilon(-1.0, DELTA), "mu"),
    (lambda: gaussian_epsilon(1.0, 1.0), "delta"),
    (lambda: epsilon_between_gaussians(0.0, 0.0, 1.0, 1.0, DELTA), "sigma0"),
    (lambda: canary_scores(np.zeros(8), np.zeros((3, 7))), "directions.shape"),
    (lambda: canary_scores(np.zeros((2, 8)), np.zeros((3, 8))), "deltas.shape"),
    (lambda: max_over_iterates(np.zeros(2), np.zeros(8), np.zeros((3, 8))),
     "running_max.shape"),
    (lambda: canary_inclusion(0, 0), "num_canaries"),
    (lambda: canary_directions(jax.random.PRNGKey(0), 0, 4), "num"),
])
def test_bad_input_one_line_error(call, field):
    with pytest.raises(ConfigError) as excinfo:
        call()
    _one_line(excinfo, field)
