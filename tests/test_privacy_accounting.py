"""Privacy accounting: agreement with direct dp-accounting runs, a published value,
monotonicity, calibration round-trips, and host-side validation."""

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib
from scipy import stats

from fedjax_sim._validation import ConfigError
from fedjax_sim.privacy import (Accountant, GaussianSumNoise, PrivacyConfig, SamplingSpec,
                                TreeAggregationNoise, calibrate_noise_multiplier, dp_event,
                                effective_noise_multiplier, epsilon_for, ledger_for,
                                poisson_overflow_probability)
from fedjax_sim.server import (Stage, StageKind, chain, clip_per_client,
                               dp_fedavg_aggregator, dp_mean_normalize, gaussian_noise,
                               sum_updates)

Rel = dp_accounting.NeighboringRelation


def _direct_epsilon(event, rounds, delta, relation, accountant="rdp"):
    acc = (dp_accounting.rdp.RdpAccountant(neighboring_relation=relation) if accountant == "rdp"
           else dp_accounting.pld.PLDAccountant(relation, value_discretization_interval=1e-3))
    acc.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("q,z,rounds", [(0.01, 1.1, 1000), (0.1, 2.0, 50), (1.0, 5.0, 10)])
def test_poisson_rdp_matches_dp_accounting(q, z, rounds):
    cfg = PrivacyConfig(z, SamplingSpec.poisson(q))
    want = _direct_epsilon(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)),
                           rounds, 1e-5, Rel.ADD_OR_REMOVE_ONE)
    assert epsilon_for(rounds, cfg, 1e-5) == pytest.approx(want, rel=1e-12)


def test_fixed_size_rdp_matches_dp_accounting_replace_one_with_doubled_sensitivity():
    sampling = SamplingSpec.fixed(cohort_size=50, population_size=2000)
    z = 1.5
    event = dp_event(z, sampling)
    assert event == dp_accounting.SampledWithoutReplacementDpEvent(
        2000, 50, dp_accounting.GaussianDpEvent(z / 2))
    want = _direct_epsilon(event, 200, 1e-6, Rel.REPLACE_ONE)
    assert epsilon_for(200, PrivacyConfig(z, sampling), 1e-6) == pytest.approx(want, rel=1e-12)


def test_pld_matches_dp_accounting_and_incremental_composition():
    q, z, delta = 0.05, 1.0, 1e-5
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    acc = Accountant(PrivacyConfig(z, SamplingSpec.poisson(q), accountant="pld", delta=delta,
                                   pld_value_discretization=1e-3))
    for rounds in (1, 2, 3, 10):  # per-round queries (incremental) then a jump of 7
        acc.record_round(rounds - acc.rounds)
        want = _direct_epsilon(event, rounds, delta, Rel.ADD_OR_REMOVE_ONE, "pld")
        assert acc.epsilon() == pytest.approx(want, rel=1e-4)
    # PLD is tighter than RDP for the same mechanism.
    assert acc.epsilon() < epsilon_for(10, PrivacyConfig(z, SamplingSpec.poisson(q)), delta)


def test_abadi_et_al_2016_published_value():
    """Abadi et al. 2016, "Deep Learning with Differential Privacy", Sec. 3.1: with
    q = L/N = 0.01, sigma = 4, delta = 1e-5 and T = 10000 steps, "we have epsilon ~ 1.26
    using the moments accountant". Their accountant bounds the log-moments at integer
    lambda = alpha - 1 <= 32 and converts with eps = min_lambda (alpha(lambda) + log(1/delta))
    / lambda; on the same orders our RDP curve must reproduce 1.26 (to the 2 decimals
    printed), and the modern conversion may only be tighter."""
    acc = Accountant(PrivacyConfig(4.0, SamplingSpec.poisson(0.01), delta=1e-5))
    acc.record_round(10_000)
    orders, rdp = acc.rdp()
    keep = (orders == np.round(orders)) & (orders >= 2) & (orders <= 33)
    classic = np.min(rdp[keep] + math.log(1 / 1e-5) / (orders[keep] - 1))
    assert classic == pytest.approx(1.26, abs=0.005)
    assert acc.epsilon() <= 1.26


