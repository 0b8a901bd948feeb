"""Statistical and invariant tests of the DP pieces: noise scale, clipping bound, adaptivity."""

from __future__ import annotations

import math

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from fedjax_sim import server as S
from fedjax_sim._validation import ConfigError
from fedjax_sim.privacy import (GaussianSumNoise, effective_noise_multiplier,
                                update_noise_multiplier_for)

PARAMS = {"a": jnp.zeros((6000,), jnp.float32), "b": jnp.zeros((40, 50), jnp.float32)}
KS_ALPHA = 1e-3  # fixed seeds: deterministic, and a fair scale would fail 1 time in 1000


def flat(tree):
    return np.concatenate([np.asarray(x, np.float64).reshape(-1) for x in jax.tree.leaves(tree)])


def zero_cohort(c):
    updates = jax.tree.map(lambda p: jnp.zeros((c,) + p.shape, p.dtype), PARAMS)
    return S.CohortUpdates(updates, jnp.ones((c,), jnp.float32), jnp.ones((c,), bool))


def assert_standard_normal(samples):
    assert scipy.stats.kstest(samples, scipy.stats.norm.cdf).pvalue > KS_ALPHA
    assert abs(np.std(samples) - 1.0) < 0.05


def test_gaussian_noise_has_std_z_times_s():
    z, s = 1.3, 0.7
    t = S.gaussian_noise(z, s, key=jax.random.key(0))
    assert (t.name, t.kind) == ("gaussian_noise", S.StageKind.AGGREGATE)
    assert t.mechanism == GaussianSumNoise(z, s)
    assert t.mechanism.noise_multiplier * t.mechanism.sensitivity == pytest.approx(z * s)
    assert t.bound is None and not t.unit_sum  # it bounds nothing, it adds noise
    update = jax.jit(t.update)
    state = t.init(PARAMS)
    first, state = update(PARAMS, state)
    second, state = update(PARAMS, state)
    assert_standard_normal(flat(first) / (z * s))
    assert_standard_normal(flat(second) / (z * s))
    # A fresh key every round: consecutive draws are uncorrelated.
    assert abs(np.corrcoef(flat(first), flat(second))[0, 1]) < 0.05
    # Noise is added to (not substituted for) the aggregate.
    shifted, _ = update(jax.tree.map(lambda p: p + 5.0, PARAMS), t.init(PARAMS))
    np.testing.assert_allclose(flat(shifted) - 5.0, flat(first), atol=1e-5)


def test_dp_fedavg_output_noise_is_z_s_over_expected_clients():
    z, s, m = 1.1, 0.5, 8.0
    t = S.dp_fedavg_aggregator(s, z, m, key=jax.random.key(1))
    assert t.names == ("clip_per_client", "sum_updates", "gaussian_noise", "dp_mean_normalize")
    assert t.stages[0].bound == s and t.stages[1].unit_sum
    assert t.stages[2].mechanism.noise_multiplier == z
    assert t.stages[2].mechanism.sensitivity == s
    assert t.mechanisms == (t.stages[2],) and t.streaming
    out, _ = jax.jit(t.update)(zero_cohort(4), t.init(PARAMS))
    assert_standard_normal(flat(out) * m / (z * s))


def test_adaptive_dp_fedavg_noise_scales_with_the_current_clip_norm():
    z, m = 0.9, 40.0
    t = S.dp_fedavg_aggregator(2.0, z, m, key=jax.random.key(2), adaptive=True)
    mech = t.stages[0].mechanism
    assert t.stages[0].unit_sum and t.stages[0].bound == "state" and t.streaming
    assert mech.noise_multiplier == z and mech.count_noise_std == m / 20
    assert mech.sensitivity is None  # the noise scales with the current clip norm
    z_delta = mech.update_noise_multiplier
    assert effective_noise_multiplier(z_delta, m / 20) == pytest.approx(z)
    update = jax.jit(t.update)
    state = t.init(PARAMS)
    assert float(t.clip_norm(state)) == 2.0
    for _ in range(2):  # the clip norm moves between the rounds
        clip = float(t.clip_norm(state))
        out, state = update(zero_cohort(6), state)
        assert_standard_normal(flat(out) * m / (z_delta * clip))
    assert float(t.clip_norm(state)) < 2.0  # all-zero updates: every client unclipped


