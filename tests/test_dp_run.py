"""DP-FedAvg and robust aggregation as `fedjax-sim run` choices; accounting in the loop.

Epsilons are checked against dp-accounting directly (not through fedjax_sim.privacy), for
the noise multiplier the run reports, the sampler's event and the number of rounds.
"""

import json
import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fedjax_sim._validation import ConfigError
from fedjax_sim.experiment.algorithms import resolved_weighting
from fedjax_sim.experiment.cli import main
from fedjax_sim.experiment.config import make_config
from fedjax_sim.experiment.runner import run_experiment
from fedjax_sim.experiment.sampling import build_sampler
from fedjax_sim.experiment.server import build_chain, is_dp, privacy_plan
from fedjax_sim.privacy import ledger_for
from fedjax_sim.sampling import poisson_capacity
from fedjax_sim.server import (CohortUpdates, chain, clip_diagnostics, clip_per_client,
                               weighted_mean)

SMALL = dict(data="synthetic", num_clients=300, cohort_size=30, rounds=3, max_examples=16,
             eval_clients=30, local_epochs=1)
DP = dict(aggregator="dp_fedavg", clip_norm=0.5)

INVALID = [
    # (overrides, field named in the message, another fragment of the message)
    ({"aggregator": "dp_fedavg", "noise_multiplier": 1.0}, "noise_multiplier=1.0",
     "clip_norm"),
    ({"clip_norm": 1.0, "noise_multiplier": 1.0}, "noise_multiplier=1.0", "dp_fedavg"),
    ({"aggregator": "median", "clip_norm": 1.0, "target_epsilon": 2.0},
     "target_epsilon=2.0", "robust reducers"),
    ({**DP, "noise_multiplier": 1.0, "target_epsilon": 2.0}, "target_epsilon=2.0",
     "not both"),
    ({"aggregator": "dp_fedavg"}, "clip_norm=None", "dp_fedavg"),
    ({"aggregator": "trimmed_mean", "trim_fraction": 0.5}, "trim_fraction=0.5", "< 0.5"),
    ({"aggregator": "bulyan", "num_byzantine": 3, "cohort_size": 14}, "num_byzantine=3",
     "15"),
    ({"aggregator": "krum", "num_byzantine": 5, "cohort_size": 12}, "num_byzantine=5",
     "13"),
    ({"aggregator": "krum", "num_byzantine": 5, "sampling": "poisson",
      "sampling_rate": 0.03}, "num_byzantine=5", "expected cohort 9"),
    ({"aggregator": "multi_krum", "num_byzantine": 1, "multi_krum_selected": 31},
     "multi_krum_selected=31", "cohort"),
    ({**DP, "adaptive_clipping": True}, "adaptive_clipping=True", "no noise"),
    ({"adaptive_clipping": True}, "adaptive_clipping=True", "clip_norm"),
    ({**DP, "adaptive_clipping": True, "noise_multiplier": 5.0}, "noise_multiplier=5.0",
     "adaptive"),
    ({"target_quantile": 0.9}, "target_quantile=0.9", "adaptive_clipping"),
    ({**DP, "noise_multiplier": 1.0, "accountant": "pld"}, "accountant='pld'",
     "fixed-size"),
    ({**DP, "noise_multiplier": 1.0, "weighting": "examples"}, "weighting='examples'",
     "uniform"),
    ({**DP, "noise_multiplier": 1.0, "delta": 0.01}, "delta=0.01", "1/num_clients"),
    ({"num_byzantine": 2}, "num_byzantine=2", "krum"),
    ({"quantize_bits": 4, "top_k_fraction": 0.1}, "top_k_fraction=0.1", "one compressor"),
    ({"aggregator": "kruml"}, "aggregator='kruml'", "must be one of"),
]


@pytest.mark.parametrize("overrides,field,fragment", INVALID,
                         ids=[f"{i}-{c[1].split('=')[0]}" for i, c in enumerate(INVALID)])
