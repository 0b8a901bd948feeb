"""DP-FTRL tree aggregation: the emitted differences telescope to the prefix sum plus the
tree noise of that prefix, the noise has the closed-form variance, shapes stay fixed, and
the accounting matches a direct RDP computation of the paper's bound."""

import math

import chex
import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib
from scipy import stats

from fedjax_sim._validation import ConfigError
from fedjax_sim.privacy import (DPFTRLAccountant, GaussianSumNoise, SamplingSpec,
                                TreeAggregationNoise, dp_ftrl_dp_event, dp_ftrl_epsilon,
                                ledger_for, tree_depth)
from fedjax_sim.server.base import CohortUpdates, Stage, StageKind, chain
from fedjax_sim.server.dp_ftrl import (dp_ftrl_aggregator, dp_ftrl_tree_noise, tree_levels,
                                       tree_prefix_noise)

PARAMS = {"w": jnp.zeros((3, 2), jnp.float32), "b": jnp.zeros((4,), jnp.float32)}


def _aggregates(rounds):
    rng = np.random.default_rng(0)
    return [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), PARAMS)
            for _ in range(rounds)]


def _run(tx, xs, use_jit):
    update = jax.jit(tx.update) if use_jit else tx.update
    state = tx.init(PARAMS)
    outs, states = [], []
    for x in xs:
        y, state = update(x, state)
        outs.append(y)
        states.append(state)
    return outs, states


@pytest.mark.parametrize("use_jit", [True, False])
def test_running_sum_is_prefix_sum_plus_tree_noise(use_jit):
    tx = dp_ftrl_tree_noise(noise_multiplier=0.7, clip_norm=2.0, max_rounds=16,
                            key=jax.random.key(1), denominator=4.0)
    xs = _aggregates(11)
    if use_jit:
        outs, states = _run(tx, xs, True)
    else:
        with jax.disable_jit():
            outs, states = _run(tx, xs, False)
    run_sum = jax.tree.map(jnp.zeros_like, PARAMS)
    prefix = jax.tree.map(jnp.zeros_like, PARAMS)
    nodes = {}  # (level, index) -> noise, rebuilt from the states like a reference loop
    for t, (x, y, s) in enumerate(zip(xs, outs, states), start=1):
        run_sum = jax.tree.map(jnp.add, run_sum, y)
        prefix = jax.tree.map(jnp.add, prefix, x)
        # Active levels are exactly the set bits of t.
        active = [bool(jnp.any(s.tree_noise["w"][k] != 0)) for k in range(tree_levels(16))]
        assert active == [bool(t >> k & 1) for k in range(tree_levels(16))]
        k0 = (t & -t).bit_length() - 1  # the node completing at round t
        nodes[(k0, t >> k0)] = jax.tree.map(lambda a: a[k0], s.tree_noise)
        # N_t = sum of the nodes of t's binary decomposition, drawn when they completed.
        ref = jax.tree.map(jnp.zeros_like, PARAMS)
        for k in range(tree_levels(16)):
            if t >> k & 1:
                ref = jax.tree.map(jnp.add, ref, nodes[(k, t >> k)])
        chex.assert_trees_all_close(tree_prefix_noise(s), ref, atol=1e-6)
        chex.assert_trees_all_close(run_sum, jax.tree.map(jnp.add, prefix, ref), atol=1e-5)
        assert int(s.round) == t


def test_state_shapes_fixed_and_restart_wraps():
    tx = dp_ftrl_tree_noise(noise_multiplier=1.0, clip_norm=1.0, max_rounds=5,
                            key=jax.random.key(2))
    state0 = tx.init(PARAMS)
    assert tree_levels(5) == 3
    chex.assert_shape(state0.tree_noise["w"], (3, 3, 2))
    outs, states = _run(tx, _aggregates(12), True)
    for s in states:
        chex.assert_trees_all_equal_shapes_and_dtypes(s, states[0])
    assert [int(s.round) for s in states] == [1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2]
    # After a restart only the new tree's noise is inside the running sum.
    xs = _aggregates(12)
    total = jax.tree.map(lambda *a: sum(a), *outs)
    prefix = jax.tree.map(lambda *a: sum(a), *xs)
    chex.assert_trees_all_close(
        total, jax.tree.map(jnp.add, prefix, tree_prefix_noise(states[-1])), atol=1e-5)