def test_effective_noise_multiplier_closed_form_and_inverse():
    # Andrew et al. 2021, Thm 1: z^-2 = z_delta^-2 + (2 sigma_b)^-2.
    assert effective_noise_multiplier(1.0, 5.0) == pytest.approx((1 + 0.01) ** -0.5)
    assert update_noise_multiplier_for(1.0, 5.0) == pytest.approx((1 - 0.01) ** -0.5)
    for z, sb in [(0.3, 1.0), (1.0, 0.6), (2.5, 50.0)]:
        zd = update_noise_multiplier_for(z, sb)
        assert zd > z
        assert effective_noise_multiplier(zd, sb) == pytest.approx(z)
    assert effective_noise_multiplier(0.0, 3.0) == 0.0
    with pytest.raises(ConfigError, match="^count_noise_std="):
        update_noise_multiplier_for(1.0, 0.5)  # needs z < 2 sigma_b
    # They live only in fedjax_sim.privacy now.
    assert not hasattr(S, "effective_noise_multiplier")
    assert not hasattr(S, "update_noise_multiplier_for")


CLIP = S.clip_per_client(1.0)
CLIP_UPDATE = jax.jit(CLIP.update)
FILTER_UPDATE = jax.jit(S.zero_above_norm(1.0).update)


@st.composite
def cohorts(draw):
    """Cohorts of 6 clients with two leaves and norms spread over 1e-4 .. 1e4."""
    elems = st.floats(-1.0, 1.0, width=32)
    w = draw(hnp.arrays(np.float32, (6, 3, 2), elements=elems))
    b = draw(hnp.arrays(np.float32, (6, 5), elements=elems))
    scale = 10.0 ** draw(hnp.arrays(np.float64, (6,), elements=st.floats(-4, 4)))
    mask = draw(hnp.arrays(np.bool_, (6,)))
    # XLA on CPU flushes subnormals to zero; keep every value a normal float32 (or 0).
    w, b = (np.where(np.abs(x) < 1e-30, 0.0, x).astype(np.float32) for x in (w, b))
    return S.CohortUpdates({"w": jnp.asarray(w * scale[:, None, None].astype(np.float32)),
                            "b": jnp.asarray(b * scale[:, None].astype(np.float32))},
                           jnp.ones((6,), jnp.float32), jnp.asarray(mask))


@hypothesis.settings(derandomize=True, max_examples=60, deadline=None)
@hypothesis.given(cohorts())
def test_clipped_norms_never_exceed_the_bound(cohort):
    out, _ = CLIP_UPDATE(cohort, ())
    before = np.asarray(S.per_client_l2_norms(cohort.updates), np.float64)
    after = np.sqrt(sum((np.asarray(u, np.float64).reshape(6, -1) ** 2).sum(1)
                        for u in jax.tree.leaves(out.updates)))
    mask = np.asarray(cohort.mask)
    assert np.all(after <= 1.0 * (1 + 1e-5))            # float32 rounding slack only
    assert np.all(after[~mask] == 0.0)
    small = mask & (before <= 1.0)
    for u_in, u_out in zip(jax.tree.leaves(cohort.updates), jax.tree.leaves(out.updates)):
        np.testing.assert_array_equal(np.asarray(u_out)[small], np.asarray(u_in)[small])
        # Clipping only rescales: the direction is kept.
        big = mask & (before > 1.0)
        np.testing.assert_allclose(np.asarray(u_out, np.float64)[big] * before[big].reshape(
            (-1,) + (1,) * (u_in.ndim - 1)), np.asarray(u_in, np.float64)[big],
            rtol=1e-4, atol=1e-30)


@hypothesis.settings(derandomize=True, max_examples=30, deadline=None)
@hypothesis.given(cohorts())
def test_zero_above_norm_keeps_only_small_updates(cohort):
    out, _ = FILTER_UPDATE(cohort, ())
    before = np.asarray(S.per_client_l2_norms(cohort.updates))
    keep = np.asarray(cohort.mask) & (before <= 1.0)
    np.testing.assert_array_equal(np.asarray(out.mask), keep)
    np.testing.assert_array_equal(np.asarray(out.weights)[~keep], 0.0)
    for u_in, u_out in zip(jax.tree.leaves(cohort.updates), jax.tree.leaves(out.updates)):
        np.testing.assert_array_equal(np.asarray(u_out)[keep], np.asarray(u_in)[keep])
        np.testing.assert_array_equal(np.asarray(u_out)[~keep], 0.0)