def test_invalid_combinations_are_one_line_errors(overrides, field, fragment):
    with pytest.raises(ConfigError) as e:
        make_config({**SMALL, **overrides})
    msg = str(e.value)
    assert msg.startswith(field) and fragment in msg
    assert "\n" not in msg


def test_cli_reports_invalid_combination_in_one_line(capsys):
    assert main(["run", "--aggregator", "dp_fedavg", "--noise-multiplier", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "noise_multiplier=1.0" in err


def test_valid_dp_and_robust_configs():
    dp = make_config({**SMALL, **DP, "noise_multiplier": 1.0})
    assert is_dp(dp) and resolved_weighting(dp, is_dp(dp)) == "uniform"
    assert resolved_weighting(make_config(SMALL), False) == "examples"
    assert not is_dp(make_config({**SMALL, **DP}))  # clipping + fixed denominator, no noise
    make_config({**SMALL, "aggregator": "bulyan", "num_byzantine": 6})  # 30 >= 27
    make_config({**SMALL, "aggregator": "centered_clipping", "clip_norm": 1.0,
                 "adaptive_clipping": True})


def _rdp_epsilons(event, rounds, relation, delta):
    out = []
    for r in range(1, rounds + 1):
        acc = dp_accounting.rdp.RdpAccountant(neighboring_relation=relation)
        acc.compose(dp_accounting.SelfComposedDpEvent(event, r))
        out.append(acc.get_epsilon(delta))
    return out


def _rows(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_target_epsilon_run_fixed_size(tmp_path, capsys):
    cfg = make_config({**SMALL, **DP, "target_epsilon": 4.0})
    summary = run_experiment(cfg, output_dir=str(tmp_path), progress=False)
    rows = _rows(tmp_path)
    z, delta = summary["noise_multiplier"], summary["delta"]
    assert delta == pytest.approx(300 ** -1.1)
    assert all(r["noise_multiplier"] == z and r["delta"] == delta for r in rows)
    # Fixed-size sampling: replace-one adjacency, sensitivity 2S => GaussianDpEvent(z / 2).
    event = dp_accounting.SampledWithoutReplacementDpEvent(
        300, 30, dp_accounting.GaussianDpEvent(z / 2))
    want = _rdp_epsilons(event, 3, dp_accounting.NeighboringRelation.REPLACE_ONE, delta)
    np.testing.assert_allclose([r["epsilon"] for r in rows], want, rtol=1e-9)
    assert summary["epsilon"] == rows[-1]["epsilon"]
    assert 0.99 * 4.0 <= summary["epsilon"] <= 4.0
    assert summary["privacy"]["adjacency"] == "replace one client"
    assert summary["privacy"]["calibrated_from_target_epsilon"] == 4.0
    assert all(r["clip_norm"] == 0.5 and 0.0 <= r["clipped_fraction"] <= 1.0 for r in rows)
    assert "privacy: client-level" in capsys.readouterr().err


def test_noise_multiplier_run_poisson_adaptive(tmp_path):
    cfg = make_config({**SMALL, **DP, "noise_multiplier": 0.8, "sampling": "poisson",
                       "sampling_rate": 0.1, "adaptive_clipping": True,
                       "delta": 1e-4})
    summary = run_experiment(cfg, output_dir=str(tmp_path), progress=False)
    rows = _rows(tmp_path)
    event = dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(0.8))
    want = _rdp_epsilons(event, 3, dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
                         1e-4)
    np.testing.assert_allclose([r["epsilon"] for r in rows], want, rtol=1e-9)
    assert summary["noise_multiplier"] == 0.8 and summary["accountant"] == "rdp"
    assert summary["privacy"]["adjacency"] == "add/remove one client"
    # The capacity keeps a truncated cohort negligible next to delta over the run.
    cap = summary["cohort_capacity"]
    assert 3 * stats.binom.sf(cap, 300, 0.1) <= 1e-3 * 1e-4
    clips = [r["clip_norm"] for r in rows]
    assert clips[0] == pytest.approx(0.5) and len(set(clips)) > 1  # adaptive moves it


def test_robust_aggregator_via_cli(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", "--data", "synthetic", "--num-clients", "200", "--cohort-size", "20",
            "--rounds", "2", "--max-examples", "16", "--eval-clients", "20",
            "--local-epochs", "1", "--no-progress", "--aggregator", "bulyan",
            "--num-byzantine", "2", "--clip-norm", "1.0", "--output", str(out)]
    assert main(argv) == 0
    rows = _rows(out)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["epsilon"] is None and 0 <= r["clipped_fraction"] <= 1 for r in rows)
    assert all(math.isfinite(r["train_loss"]) for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epsilon"] is None and summary["privacy"]["dp"] is False
    assert summary["config"]["server"]["aggregator"] == "bulyan"
    assert summary["streaming"] is False and "not a sum" in summary["why_stacked"]
    assert "no formal DP guarantee" in capsys.readouterr().err


def test_ledger_reads_the_chain_that_runs():
    cfg = make_config({**SMALL, **DP, "noise_multiplier": 1.3, "quantize_bits": 8})
    plan = privacy_plan(cfg)
    sampler = build_sampler(cfg, 300, plan.overflow_tail)
    server_chain = build_chain(cfg, sampler=sampler, plan=plan, key=jax.random.key(0))
    assert server_chain.names == ("stochastic_quantize", "clip_per_client", "sum_updates",
                                  "gaussian_noise", "dp_mean_normalize")
    assert server_chain.streaming  # the quantiser runs inside the chunks now
    ledger = ledger_for(server_chain, sampler.spec, accountant="rdp", delta=plan.delta)
    privacy = ledger.config
    assert privacy.noise_multiplier == 1.3 and privacy.sampling.kind == "fixed"
    assert (privacy.sampling.cohort_size, privacy.sampling.population_size) == (30, 300)


@pytest.mark.parametrize("n,q,tail", [(300, 0.1, 1e-10), (10_000, 0.01, 1e-20),
                                      (10 ** 6, 0.001, 1e-12)])
def test_poisson_capacity_is_the_smallest_safe_one(n, q, tail):
    cap = poisson_capacity(n, q, tail)
    assert stats.binom.sf(cap, n, q) <= tail < stats.binom.sf(cap - 1, n, q)


def test_clip_diagnostics_streaming_matches_stacked():
    rng = np.random.default_rng(0)
    updates = {"w": jnp.asarray(rng.normal(size=(6, 4)).astype(np.float32)),
               "b": jnp.asarray(rng.normal(size=(6,)).astype(np.float32))}
    mask = jnp.asarray([True, True, True, True, True, False])
    cohort = CohortUpdates(updates, jnp.where(mask, 1.0, 0.0), mask)
    t = chain(clip_per_client(1.5), weighted_mean())
    state = t.init(jax.tree.map(lambda u: u[0], updates))
    agg, new_state = t.update(cohort, state)
    diag = clip_diagnostics(new_state)
    halves = [jax.tree.map(lambda x: x[s], cohort) for s in (slice(0, 3), slice(3, 6))]
    total = jax.tree.map(lambda a, b: a + b, *[t.partial(h, state) for h in halves])
    agg_s, state_s, count = t.finalize(total, state)
    diag_s = clip_diagnostics(state_s)
    assert int(count.aggregated) == 5
    norms = np.sqrt((np.asarray(updates["w"]) ** 2).sum(1) + np.asarray(updates["b"]) ** 2)[:5]
    np.testing.assert_allclose(diag.clipped_fraction, np.mean(norms > 1.5), rtol=1e-6)
    np.testing.assert_allclose(diag.mean_update_norm, norms.mean(), rtol=1e-5)
    for a, b in zip(jax.tree.leaves((agg, diag)), jax.tree.leaves((agg_s, diag_s))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