def test_epsilon_grows_with_rounds_and_falls_with_noise():
    sampling = SamplingSpec.poisson(0.02)
    acc = Accountant(PrivacyConfig(1.0, sampling, delta=1e-5))
    eps = []
    for _ in range(50):
        acc.record_round()
        eps.append(acc.epsilon())
    assert np.all(np.diff(eps) > 0)
    by_z = [epsilon_for(100, PrivacyConfig(z, sampling), 1e-5) for z in (0.6, 0.8, 1.0, 2.0, 4.0)]
    assert np.all(np.diff(by_z) < 0)
    assert epsilon_for(0, PrivacyConfig(1.0, sampling), 1e-5) == 0.0


def test_per_round_queries_compute_the_round_rdp_once(monkeypatch):
    calls = []
    orig = dp_accounting.rdp.RdpAccountant.compose

    def counting(self, event, count=1):
        calls.append(count)
        return orig(self, event, count)

    monkeypatch.setattr(dp_accounting.rdp.RdpAccountant, "compose", counting)
    acc = Accountant(PrivacyConfig(1.1, SamplingSpec.poisson(0.01), delta=1e-5))
    for _ in range(1000):
        acc.record_round()
        acc.epsilon()
    assert calls == [1]
    assert acc.epsilon() == pytest.approx(
        _direct_epsilon(acc.round_event, 1000, 1e-5, Rel.ADD_OR_REMOVE_ONE), rel=1e-12)


@pytest.mark.parametrize("sampling,tol", [(SamplingSpec.poisson(0.01), 1e-5),
                                          (SamplingSpec.fixed(100, 20_000), 1e-3)])
def test_calibration_round_trips(sampling, tol):
    target, delta, rounds = 3.0, 1e-5, 300
    z = calibrate_noise_multiplier(target, delta, rounds, sampling, tol=tol)
    got = epsilon_for(rounds, PrivacyConfig(z, sampling), delta)
    assert got <= target
    assert got == pytest.approx(target, rel=100 * tol)
    assert epsilon_for(rounds, PrivacyConfig(z * 0.99, sampling), delta) > target


def test_fixed_size_versus_poisson():
    z, delta, rounds = 2.0, 1e-5, 100
    # m = n: no amplification; both are the plain Gaussian, replace-one at z/2 equals
    # add/remove at z/2 (sensitivity doubles from C to 2C).
    full = epsilon_for(rounds, PrivacyConfig(z, SamplingSpec.fixed(40, 40)), delta)
    gauss = _direct_epsilon(dp_accounting.GaussianDpEvent(z / 2), rounds, delta,
                            Rel.ADD_OR_REMOVE_ONE)
    assert full == pytest.approx(gauss, rel=1e-9)
    # Same sampling probability m/n = q: replace-one costs more than add/remove.
    fixed = epsilon_for(rounds, PrivacyConfig(z, SamplingSpec.fixed(100, 10_000)), delta)
    poisson = epsilon_for(rounds, PrivacyConfig(z, SamplingSpec.poisson(0.01)), delta)
    assert fixed > poisson
    # Amplification: a larger population at the same cohort size helps.
    bigger = epsilon_for(rounds, PrivacyConfig(z, SamplingSpec.fixed(100, 40_000)), delta)
    assert bigger < fixed
    assert SamplingSpec.fixed(100, 10_000).neighboring_relation is Rel.REPLACE_ONE
    assert SamplingSpec.poisson(0.01).neighboring_relation is Rel.ADD_OR_REMOVE_ONE
    cyclic = SamplingSpec.cyclic(30, 100)
    assert cyclic.neighboring_relation is Rel.REPLACE_SPECIAL
    assert cyclic.rounds_per_pass == 3 and cyclic.expected_cohort == 30.0
    assert cyclic.sampling_probability == pytest.approx(0.3)


def test_adaptive_clipping_effective_noise_multiplier():
    # Andrew et al. 2021 (as in TFF / Flower): to reach z, add z_u = (z^-2 - (2 sb)^-2)^-1/2
    # to the updates; recombining gives back z.
    z, sb = 1.0, 5.0
    z_u = (z ** -2 - (2 * sb) ** -2) ** -0.5
    assert effective_noise_multiplier(z_u, sb) == pytest.approx(z, rel=1e-12)
    # And it is what dp-accounting gets for the two Gaussian queries composed on one sample.
    q, rounds, delta = 0.05, 100, 1e-5
    two = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.ComposedDpEvent(
        [dp_accounting.GaussianDpEvent(z_u), dp_accounting.GaussianDpEvent(2 * sb)]))
    want = _direct_epsilon(two, rounds, delta, Rel.ADD_OR_REMOVE_ONE)
    # A fused adaptive reducer (the noise scales with its own clip norm: sensitivity None).
    fused = _reducer("adaptive_clipped_gaussian_sum", bound="state", unit_sum=True,
                     mechanism=GaussianSumNoise(z, None, z_u, sb))
    ledger = ledger_for(chain(fused, _aggregate("dp_mean_normalize")),
                        SamplingSpec.poisson(q))
    assert isinstance(ledger, Accountant)
    assert ledger.noise_multiplier == pytest.approx(z, rel=1e-12)
    ledger.record_round(rounds)
    assert ledger.epsilon(delta) == pytest.approx(want, rel=1e-9)
    with pytest.raises(ConfigError, match="^noise_multiplier=.*disagrees with the effective"):
        GaussianSumNoise(1.2, None, z_u, sb)  # the ledger must not drift from the stage
    with pytest.raises(ConfigError, match="^count_noise_std=.*needs both"):
        GaussianSumNoise(z, None, z_u, None)