@pytest.mark.parametrize("gamma", [0.5, 0.9])
def test_adaptive_clip_converges_to_the_target_quantile(gamma):
    # Client norms r ~ |N(0, sigma^2)|: the gamma-quantile is sigma * Phi^-1((1 + gamma) / 2).
    sigma, c, rounds = 2.0, 200, 300
    target = sigma * scipy.stats.norm.ppf((1 + gamma) / 2)
    t = S.adaptive_clip(0.05, gamma, 0.2, c / 20, key=jax.random.key(3), expected_clients=c)
    assert t.kind is S.StageKind.CLIENT and t.bound == "state"
    assert t.mechanism is None  # standalone it is no DP mechanism (see the fused aggregator)

    def round_(state, key):
        k_dir, k_norm = jax.random.split(key)
        direction = jax.random.normal(k_dir, (c, 3))
        direction = direction / jnp.linalg.norm(direction, axis=1, keepdims=True)
        norms = jnp.abs(sigma * jax.random.normal(k_norm, (c,)))
        cohort = S.CohortUpdates({"u": direction * norms[:, None]}, jnp.ones((c,)),
                                 jnp.ones((c,), bool))
        clip = t.clip_norm(state)
        _, state = t.update(cohort, state)
        return state, (clip, jnp.mean(norms <= clip))

    keys = jax.random.split(jax.random.key(4), rounds)
    _, (clips, fractions) = jax.jit(lambda s: jax.lax.scan(round_, s, keys))(t.init(None))
    clips, fractions = np.asarray(clips), np.asarray(fractions)
    assert clips[0] == pytest.approx(0.05)
    tail = slice(rounds // 2, None)  # after convergence (it needs ~50 rounds from 0.05)
    # Stated tolerances: geometric mean of C within 10% of the analytic quantile, and the
    # realised unclipped fraction within 0.05 of gamma.
    assert math.exp(np.mean(np.log(clips[tail]))) == pytest.approx(target, rel=0.10)
    assert np.mean(fractions[tail]) == pytest.approx(gamma, abs=0.05)


def test_adaptive_clip_count_noise_has_std_sigma_b_and_sensitivity_one_half():
    """The count noise and its sensitivity (once static info), measured on one step:
    ``C' = C exp(-eta (b_bar - gamma))`` with ``b_bar = (sum_i (b_i - 1/2) + N(0, sigma_b^2))
    / m + 1/2`` (Andrew et al. 2021, Sec. 3: centred bits, sensitivity 1/2)."""
    m, sigma_b, eta, gamma, draws = 40, 2.0, 0.2, 0.5, 4000
    t = S.adaptive_clip(1.0, gamma, eta, sigma_b, key=jax.random.key(0), expected_clients=m)
    # 30 clients below the clip norm 1.0, 10 above: sum_i (b_i - 1/2) = 15 - 5 = 10.
    norms = np.concatenate([np.linspace(0.1, 0.9, 30), np.linspace(1.5, 4.0, 10)])
    cohort = S.CohortUpdates({"u": jnp.asarray(np.stack([norms, 0 * norms], 1), jnp.float32)},
                             jnp.ones((m,)), jnp.ones((m,), bool))
    state0 = t.init(PARAMS)
    keys = jax.random.split(jax.random.key(1), draws)
    new = jax.jit(jax.vmap(lambda k: t.update(cohort, state0._replace(key=k))[1]))(keys)
    b_bar = gamma - np.log(np.asarray(new.clip_norm, np.float64)) / eta
    want_mean, want_std = 10 / m + 0.5, sigma_b / m
    assert abs(b_bar.mean() - want_mean) < 5 * want_std / np.sqrt(draws)
    assert np.std(b_bar) == pytest.approx(want_std, rel=0.05)
    assert scipy.stats.kstest((b_bar - want_mean) / want_std, "norm").pvalue > KS_ALPHA
    # The round's clipping diagnostics (not DP): the clip norm used, 10 of 40 clipped.
    diag = S.clip_diagnostics(jax.tree.map(lambda x: x[0], new))
    assert float(diag.clip_norm) == 1.0
    assert float(diag.clipped_fraction) == pytest.approx(0.25)
    assert float(diag.mean_update_norm) == pytest.approx(norms.mean(), rel=1e-5)