def test_no_recompile_across_rounds():
    tx = dp_ftrl_tree_noise(noise_multiplier=1.0, clip_norm=1.0, max_rounds=4,
                            key=jax.random.key(3))
    update = jax.jit(chex.assert_max_traces(tx.update, n=1))
    state = tx.init(PARAMS)
    for x in _aggregates(9):
        _, state = update(x, state)


def test_cumulative_noise_variance_matches_closed_form():
    """Var N_t = popcount(t) * std^2 (<= ceil(log2(t+1)) std^2); restarted tree: that of
    the position within the current tree. Over many seeds, coordinates are i.i.d."""
    z, c, d, max_rounds, rounds = 1.5, 2.0, 3.0, 6, 11
    std = z * c / d
    params = jnp.zeros((32,), jnp.float32)

    def noise_path(key):
        tx = dp_ftrl_tree_noise(noise_multiplier=z, clip_norm=c, max_rounds=max_rounds,
                                key=key, denominator=d)

        def step(carry, _):
            total, state = carry
            y, state = tx.update(jnp.zeros_like(params), state)
            return (total + y, state), total + y

        _, path = jax.lax.scan(step, (jnp.zeros_like(params), tx.init(params)), None,
                               length=rounds)
        return path

    keys = jax.random.split(jax.random.key(4), 1000)
    paths = np.asarray(jax.jit(jax.vmap(noise_path))(keys))  # [seeds, rounds, 32]
    for t in range(1, rounds + 1):
        pos = (t - 1) % max_rounds + 1
        want = bin(pos).count("1") * std ** 2
        assert want <= math.ceil(math.log2(pos + 1)) * std ** 2
        sample = paths[:, t - 1, :].ravel()
        # 32000 samples: the variance estimate's relative s.d. is ~0.8%.
        assert np.var(sample) == pytest.approx(want, rel=0.03), t
        assert abs(np.mean(sample)) < 4 * math.sqrt(want / sample.size)
        if t == rounds:
            assert stats.kstest(sample / math.sqrt(want), "norm").pvalue > 1e-3


def test_ftrl_through_plain_sgd():
    """optax.sgd on the negated emitted deltas gives theta_t = theta_0 + lr * S_t."""
    lr = 0.1
    tx = dp_ftrl_tree_noise(noise_multiplier=1.0, clip_norm=1.0, max_rounds=8,
                            key=jax.random.key(5))
    opt = optax.sgd(lr)
    params = jax.tree.map(lambda p: p + 1.0, PARAMS)
    opt_state, state = opt.init(params), tx.init(params)
    xs = _aggregates(7)

    @jax.jit
    def server_step(theta, opt_state, state, x):
        delta, state = tx.update(x, state)
        upd, opt_state = opt.update(jax.tree.map(jnp.negative, delta), opt_state, theta)
        return optax.apply_updates(theta, upd), opt_state, state

    theta = params
    for x in xs:
        theta, opt_state, state = server_step(theta, opt_state, state, x)
    prefix = jax.tree.map(lambda *a: sum(a), *xs)
    want = jax.tree.map(lambda p, s, n: p + lr * (s + n), params, prefix,
                        tree_prefix_noise(state))
    chex.assert_trees_all_close(theta, want, atol=1e-5)