# Hypothetical chains: typed stages built directly, with only what the ledger reads.

def _identity(value, state):
    return value, state


def _client(name, *, bound=None, preserves_bound=False):
    return Stage(name, StageKind.CLIENT, apply=lambda c, s: c, bound=bound,
                 bound_of=(lambda st: 1.0) if bound == "state" else None,
                 preserves_bound=preserves_bound or bound is not None)


def _reducer(name, *, unit_sum=False, bound=None, mechanism=None):
    return Stage(name, StageKind.REDUCE, partial=lambda c, s: c.updates,
                 finalize=lambda t, s: (t, s), unit_sum=unit_sum, bound=bound,
                 bound_of=(lambda st: 1.0) if bound == "state" else None,
                 mechanism=mechanism)


def _aggregate(name, mechanism=None):
    return Stage(name, StageKind.AGGREGATE, apply=_identity, mechanism=mechanism)


def _noise(z=1.3, s=1.0):
    return _aggregate("gaussian_noise", GaussianSumNoise(z, s))


def test_ledger_from_hypothetical_chain():
    clip = _client("clip_per_client", bound=1.0)
    tx = chain(clip, _reducer("sum_updates", unit_sum=True), _noise(),
               _aggregate("dp_mean_normalize"))
    ledger = ledger_for(tx, SamplingSpec.poisson(0.1), delta=1e-6)
    assert isinstance(ledger, Accountant)
    assert ledger.config == PrivacyConfig(1.3, SamplingSpec.poisson(0.1), "rdp", 1e-6)
    # A stage alone works too (no mechanism: no ledger).
    assert ledger_for(clip, SamplingSpec.poisson(0.1)) is None
    # Noise calibrated to a different bound than the clipping enforces: z = std / bound.
    loose = chain(_client("clip_per_client", bound=2.0), _reducer("sum_updates", unit_sum=True),
                  _noise())
    assert ledger_for(loose, SamplingSpec.poisson(0.1)).noise_multiplier == pytest.approx(0.65)
    zero_above = chain(_client("zero_above_norm", bound=0.5),
                       _reducer("sum_updates", unit_sum=True), _noise())
    assert ledger_for(zero_above,
                      SamplingSpec.poisson(0.1)).noise_multiplier == pytest.approx(2.6)
    # Several bounds: the tightest one holds (a filter then a clip).
    both = chain(_client("zero_above_norm", bound=4.0), _client("clip_per_client", bound=1.3),
                 _client("top_k_sparsify", preserves_bound=True),
                 _reducer("sum_updates", unit_sum=True), _noise())
    assert ledger_for(both, SamplingSpec.poisson(0.1)).noise_multiplier == pytest.approx(1.0)
    # Fixed-size sampling and the PLD accountant reach the ledger's config.
    fixed = ledger_for(tx, SamplingSpec.fixed(10, 100))
    assert fixed.config.sampling == SamplingSpec.fixed(10, 100)
    assert ledger_for(tx, SamplingSpec.poisson(0.1), accountant="pld").config.accountant == "pld"


