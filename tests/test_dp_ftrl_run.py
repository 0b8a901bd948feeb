"""DP-FTRL as a `fedjax-sim run` choice: config validation, the cyclic schedule, the
per-round accounting against a direct RDP computation, and the model against a reference
round without the tree noise."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib
from scipy import stats

from fedjax_sim._validation import ConfigError
from fedjax_sim.algorithms import make_algorithm
from fedjax_sim.experiment import privacy_cli
from fedjax_sim.experiment.algorithms import resolved_weighting
from fedjax_sim.experiment.cli import main
from fedjax_sim.experiment.config import make_config
from fedjax_sim.experiment.data import build_data
from fedjax_sim.experiment.models import build_model
from fedjax_sim.experiment.runner import run_experiment
from fedjax_sim.experiment.sampling import build_sampler
from fedjax_sim.experiment.server import build_chain, calibrated, is_dp, privacy_plan
from fedjax_sim.privacy import DPFTRLAccountant, dp_ftrl_epsilon, ledger_for, tree_depth
from fedjax_sim.rounds import make_round
from fedjax_sim.sampling import CyclicSampler
from fedjax_sim.server import (adaptive_clip, chain, clip_per_client, dp_mean_normalize,
                               gaussian_noise, sum_updates)
from fedjax_sim.server.dp_ftrl import (DPFTRLTreeState, dp_ftrl_aggregator,
                                       dp_ftrl_tree_noise, efficient_node_variance,
                                       tree_prefix_noise)


def build_server(cfg, *, key):
    """The sampler, privacy plan and chain a run of ``cfg`` assembles."""
    plan = privacy_plan(cfg)
    sampler = build_sampler(cfg, cfg.data.num_clients, plan.overflow_tail)
    plan = calibrated(cfg, plan, sampler)
    return sampler, plan, build_chain(cfg, sampler=sampler, plan=plan, key=key)

# 60 clients, 20 per round: one pass is 3 rounds; trees of 2 rounds.
SMALL = dict(data="synthetic", num_clients=60, cohort_size=20, rounds=5, max_examples=16,
             eval_clients=20, local_epochs=1)
FTRL = dict(aggregator="dp_ftrl", sampling="cyclic", clip_norm=0.1, noise_multiplier=2.0)

INVALID = [
    # (overrides, start of the message: the field and its value, another fragment)
    ({**FTRL, "sampling": "fixed"}, "sampling='fixed'", "data-independent"),
    ({**FTRL, "sampling": "poisson"}, "sampling='poisson'", "amplification"),
    ({**FTRL, "clip_norm": 0.0}, "noise_multiplier=2.0", "clip_norm > 0"),
    ({**FTRL, "clip_norm": 0.0, "noise_multiplier": 0.0}, "clip_norm=None", "dp_ftrl"),
    ({**FTRL, "noise_multiplier": 0.0}, "noise_multiplier=None", "dp_ftrl"),
    ({**FTRL, "adaptive_clipping": True}, "adaptive_clipping=True", "tree"),
    ({**FTRL, "ftrl_restart_rounds": 4}, "ftrl_restart_rounds=4", "3 rounds"),
    # 100 // 30 = 3 rounds per pass, although ceil(100 / 30) = 4 rounds reach everyone.
    ({**FTRL, "num_clients": 100, "cohort_size": 30, "ftrl_restart_rounds": 4},
     "ftrl_restart_rounds=4", "twice"),
    ({**FTRL, "ftrl_restart_rounds": -1}, "ftrl_restart_rounds=-1", ">= 1"),
    ({"ftrl_restart_rounds": 2}, "ftrl_restart_rounds=2", "dp_ftrl"),
    ({**FTRL, "accountant": "pld"}, "accountant='pld'", "RDP"),
    ({**FTRL, "weighting": "examples"}, "weighting='examples'", "uniform"),
    ({**FTRL, "noise_multiplier": 0.0, "target_epsilon": 2.0, "delta": 0.1},
     "delta=0.1", "1/num_clients"),
    ({"aggregator": "dp_fedavg", "clip_norm": 0.1, "noise_multiplier": 1.0,
      "sampling": "cyclic"}, "sampling='cyclic'", "dp_ftrl"),
    ({"sampling": "cyclic", "cohort_size": 61}, "cohort_size=61", "num_clients"),
    ({"ftrl_efficient": True}, "ftrl_efficient=True", "dp_ftrl"),
]


@pytest.mark.parametrize("overrides,start,fragment", INVALID,
                         ids=[f"{i}-{c[1].split('=')[0]}" for i, c in enumerate(INVALID)])
def test_invalid_dp_ftrl_configs_are_one_line_errors(overrides, start, fragment):
    with pytest.raises(ConfigError) as e:
        make_config({**SMALL, **overrides})
    msg = str(e.value)
    assert msg.startswith(start) and fragment in msg and "\n" not in msg


def test_cli_run_rejects_dp_ftrl_without_cyclic_in_one_line(capsys):
    rc = main(["run", "--aggregator", "dp_ftrl", "--clip-norm", "1", "--noise-multiplier",
               "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.strip() == ("fedjax-sim run: error: sampling='fixed': aggregator='dp_ftrl' "
                           "needs sampling='cyclic': the tree mechanism's guarantee "
                           "assumes a data-independent participation schedule, and "
                           "amplification by sampling is not claimed")


def test_valid_configs_and_plan():
    cfg = make_config({**SMALL, **FTRL})
    assert is_dp(cfg) and resolved_weighting(cfg, True) == "uniform"
    assert privacy_plan(cfg).ftrl_max_rounds == 3
    assert privacy_plan(make_config({**SMALL, **FTRL, "num_clients": 100,
                                     "cohort_size": 30})).ftrl_max_rounds == 3  # floor
    sampler, plan, server_chain = build_server(cfg, key=jax.random.key(0))
    assert isinstance(sampler, CyclicSampler) and plan.ftrl_max_rounds == 3
    assert server_chain.names == ("clip_per_client", "sum_updates", "dp_ftrl_tree",
                                  "dp_mean_normalize")
    assert server_chain.streaming
    # Cyclic sampling also works with any aggregator, without DP.
    plain_sampler, plain, _ = build_server(make_config({**SMALL, "sampling": "cyclic",
                                                        "aggregator": "median"}),
                                           key=jax.random.key(0))
    assert isinstance(plain_sampler, CyclicSampler) and not plain.dp
    # A momentum server only post-processes the released sums: allowed, with a note.
    notes = privacy_plan(make_config({**SMALL, **FTRL, "algorithm": "fedavgm"})).notes
    assert any("not FTRL" in n for n in notes)
    assert not any("not FTRL" in n for n in plan.notes)


@pytest.mark.parametrize("n,m", [(10, 3), (100, 30), (7, 7)])
def test_cyclic_pass_has_no_repeated_client_but_one_more_round_may(n, m):
    sampler = CyclicSampler(n, m, seed=1)
    per_pass = n // m
    rounds = jnp.arange(3 * per_pass + 2)
    ids = np.asarray(jax.jit(jax.vmap(
        lambda r: sampler.sample(jax.random.key(0), r).ids))(rounds))
    for start in range(len(ids) - per_pass + 1):
        window = np.concatenate(ids[start:start + per_pass])
        assert len(set(window.tolist())) == window.size
    if n % m:  # ceil(n / m) consecutive rounds repeat a client.
        window = np.concatenate(ids[:per_pass + 1])
        assert len(set(window.tolist())) < window.size


def _direct_epsilon(z, rounds, restart, per_pass, delta):
    """RDP of the tree (Kairouz et al. App. D) by hand: alpha * D / (2 z^2) with D the
    deepest tree within one pass, and the sum of the trees' depths after it."""
    trees = [restart] * (rounds // restart) + ([rounds % restart] if rounds % restart else [])
    depth = (tree_depth(max(trees)) if rounds <= per_pass
             else sum(tree_depth(t) for t in trees))
    orders = np.array(rdp_lib.DEFAULT_RDP_ORDERS)
    return rdp_lib.compute_epsilon(orders, orders * depth / (2 * z ** 2), delta)[0]


def test_run_epsilon_per_round_matches_direct_accounting(tmp_path, capsys):
    cfg = make_config({**SMALL, **FTRL, "ftrl_restart_rounds": 2})
    summary = run_experiment(cfg, output_dir=str(tmp_path), progress=False)
    rows = [json.loads(line) for line in
            (tmp_path / "metrics.jsonl").read_text().splitlines()]
    delta = 60 ** -1.1
    assert [r["round"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(r["delta"] == pytest.approx(delta) and r["noise_multiplier"] == 2.0
               for r in rows)
    eps = [r["epsilon"] for r in rows]
    want = [_direct_epsilon(2.0, t, 2, 3, delta) for t in range(1, 6)]
    np.testing.assert_allclose(eps, want, rtol=1e-9)
    participation = ["once"] * 3 + ["once_per_tree"] * 2
    np.testing.assert_allclose(
        eps, [dp_ftrl_epsilon(2.0, t, delta, max_rounds=2, participation=p)
              for t, p in zip(range(1, 6), participation)], rtol=1e-12)
    assert all(b >= a for a, b in zip(eps, eps[1:]))
    assert eps[2] == eps[1] and eps[3] > eps[2]  # 3rd round: a new tree, same pass
    privacy = summary["privacy"]
    assert summary["epsilon"] == eps[-1] == privacy["epsilon"]
    assert privacy["mechanism"] == "dp_ftrl_tree" and privacy["tree_restart_rounds"] == 2
    assert privacy["rounds_per_pass"] == 3 and privacy["participation"] == "once_per_tree"
    statement = privacy["statement"]
    for fragment in ("replace one client with zero", "cyclic(m=20, n=60)",
                     "data-independent", "no sampling amplification"):
        assert fragment in statement
    assert any("at most one round per tree" in a for a in privacy["assumptions"])
    assert "privacy: client-level" in capsys.readouterr().err
    # `fedjax-sim privacy` gives the run's epsilon for the same cyclic schedule.
    from fedjax_sim.experiment.flags import ArgumentParser
    parser = ArgumentParser(prog="fedjax-sim")
    privacy_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["privacy", "--mechanism", "dp_ftrl_tree",
                              "--noise-multiplier", "2", "--rounds", "5", "--delta",
                              repr(delta), "--cohort-size", "20", "--population", "60",
                              "--max-rounds", "2", "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["epsilon"] == pytest.approx(eps[-1], rel=1e-12)
    assert out["participation"] == "once_per_tree" and out["rounds_per_pass"] == 3


@pytest.mark.parametrize("extra,start", [
    (["--cohort-size", "100", "--population", "1000", "--max-rounds", "11"],
     "--max-rounds=11: exceeds one pass"),
    (["--cohort-size", "100"], "--population=None"),
    (["--cohort-size", "100", "--population", "1000", "--participation", "once"],
     "--participation='once'"),
    (["--sampling", "fixed", "--cohort-size", "100", "--population", "1000"],
     "--sampling='fixed'"),
])
def test_privacy_cli_cyclic_errors_are_one_line(extra, start, capsys):
    rc = main(["privacy", "--mechanism", "dp_ftrl_tree", "--noise-multiplier", "2",
               "--rounds", "30", "--delta", "1e-5", *extra])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith(f"fedjax-sim privacy: error: {start}")


def _tree_state(transform_state):
    nodes = jax.tree.leaves(transform_state,
                            is_leaf=lambda x: isinstance(x, DPFTRLTreeState))
    (tree,) = [n for n in nodes if isinstance(n, DPFTRLTreeState)]
    return tree


def test_model_is_clipped_sums_plus_tree_noise():
    """Each round's step equals a plain clip-sum-divide round from the same params and
    key plus (N_t - N_{t-1}) / cohort (plain SGD server, lr 1), so the model is theta_0 +
    (prefix sum of clipped sums + N_t) / cohort, with N_t the tree's own noise."""
    cfg = make_config({**SMALL, **FTRL, "rounds": 4})
    data = build_data(cfg)
    model = build_model(cfg, data.example_shape, data.num_classes)
    sampler, plan, server_chain = build_server(cfg, key=jax.random.key(7))
    a = cfg.algorithm
    common = dict(client_lr=a.client_lr, local_epochs=a.local_epochs,
                  batch_size=a.batch_size, weighting=resolved_weighting(cfg, plan.dp))
    m = cfg.sampling.cohort_size
    ftrl = make_round(make_algorithm("fedavg", model, aggregator=server_chain, **common),
                      sampler)
    ref_transform = chain(clip_per_client(cfg.server.clip_norm), sum_updates(),
                          dp_mean_normalize(float(m)))
    ref = make_round(make_algorithm("fedavg", model, aggregator=ref_transform, **common),
                     sampler)
    state = ftrl.init(jax.random.key(1))
    ref_aggregator_state = ref.init(jax.random.key(1)).aggregator
    seen = []
    clipped_any = False
    for r in range(cfg.sampling.rounds):
        key = jax.random.fold_in(jax.random.key(2), r)
        new, out = ftrl.step(state, data.population, key)
        want, ref_out = ref.step(state.replace(aggregator=ref_aggregator_state),
                                 data.population, key)
        np.testing.assert_array_equal(out.client_ids, ref_out.client_ids)
        seen.append(np.asarray(out.client_ids))
        clipped_any |= bool(np.max(out.client_metrics["update_norm"]) > cfg.server.clip_norm)
        noise_step = jax.tree.map(lambda a, b: (a - b) / m,
                                  tree_prefix_noise(_tree_state(new.aggregator)),
                                  tree_prefix_noise(_tree_state(state.aggregator)))
        for got, w, n in zip(jax.tree.leaves(new.params), jax.tree.leaves(want.params),
                             jax.tree.leaves(noise_step)):
            np.testing.assert_allclose(got, w + n, atol=2e-5, rtol=1e-5)
        assert max(float(jnp.max(jnp.abs(n))) for n in jax.tree.leaves(noise_step)) > 1e-3
        state = new
    assert clipped_any  # clipping is active, so a chain without it would fail above
    one_pass = np.concatenate(seen[:3])
    assert sorted(one_pass.tolist()) == list(range(60))  # each client once per pass
    np.testing.assert_array_equal(seen[3], seen[0])


def test_target_epsilon_is_calibrated_for_the_cyclic_run():
    cfg = make_config({**SMALL, **FTRL, "noise_multiplier": 0.0, "target_epsilon": 3.0,
                       "rounds": 7})
    sampler, plan, server_chain = build_server(cfg, key=jax.random.key(0))
    acc = ledger_for(server_chain, sampler.spec, accountant="rdp", delta=plan.delta)
    assert isinstance(acc, DPFTRLAccountant) and plan.calibrated
    assert acc.noise_multiplier == pytest.approx(plan.noise_multiplier)
    acc.record_round(7)
    assert acc.participation == "once_per_tree"
    assert 0.999 * 3.0 <= acc.epsilon() <= 3.0


CLIP = clip_per_client(0.5)
SUM = sum_updates()
TREE = dp_ftrl_tree_noise(noise_multiplier=2.0, clip_norm=1.0, max_rounds=4,
                          key=jax.random.key(0))
CYCLIC = CyclicSampler(60, 10).spec  # six rounds per pass


def test_ledger_reads_the_tree_and_the_bound():
    acc = ledger_for(chain(CLIP, SUM, TREE), CYCLIC, delta=1e-5)
    # Node noise std 2.0 * 1.0 over the real bound 0.5: the accounted multiplier is 4.
    assert acc.noise_multiplier == pytest.approx(4.0) and acc.max_rounds == 4
    acc.record_round(4)
    assert acc.epsilon() == pytest.approx(dp_ftrl_epsilon(4.0, 4, 1e-5, max_rounds=4))
    assert acc.rounds_per_pass == 6 and acc.participation == "once"
    assert ledger_for(chain(CLIP, SUM), CYCLIC) is None  # no noise: nothing to account


@pytest.mark.parametrize("stages,fragment", [
    ((SUM, TREE), "bounds"),
    ((CLIP, TREE), "before any reducer"),
    ((CLIP, sum_updates(weighted=True), TREE), "sum_updates"),
    ((CLIP, SUM, TREE, gaussian_noise(1.0, 1.0, key=jax.random.key(1))),
     "more than one stage adds DP noise"),
    ((adaptive_clip(1.0, 0.5, 0.2, 0.0, key=jax.random.key(2)), SUM, TREE), "adaptive"),
])
def test_ledger_rejects(stages, fragment):
    with pytest.raises(ConfigError, match="^server_chain=") as e:
        ledger_for(chain(*stages), CYCLIC)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_tree_ledger_needs_a_cyclic_schedule_and_rdp():
    with pytest.raises(ConfigError, match="^sampling='fixed'"):
        ledger_for(chain(CLIP, SUM, TREE), CyclicSampler(60, 10).spec.fixed(10, 60))
    with pytest.raises(ConfigError, match="^accountant='pld'"):
        ledger_for(chain(CLIP, SUM, TREE), CYCLIC, accountant="pld")


def test_accountant_rejects_a_tree_longer_than_a_pass():
    with pytest.raises(ConfigError, match="^max_rounds=5: .*twice"):
        DPFTRLAccountant(1.0, 5, rounds_per_pass=4)
    acc = DPFTRLAccountant(1.0, 4, rounds_per_pass=4, delta=1e-5)
    assert acc.epsilon() == 0.0
    acc.record_round(9)  # trees [4, 4, 1], three passes: composed
    want = _direct_epsilon(1.0, 9, 4, 4, 1e-5)
    assert acc.epsilon() == pytest.approx(want, rel=1e-9)
    assert math.isclose(acc.epsilon(), dp_ftrl_epsilon(1.0, 9, 1e-5, max_rounds=4,
                                                       participation="once_per_tree"))


# ------------------------------------------------- Honaker's efficient tree estimator


def _noise_paths(efficient, *, z=1.5, clip=2.0, denom=3.0, max_rounds=6, rounds=11,
                 seeds=1000):
    """Per seed and round: the running sum of what the transform emits minus the prefix
    sum of the inputs, and the transform's own N_t ([seeds, rounds, 32] each)."""
    params = jnp.zeros((32,), jnp.float32)
    inputs = 0.1 * jnp.arange(1, rounds + 1, dtype=jnp.float32)[:, None] * jnp.ones((1, 32))

    def path(key):
        tx = dp_ftrl_tree_noise(noise_multiplier=z, clip_norm=clip, max_rounds=max_rounds,
                                key=key, denominator=denom, efficient=efficient)

        def step(carry, x):
            total, prefix, state = carry
            y, state = tx.update(x, state)
            carry = (total + y, prefix + x, state)
            return carry, (total + y - (prefix + x), tree_prefix_noise(state))

        init = (jnp.zeros_like(params), jnp.zeros_like(params), tx.init(params))
        return jax.lax.scan(step, init, inputs)[1]

    keys = jax.random.split(jax.random.key(4), seeds)
    released, own = jax.jit(jax.vmap(path))(keys)
    return np.asarray(released), np.asarray(own), (z * clip / denom) ** 2


def test_efficient_tree_variance_matches_closed_form_and_beats_the_plain_tree():
    eff, eff_own, var = _noise_paths(True)
    plain, plain_own, _ = _noise_paths(False)
    np.testing.assert_allclose(eff, eff_own, atol=1e-5)  # sum of outputs = prefix + N_t
    np.testing.assert_allclose(plain, plain_own, atol=1e-5)
    assert efficient_node_variance(0) == 1.0 and efficient_node_variance(1) == 2 / 3
    for t in range(1, 12):
        pos = (t - 1) % 6 + 1  # position in the current tree (restart after 6 rounds)
        bits = [k for k in range(pos.bit_length()) if pos >> k & 1]
        want = var * sum(efficient_node_variance(k) for k in bits)
        want_plain = var * len(bits)
        got, got_plain = np.var(eff[:, t - 1]), np.var(plain[:, t - 1])
        # 32000 samples: the variance estimate's relative s.d. is ~0.8%.
        assert got == pytest.approx(want, rel=0.03), t
        assert got_plain == pytest.approx(want_plain, rel=0.03), t
        assert abs(np.mean(eff[:, t - 1])) < 4 * math.sqrt(want / eff[:, t - 1].size)
        if pos > 1:  # a node above the leaves is in the sum: strictly less noise
            assert want <= 0.85 * want_plain and got < 0.9 * got_plain, t
        else:
            assert want == want_plain
    last = eff[:, -1].ravel()
    assert stats.kstest(last / math.sqrt(np.var(last)), "norm").pvalue > 1e-3


def test_efficient_tree_keeps_the_accounting():
    import dataclasses
    kwargs = dict(noise_multiplier=2.0, clip_norm=0.5, max_rounds=8, key=jax.random.key(0))
    plain = dp_ftrl_tree_noise(**kwargs).mechanism
    eff = dp_ftrl_tree_noise(**kwargs, efficient=True).mechanism
    assert eff.efficient and not plain.efficient
    assert dataclasses.replace(eff, efficient=False) == plain
    accs = []
    for efficient in (False, True):
        t = dp_ftrl_aggregator(0.5, 2.0, 10, 8, key=jax.random.key(0), efficient=efficient)
        acc = ledger_for(t, CyclicSampler(80, 10).spec, delta=1e-5)  # 8 rounds a pass
        acc.record_round(12)
        accs.append(acc.epsilon())
    assert accs[0] == accs[1] == dp_ftrl_epsilon(2.0, 12, 1e-5, max_rounds=8,
                                                 participation="once_per_tree")
    cfg = make_config({**SMALL, **FTRL, "ftrl_efficient": True})
    _, _, server_chain = build_server(cfg, key=jax.random.key(0))
    tree = server_chain.stages[2]
    assert tree.name == "dp_ftrl_tree" and tree.mechanism.efficient is True