def test_info_and_errors():
    tx = dp_ftrl_tree_noise(noise_multiplier=2.0, clip_norm=0.5, max_rounds=100,
                            key=jax.random.key(0), denominator=10.0)
    assert (tx.name, tx.kind) == ("dp_ftrl_tree", StageKind.AGGREGATE)
    assert tx.mechanism == TreeAggregationNoise(2.0, 0.5, 100, False)
    assert tx.mechanism.noise_multiplier == 2.0 and tx.mechanism.sensitivity == 0.5
    assert tx.mechanism.max_rounds == 100 and tree_levels(100) == 7
    assert tx.init(PARAMS).tree_noise["w"].shape == (7, 3, 2)  # one node per level
    # The node noise std is z * clip_norm / denominator = 0.1: round 1 adds one fresh node.
    big = jnp.zeros((20_000,), jnp.float32)
    first, _ = jax.jit(tx.update)(big, tx.init(big))
    assert np.std(np.asarray(first)) == pytest.approx(0.1, rel=0.03)
    assert stats.kstest(np.asarray(first) / 0.1, "norm").pvalue > 1e-3
    assert dp_ftrl_tree_noise(noise_multiplier=1.0, clip_norm=1.0, max_rounds=4,
                              key=jax.random.key(0), efficient=True).mechanism.efficient
    state = tx.init(PARAMS)
    cohort = CohortUpdates(jax.tree.map(lambda p: p[None], PARAMS), jnp.ones(1), jnp.ones(1, bool))
    with pytest.raises(TypeError):
        tx.update(cohort, state)
    for kwargs, field in [(dict(noise_multiplier=0.0), "noise_multiplier"),
                          (dict(clip_norm=-1.0), "clip_norm"),
                          (dict(max_rounds=0), "max_rounds"),
                          (dict(denominator=0.0), "denominator"),
                          (dict(key=None), "key")]:
        args = dict(noise_multiplier=1.0, clip_norm=1.0, max_rounds=4, key=jax.random.key(0))
        args.update(kwargs)
        with pytest.raises(ConfigError, match=f"^{field}="):
            dp_ftrl_tree_noise(**args)


# ------------------------------------------------------------------------ accounting


def _max_nodes_per_leaf(steps):
    """Brute force: completed dyadic nodes [j 2^k + 1, (j+1) 2^k] (end <= steps) per leaf."""
    best = 0
    for leaf in range(1, steps + 1):
        count = sum(1 for k in range(steps.bit_length() + 1)
                    if ((leaf - 1) // 2 ** k + 1) * 2 ** k <= steps)
        best = max(best, count)
    return best


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7, 8, 9, 100, 1023, 1024])
def test_tree_depth_is_max_completed_nodes_per_leaf(steps):
    assert tree_depth(steps) == _max_nodes_per_leaf(steps) == math.ceil(math.log2(steps + 1))


@pytest.mark.parametrize("z,rounds,delta", [(10.0, 1000, 1e-5), (3.0, 64, 1e-6)])
def test_dp_ftrl_epsilon_is_gaussian_with_sqrt_depth_sensitivity(z, rounds, delta):
    depth = tree_depth(rounds)
    # Direct RDP of the tree: a Gaussian mechanism with sensitivity sqrt(depth) * C.
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(z / math.sqrt(depth)))
    got = dp_ftrl_epsilon(z, rounds, delta)
    assert got == pytest.approx(acc.get_epsilon(delta), rel=1e-9)
    orders = np.array(rdp_lib.DEFAULT_RDP_ORDERS)
    direct = rdp_lib.compute_epsilon(orders, orders * depth / (2 * z ** 2), delta)[0]
    assert got == pytest.approx(direct, rel=1e-9)


def test_dp_ftrl_restarts_and_participation():
    z, delta = 5.0, 1e-5
    # One tree of 1000 vs restarts every 100: smaller trees, smaller depth, smaller epsilon.
    assert dp_ftrl_epsilon(z, 1000, delta, max_rounds=100) < dp_ftrl_epsilon(z, 1000, delta)
    # Participating once per tree composes the trees: 10 trees of depth 7.
    per_tree = dp_ftrl_epsilon(z, 1000, delta, max_rounds=100, participation="once_per_tree")
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(z / math.sqrt(10 * tree_depth(100))))
    assert per_tree == pytest.approx(acc.get_epsilon(delta), rel=1e-9)
    assert dp_ftrl_dp_event(z, 250, max_rounds=100) == \
        dp_accounting.SingleEpochTreeAggregationDpEvent(z, [100, 100, 50])
    with pytest.raises(ConfigError, match="^participation="):
        dp_ftrl_dp_event(z, 10, participation="twice")
    with pytest.raises(ConfigError, match="^noise_multiplier="):
        dp_ftrl_epsilon(0.0, 10, delta)


# ------------------------------------------------------------ the ledger of a DP-FTRL chain