def test_ledger_from_real_dp_fedavg_aggregator():
    import jax
    for adaptive in (False, True):
        tx = dp_fedavg_aggregator(0.5, 1.1, 100.0, key=jax.random.key(0), adaptive=adaptive)
        ledger = ledger_for(tx, SamplingSpec.poisson(0.01), delta=1e-5)
        assert ledger.noise_multiplier == pytest.approx(1.1, rel=1e-9)
        ledger.record_round(10)
        assert ledger.epsilon() == pytest.approx(
            epsilon_for(10, PrivacyConfig(1.1, SamplingSpec.poisson(0.01)), 1e-5), rel=1e-9)
        summary = ledger.summary()
        assert summary["dp"] and summary["rounds"] == 10
        assert summary["noise_multiplier"] == pytest.approx(1.1, rel=1e-9)
        assert summary["adjacency"] == "add/remove one client"
        assert summary["statement"].startswith("client-level (")
    # Noise scaled to a looser sensitivity than the clip: accounted at z * S / clip.
    loose = chain(clip_per_client(0.5), sum_updates(),
                  gaussian_noise(1.1, 1.0, key=jax.random.key(1)), dp_mean_normalize(10.0))
    assert ledger_for(loose, SamplingSpec.poisson(0.01)).noise_multiplier == pytest.approx(2.2)
    # No noise (or z = 0, which adds none): no ledger, no formal guarantee.
    assert ledger_for(chain(clip_per_client(0.5), sum_updates()),
                      SamplingSpec.poisson(0.01)) is None
    assert ledger_for(chain(clip_per_client(0.5), sum_updates(),
                            gaussian_noise(0.0, 0.5, key=jax.random.key(1))),
                      SamplingSpec.poisson(0.01)) is None


def _tree(z=1.0, clip=1.0, max_rounds=8):
    return _aggregate("dp_ftrl_tree", TreeAggregationNoise(z, clip, max_rounds))


@pytest.mark.parametrize("stages,field,reason", [
    # Noise but nothing bounds a client.
    (lambda: (_reducer("sum_updates", unit_sum=True), _noise(1.0, 1.0)), "server_chain",
     "no stage bounds a client's contribution"),
    # Two noise stages: which one to account?
    (lambda: (_client("clip", bound=1.0), _reducer("sum_updates", unit_sum=True),
              _aggregate("a", GaussianSumNoise(1.0, 1.0)),
              _aggregate("b", GaussianSumNoise(2.0, 1.0))), "server_chain",
     "more than one stage adds DP noise"),
    (lambda: (_client("clip", bound=1.0), _reducer("sum_updates", unit_sum=True), _noise(),
              _tree()), "server_chain", "more than one stage adds DP noise"),
    # Adaptive clipping (a bound in the state) under noise scaled to a fixed sensitivity.
    (lambda: (_client("adaptive_clip", bound="state"), _reducer("sum_updates", unit_sum=True),
              _noise(1.0, 1.0)), "server_chain", "adaptive clipping has no fixed bound"),
    # DP-FTRL tree noise is not a sampled Gaussian: it needs the cyclic schedule.
    (lambda: (_client("clip", bound=1.0), _reducer("sum_updates", unit_sum=True), _tree()),
     "sampling", "only under a cyclic schedule"),
    # The reducer's sensitivity is not the clip bound.
    (lambda: (_client("clip", bound=1.0), _reducer("weighted_mean"), _noise()),
     "server_chain", "needs an unweighted sum before it"),
    (lambda: (_client("clip", bound=1.0), Stage("coordinate_median", StageKind.REDUCE,
                                                  apply=_identity), _noise()),
     "server_chain", "needs an unweighted sum before it"),
    # A stage after the clipping that may raise a client's norm (a quantiser).
    (lambda: (_client("clip", bound=1.0), _client("stochastic_quantize"),
              _reducer("sum_updates", unit_sum=True), _noise()),
     "server_chain", "'stochastic_quantize' comes after the clipping"),
])
def test_ledger_rejects(stages, field, reason):
    with pytest.raises(ConfigError) as err:
        ledger_for(chain(*stages()), SamplingSpec.poisson(0.1))
    msg = str(err.value)
    assert msg.startswith(f"{field}=") and reason in msg and "\n" not in msg, msg


def test_ledger_rejects_noise_before_the_reducer_and_zero_noise():
    # A chain cannot put noise before its reducer (chain() refuses the order); a lone noise
    # stage, or a reducer-less chain with noise, has no sum for the noise to protect.
    noise = _noise()
    with pytest.raises(ConfigError, match="^server_chain=.*noise before any reducer"):
        ledger_for(noise, SamplingSpec.poisson(0.1))
    with pytest.raises(ConfigError, match="^server_chain=.*noise before any reducer"):
        ledger_for(chain(_client("clip", bound=1.0), noise), SamplingSpec.poisson(0.1))
    # A noise multiplier of 0 is no mechanism at all.
    with pytest.raises(ConfigError, match="^noise_multiplier="):
        GaussianSumNoise(0.0, 1.0)
    with pytest.raises(ConfigError, match="^noise_multiplier="):
        TreeAggregationNoise(0.0, 1.0, 8)
    # A sampled Gaussian cannot be accounted under a cyclic schedule (no amplification).
    tx = chain(_client("clip", bound=1.0), _reducer("sum_updates", unit_sum=True), noise)
    with pytest.raises(ConfigError, match="^sampling='cyclic'.*no sampling to amplify"):
        ledger_for(tx, SamplingSpec.cyclic(10, 100))
    with pytest.raises(ConfigError, match="^accountant="):
        ledger_for(tx, SamplingSpec.poisson(0.1), accountant="gdp")


@pytest.mark.parametrize("build,field", [
    (lambda: SamplingSpec.poisson(0.0), "sampling.rate"),
    (lambda: SamplingSpec.poisson(1.5), "sampling.rate"),
    (lambda: SamplingSpec("poisson"), "sampling.rate"),
    (lambda: SamplingSpec.fixed(11, 10), "sampling.cohort_size"),
    (lambda: SamplingSpec.fixed(0, 10), "sampling.cohort_size"),
    (lambda: SamplingSpec("fixed", cohort_size=3), "sampling.population_size"),
    (lambda: SamplingSpec("uniform", rate=0.1), "sampling.kind"),
    (lambda: SamplingSpec.cyclic(11, 10), "sampling.cohort_size"),
    (lambda: SamplingSpec("cyclic", rate=0.1, cohort_size=2, population_size=10),
     "sampling.rate"),
    (lambda: SamplingSpec("cyclic", cohort_size=3), "sampling.population_size"),
    (lambda: SamplingSpec.poisson(0.1).rounds_per_pass, "sampling"),
    (lambda: PrivacyConfig(1.0, SamplingSpec.cyclic(5, 10)), "sampling"),
    (lambda: dp_event(1.0, SamplingSpec.cyclic(5, 10)), "sampling"),
    (lambda: PrivacyConfig(0.0, SamplingSpec.poisson(0.1)), "noise_multiplier"),
    (lambda: PrivacyConfig(1.0, SamplingSpec.poisson(0.1), accountant="gdp"), "accountant"),
    (lambda: PrivacyConfig(1.0, SamplingSpec.poisson(0.1), delta=1.0), "delta"),
    (lambda: PrivacyConfig(1.0, SamplingSpec.fixed(5, 10), accountant="pld"), "accountant"),
    (lambda: PrivacyConfig(1.0, 0.1), "sampling"),
    (lambda: epsilon_for(-1, PrivacyConfig(1.0, SamplingSpec.poisson(0.1)), 1e-5), "rounds"),
    (lambda: epsilon_for(3, PrivacyConfig(1.0, SamplingSpec.poisson(0.1))), "delta"),
    (lambda: Accountant(PrivacyConfig(1.0, SamplingSpec.poisson(0.1))).epsilon(0.0), "delta"),
    (lambda: calibrate_noise_multiplier(-1.0, 1e-5, 10, SamplingSpec.poisson(0.1)),
     "target_epsilon"),
    (lambda: calibrate_noise_multiplier(1.0, 1e-5, 0, SamplingSpec.poisson(0.1)), "rounds"),
    (lambda: calibrate_noise_multiplier(1.0, 1e-5, 10, SamplingSpec.fixed(2, 9),
                                        accountant="pld"), "accountant"),
])
def test_validation_messages_name_the_field(build, field):
    with pytest.raises(ConfigError) as err:
        build()
    msg = str(err.value)
    assert msg.startswith(f"{field}=") and "\n" not in msg


def test_poisson_overflow_probability():
    n, q, c = 30, 0.2, 9
    want = sum(math.comb(n, k) * q ** k * (1 - q) ** (n - k) for k in range(c + 1, n + 1))
    assert poisson_overflow_probability(q, n, c) == pytest.approx(want, rel=1e-9)
    assert poisson_overflow_probability(q, n, n) == 0.0
    assert stats.binom.mean(n, q) == pytest.approx(6.0)


def test_rdp_epsilon_matches_rdp_to_dp_conversion():
    acc = Accountant(PrivacyConfig(1.0, SamplingSpec.poisson(0.1), delta=1e-6))
    acc.record_round(30)
    orders, rdp = acc.rdp()
    assert acc.epsilon() == pytest.approx(rdp_lib.compute_epsilon(orders, rdp, 1e-6)[0])