def _stage(name, kind, **kw):
    """A hypothetical typed stage: only what the ledger reads."""
    if kind is StageKind.REDUCE:
        kw.setdefault("partial", lambda c, s: c.updates)
        kw.setdefault("finalize", lambda t, s: (t, s))
    else:
        kw.setdefault("apply", (lambda c, s: c) if kind is StageKind.CLIENT
                      else (lambda v, s: (v, s)))
    if kw.get("bound") == "state":
        kw["bound_of"] = lambda st: 1.0
    return Stage(name, kind, **kw)


CLIP = _stage("clip_per_client", StageKind.CLIENT, bound=0.5, preserves_bound=True)
SUM = _stage("sum_updates", StageKind.REDUCE, unit_sum=True)
TREE = _stage("dp_ftrl_tree", StageKind.AGGREGATE,
              mechanism=TreeAggregationNoise(2.0, 1.0, 4))


def test_ledger_reads_the_tree_and_the_bound():
    acc = ledger_for(chain(CLIP, SUM, TREE), SamplingSpec.cyclic(10, 60), delta=1e-5)
    assert isinstance(acc, DPFTRLAccountant)
    # Node noise std 2.0 * 1.0 over the real bound 0.5: the accounted multiplier is 4.
    assert acc.noise_multiplier == pytest.approx(4.0) and acc.max_rounds == 4
    acc.record_round(4)
    assert acc.epsilon() == pytest.approx(dp_ftrl_epsilon(4.0, 4, 1e-5, max_rounds=4))
    assert acc.rounds_per_pass == 6 and acc.participation == "once"
    summary = acc.summary()
    assert summary["mechanism"] == "dp_ftrl_tree" and summary["rounds"] == 4
    assert summary["epsilon"] == acc.epsilon()


def test_ledger_of_the_real_dp_ftrl_aggregator_is_the_same_plain_or_efficient():
    accs = []
    for efficient in (False, True):
        t = dp_ftrl_aggregator(0.5, 2.0, 10, 8, key=jax.random.key(0), efficient=efficient)
        assert t.names == ("clip_per_client", "sum_updates", "dp_ftrl_tree",
                           "dp_mean_normalize")
        assert t.mechanisms[0].mechanism == TreeAggregationNoise(2.0, 0.5, 8, efficient)
        acc = ledger_for(t, SamplingSpec.cyclic(10, 80), delta=1e-5)
        assert acc.noise_multiplier == pytest.approx(2.0) and acc.rounds_per_pass == 8
        acc.record_round(12)
        accs.append(acc.epsilon())
    assert accs[0] == accs[1] == pytest.approx(
        dp_ftrl_epsilon(2.0, 12, 1e-5, max_rounds=8, participation="once_per_tree"))


@pytest.mark.parametrize("stages,sampling,field,fragment", [
    (lambda: (SUM, TREE), SamplingSpec.cyclic(10, 60), "server_chain", "bounds"),
    (lambda: (CLIP, TREE), SamplingSpec.cyclic(10, 60), "server_chain", "before any reducer"),
    (lambda: (CLIP, _stage("sum_updates", StageKind.REDUCE), TREE),
     SamplingSpec.cyclic(10, 60), "server_chain", "unweighted sum"),
    (lambda: (CLIP, SUM, TREE, _stage("gaussian_noise", StageKind.AGGREGATE,
                                      mechanism=GaussianSumNoise(1.0, 1.0))),
     SamplingSpec.cyclic(10, 60), "server_chain", "more than one stage adds DP noise"),
    (lambda: (_stage("adaptive_clip", StageKind.CLIENT, bound="state"), SUM, TREE),
     SamplingSpec.cyclic(10, 60), "server_chain", "adaptive"),
    (lambda: (CLIP, SUM, TREE), SamplingSpec.fixed(10, 60), "sampling", "cyclic schedule"),
    (lambda: (CLIP, SUM, TREE), SamplingSpec.poisson(0.1), "sampling", "cyclic schedule"),
    (lambda: (CLIP, SUM, TREE), SamplingSpec.cyclic(20, 60), "max_rounds", "twice"),
])
def test_ledger_of_a_tree_rejects(stages, sampling, field, fragment):
    with pytest.raises(ConfigError, match=f"^{field}=") as e:
        ledger_for(chain(*stages()), sampling)
    assert fragment in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="^accountant="):
        ledger_for(chain(CLIP, SUM, TREE), SamplingSpec.cyclic(10, 60), accountant="pld")
