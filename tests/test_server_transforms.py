"""One shared suite run over every server stage, jitted and not jitted.

Checks, for every stage constructor of :mod:`fedjax_sim.server` (plus the DP-FTRL stages
and the omniscient attacks): state shapes/dtypes are stable across updates (and a jitted
update never retraces), masked junk clients change nothing, client order does not matter
(client-stage randomness is keyed by client id), jit agrees with eager execution, the
stacked ``reduce`` is ``update`` and counts the clients that reach the reducer, and a
streaming chain's ``partial`` over two halves + ``finalize`` is ``update`` on the whole
cohort. Plus the chain's build-time order check and the compressors' own properties.
"""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from fedjax_sim import poisoning as P
from fedjax_sim import server as S
from fedjax_sim._validation import ConfigError
from fedjax_sim.server import compression

C = 11          # clients in the base cohort
NUM_JUNK = 4    # masked junk clients appended in the mask test
PARAMS = {"w": jnp.zeros((3, 2), jnp.float32), "b": jnp.zeros((4,), jnp.float32)}
# Population ids of the base cohort; positions 3 and 7 are masked (see make_cohort).
IDS = np.asarray([10, 21, 5, 33, 17, 46, 8, 61, 29, 14, 50], np.int32)


def _key(i):
    return jax.random.key(i)


def is_malicious(ids):
    """The omniscient adversary of the suite: ids 21 and 46 (unmasked) and 61 (masked)."""
    return (ids >= 0) & (ids % 5 == 1)


def _weighted_mean_stacked():
    """weighted_mean's math as a reducer without a streaming form (a hand-built Stage)."""
    r = S.weighted_mean()
    return S.Stage("weighted_mean_stacked", S.StageKind.REDUCE,
                   apply=lambda c, s: r.finalize(r.partial(c, s), s))


def _halve():
    """A custom client stage (built with client_stage): every upload times 0.5."""
    return S.client_stage("halve", lambda c, s: c._replace(
        updates=jax.tree.map(lambda u: 0.5 * u, c.updates)), preserves_bound=True)


# (id, factory, streams): streams is what Chain.streaming must report (a chain streams
# when its reducer is a sum and only CLIENT stages come before it).
CASES = [
    # CLIENT stages (no reducer: cohort out)
    ("clip_per_client", lambda: S.clip_per_client(0.8), False),
    ("zero_above_norm", lambda: S.zero_above_norm(2.5), False),
    ("adaptive_clip", lambda: S.adaptive_clip(1.0, 0.5, 0.2, 0.5, key=_key(1)), False),
    ("stochastic_quantize_leaf", lambda: S.stochastic_quantize(3, key=_key(2)), False),
    ("stochastic_quantize_global",
     lambda: S.stochastic_quantize(2, key=_key(2), per_leaf=False), False),
    ("hadamard_rotate_quantize", lambda: S.hadamard_rotate_quantize(3, key=_key(3)), False),
    ("top_k", lambda: S.top_k_sparsify(3), False),
    ("top_k_fraction", lambda: S.top_k_sparsify(fraction=0.3), False),
    ("client_stage", _halve, False),
    # COHORT stages: the omniscient attacks (cohort out)
    ("omniscient_alie", lambda: P.omniscient_attack("alie", is_malicious), False),
    ("omniscient_alie_unsigned_z",
     lambda: P.omniscient_attack("alie", is_malicious, z=0.7, signed=False), False),
    ("omniscient_ipm", lambda: P.omniscient_attack("ipm", is_malicious, epsilon=0.5), False),
    # REDUCE stages
    ("weighted_mean", S.weighted_mean, True),
    ("weighted_mean_stacked", _weighted_mean_stacked, False),
    ("unweighted_mean", S.unweighted_mean, True),
    ("sum_updates", S.sum_updates, True),
    ("sum_updates_weighted", lambda: S.sum_updates(weighted=True), True),
    ("coordinate_median", S.coordinate_median, False),
    ("trimmed_mean", lambda: S.trimmed_mean(0.2), False),
    ("krum", lambda: S.krum(2, block_size=4), False),
    ("multi_krum", lambda: S.multi_krum(2, 3, block_size=4), False),
    ("bulyan", lambda: S.bulyan(1, block_size=4), False),
    ("bulyan_iterative", lambda: S.bulyan(1, selection="iterative"), False),
    ("geometric_median", lambda: S.geometric_median(5, 1e-6), False),
    ("centered_clipping", lambda: S.centered_clipping(1.0, 2), False),
    ("dnc", lambda: S.dnc(2, key=_key(14), subsample_dim=5, num_iters=2), False),
    # complete chains (AGGREGATE stages need a reducer before them)
    ("sum_then_noise", lambda: S.chain(S.sum_updates(), S.gaussian_noise(1.0, 1.0, key=_key(4))),
     True),
    ("mean_then_normalize", lambda: S.chain(S.unweighted_mean(), S.dp_mean_normalize(3.0)),
     True),
    ("sum_then_tree", lambda: S.chain(S.sum_updates(), S.dp_ftrl_tree_noise(
        noise_multiplier=0.8, clip_norm=1.0, max_rounds=5, key=_key(8), denominator=2.0)),
     True),
    ("dp_fedavg", lambda: S.dp_fedavg_aggregator(0.5, 1.1, 9.0, key=_key(5)), True),
    ("dp_fedavg_adaptive",
     lambda: S.dp_fedavg_aggregator(0.5, 0.8, 20.0, key=_key(6), adaptive=True), True),
    ("dp_ftrl", lambda: S.dp_ftrl_aggregator(0.6, 1.2, 9, 6, key=_key(9)), True),
    ("dp_ftrl_efficient",
     lambda: S.dp_ftrl_aggregator(0.6, 1.2, 9, 6, key=_key(10), efficient=True), True),
    ("filter_adaptive_clip_sum",
     lambda: S.chain(S.zero_above_norm(2.5), S.adaptive_clip(1.0, 0.5, 0.2, 0.5, key=_key(13)),
                     S.sum_updates()),
     True),
    ("clip_quantize_trim",
     lambda: S.chain(S.clip_per_client(1.0), S.stochastic_quantize(4, key=_key(7)),
                     S.trimmed_mean(0.1)), False),
    ("alie_then_mean",
     lambda: S.chain(P.omniscient_attack("alie", is_malicious), S.weighted_mean()), False),
    ("as_chain_weighted_mean", lambda: S.as_chain(S.weighted_mean()), True),
]
CASE_IDS = [c[0] for c in CASES]
NOISY = ("sum_then_noise", "sum_then_tree", "dp_fedavg", "dp_ftrl")


def test_cases_cover_every_stage_constructor():
    """Every stage constructor fedjax_sim.server exports appears in CASES."""
    constructors = {"adaptive_clip", "clip_per_client", "zero_above_norm",
                    "hadamard_rotate_quantize", "stochastic_quantize", "top_k_sparsify",
                    "dp_ftrl_aggregator", "dp_ftrl_tree_noise", "dp_fedavg_aggregator",
                    "dp_mean_normalize", "gaussian_noise", "bulyan", "krum", "multi_krum",
                    "centered_clipping", "coordinate_median", "geometric_median",
                    "sum_updates", "trimmed_mean", "unweighted_mean", "weighted_mean",
                    "dnc", "client_stage", "chain", "as_chain", "Stage"}
    # Classes (states, NamedTuples, Chain) are no constructors, Stage itself aside.
    exported = {n for n in S.__all__ if callable(getattr(S, n))
                and (not isinstance(getattr(S, n), type) or n == "Stage")}
    helpers = {"cohort_size", "is_cohort", "masked_weights", "per_client_l2_norms",
               "scale_per_client", "weighted_sum", "zero_masked", "clip_diagnostics"}
    assert exported - helpers == constructors  # a new constructor must join the suite
    import inspect
    source = inspect.getsource(inspect.getmodule(test_cases_cover_every_stage_constructor))
    cases_src = source[source.index("CASES = ["):source.index("CASE_IDS =")]
    helpers_src = source[source.index("def _weighted_mean_stacked"):source.index("CASES = [")]
    for name in constructors:
        assert re.search(rf"\bS\.{name}\b", cases_src + helpers_src), name


def make_cohort(seed=0, c=C, ids=True):
    rng = np.random.default_rng(seed)
    updates = {"w": rng.normal(size=(c, 3, 2)) * rng.uniform(0.2, 3.0, size=(c, 1, 1)),
               "b": rng.normal(size=(c, 4))}
    mask = np.ones(c, bool)
    mask[[3, 7]] = False  # masked clients inside the cohort, with nonzero weights
    weights = rng.uniform(0.5, 2.0, size=c)
    return S.CohortUpdates(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), updates),
                           jnp.asarray(weights, jnp.float32), jnp.asarray(mask),
                           jnp.asarray(IDS[:c]) if ids else None)


def with_junk(cohort, seed=1):
    """The cohort plus NUM_JUNK masked padding clients (id -1) with huge uploads."""
    rng = np.random.default_rng(seed)
    junk = jax.tree.map(
        lambda u: jnp.asarray(rng.normal(size=(NUM_JUNK,) + u.shape[1:]) * 1e8, u.dtype),
        cohort.updates)
    cat = lambda a, b: jnp.concatenate([a, b], axis=0)  # noqa: E731
    return S.CohortUpdates(jax.tree.map(cat, cohort.updates, junk),
                           cat(cohort.weights, jnp.full((NUM_JUNK,), 5.0, jnp.float32)),
                           cat(cohort.mask, jnp.zeros((NUM_JUNK,), bool)),
                           cat(cohort.client_ids, jnp.full((NUM_JUNK,), -1, jnp.int32)))


def permute(cohort, perm):
    return jax.tree.map(lambda x: x[perm], cohort)


def take(cohort, rows):
    return jax.tree.map(lambda x: x[rows], cohort)


def comparable(tree):
    """Typed PRNG keys as their raw data, so trees can be compared numerically."""
    def conv(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.key_data(x)
        return x
    return jax.tree.map(conv, tree)


def assert_close(a, b, rtol=2e-5, atol=1e-5):
    chex.assert_trees_all_close(comparable(a), comparable(b), rtol=rtol, atol=atol)


def unmasked_after_client_stages(c, cohort, state):
    """Reference count: the stages before the reducer run one at a time (each a one-stage
    chain), then the unmasked clients are counted."""
    value = S.zero_masked(cohort)
    for stage, st in zip(c.pre, state):
        value, _ = stage.update(value, st)
    return int(np.sum(np.asarray(value.mask)))


@pytest.mark.parametrize("name,factory,streams", CASES, ids=CASE_IDS)
def test_shared_suite(name, factory, streams):
    has_noise = name.startswith(NOISY)
    t = factory()
    c = S.as_chain(t)
    kind = "aggregate" if c.complete else "cohort"
    assert c.streaming is streams
    assert (c.why_stacked is None) == (streams or not c.complete)
    cohort = make_cohort()
    state0 = t.init(PARAMS)
    traces = []

    def counted_update(value, state):
        traces.append(None)  # runs once per trace
        return t.update(value, state)

    update = jax.jit(counted_update)

    # Fixed state shapes/dtypes across two updates; the jitted update never retraces.
    out, state1 = update(cohort, state0)
    _, state2 = update(make_cohort(seed=5), state1)
    assert len(traces) == 1
    chex.assert_trees_all_equal_shapes_and_dtypes(state0, state1, state2)
    chex.assert_tree_all_finite(comparable(out))
    if kind == "cohort":
        assert S.is_cohort(out)
        chex.assert_trees_all_equal_shapes_and_dtypes(out, cohort)
        # Masked clients stay masked with weight 0 and a zero update.
        assert not np.any(np.asarray(out.mask) & ~np.asarray(cohort.mask))
        np.testing.assert_array_equal(np.asarray(out.weights)[~np.asarray(out.mask)], 0.0)
        for leaf in jax.tree.leaves(out.updates):
            np.testing.assert_array_equal(np.asarray(leaf)[~np.asarray(out.mask)], 0.0)
        np.testing.assert_array_equal(out.client_ids, cohort.client_ids)
    else:
        assert not S.is_cohort(out)
        chex.assert_trees_all_equal_shapes_and_dtypes(out, PARAMS)

    # Not jitted (jax.disable_jit) agrees with jitted, output and state.
    with jax.disable_jit():
        out_eager, state_eager = t.update(cohort, state0)
    assert_close((out_eager, state_eager), (out, state1))

    # The chain's state: a stage alone is a one-stage chain.
    cstate0, cstate1 = ((state0, state1) if isinstance(t, S.Chain)
                        else ((state0,), (state1,)))
    if c.complete:
        # The stacked path is update, and it counts the clients that reach the reducer.
        reduce = jax.jit(c.reduce)
        agg_r, state_r, counts = reduce(cohort, cstate0)
        assert_close((agg_r, state_r), (out, cstate1))
        count = int(counts.aggregated)
        assert count == unmasked_after_client_stages(c, cohort, cstate0)
        assert int(counts.contributing) == count  # every weight of the cohort is positive
        if name == "filter_adaptive_clip_sum":  # zero_above_norm drops some clients
            norms = np.linalg.norm(np.concatenate(
                [np.asarray(u, np.float64).reshape(C, -1) for u in jax.tree.leaves(
                    cohort.updates)], axis=1), axis=1)
            assert count == np.sum(np.asarray(cohort.mask) & (norms <= 2.5)) < C - 2
        else:
            assert count == C - 2
    else:
        with pytest.raises(ConfigError, match="^server_chain=.*has no reducer"):
            c.reduce(cohort, cstate0)
    if streams:
        # Two halves reduced apart and summed, then finalised: update on the whole cohort.
        first, second = take(cohort, np.arange(5)), take(cohort, np.arange(5, C))
        partial = jax.jit(c.partial)
        total = jax.tree.map(jnp.add, partial(first, cstate0), partial(second, cstate0))
        agg_s, state_s, counts_s = jax.jit(c.finalize)(total, cstate0)
        assert_close((agg_s, state_s), (out, cstate1))
        assert (int(counts_s.aggregated), int(counts_s.contributing)) == (
            int(counts.aggregated), int(counts.contributing))
    else:
        with pytest.raises(ConfigError, match="^server_chain=.*does not stream"):
            c.partial(cohort, cstate0)

    # Appending masked junk clients (huge values, nonzero weights) changes nothing.
    out_junk, state_junk = update(with_junk(cohort), state0)
    if kind == "cohort":
        assert_close(jax.tree.map(lambda x: x[:C], out_junk), out)
        np.testing.assert_array_equal(np.asarray(out_junk.mask)[C:], False)
        np.testing.assert_array_equal(np.asarray(out_junk.weights)[C:], 0.0)
        for leaf in jax.tree.leaves(out_junk.updates):
            np.testing.assert_array_equal(np.asarray(leaf)[C:], 0.0)
    else:
        assert_close(out_junk, out)
    assert_close(state_junk, state1)

    # Client order does not matter (same key; randomness is keyed by client id);
    # per-client outputs permute along.
    perm = np.random.default_rng(3).permutation(C)
    out_perm, state_perm = update(permute(cohort, perm), state0)
    expected = permute(out, perm) if kind == "cohort" else out
    assert_close(out_perm, expected)
    assert_close(state_perm, state1)

    # A round with every client masked: nothing gets through (noise aside).
    none = cohort._replace(mask=jnp.zeros_like(cohort.mask))
    out_none, _ = update(none, state0)
    if kind == "cohort":
        out_none = out_none.updates
    if not has_noise:
        for leaf in jax.tree.leaves(out_none):
            np.testing.assert_array_equal(np.asarray(leaf), 0.0)
    assert len(traces) == 2  # one more shape (the junk cohort), nothing else


@pytest.mark.parametrize("build", [
    lambda: (S.clip_per_client(1.0), S.gaussian_noise(1.0, 1.0, key=_key(0)),
             S.sum_updates()),                                   # noise before the reducer
    lambda: (S.gaussian_noise(1.0, 1.0, key=_key(0)), S.weighted_mean()),
    lambda: (S.dp_mean_normalize(2.0), S.dp_ftrl_tree_noise(
        noise_multiplier=1.0, clip_norm=1.0, max_rounds=4, key=_key(0)), S.sum_updates()),
    lambda: (S.sum_updates(), S.clip_per_client(1.0)),            # client stage after it
    lambda: (S.weighted_mean(), S.dp_mean_normalize(2.0), S.top_k_sparsify(2)),
    lambda: (S.sum_updates(), P.omniscient_attack("ipm", is_malicious)),  # cohort stage
    lambda: (S.sum_updates(), S.weighted_mean()),                  # two reducers
    lambda: (S.clip_per_client(1.0), S.krum(0), S.dp_mean_normalize(2.0), S.coordinate_median()),
    lambda: (S.dp_fedavg_aggregator(1.0, 1.0, 5.0, key=_key(0)), S.trimmed_mean(0.1)),
    lambda: (S.dp_fedavg_aggregator(1.0, 1.0, 5.0, key=_key(0)), S.stochastic_quantize(
        2, key=_key(1))),                                          # a chain, then a client stage
], ids=["noise_before_sum", "noise_first", "tree_before_sum", "client_after",
        "top_k_after_normalize", "cohort_after", "two_reducers", "two_reducers_between",
        "chain_then_reducer", "chain_then_client"])
def test_wrong_stage_order_is_a_config_error_at_build_time(build):
    with pytest.raises(ConfigError) as err:
        S.chain(*build())
    msg = str(err.value)
    assert msg.startswith("server_chain=") and "\n" not in msg
    assert ("must come before the reducer" in msg or "must come after the reducer" in msg
            or "more than one reducer" in msg), msg


def test_wrong_stage_order_messages_name_the_misplaced_stage():
    noise = S.gaussian_noise(1.0, 1.0, key=_key(0))
    with pytest.raises(ConfigError, match="^server_chain=.*'gaussian_noise' is an aggregate "
                       "stage and must come after the reducer 'sum_updates'"):
        S.chain(S.clip_per_client(1.0), noise, S.sum_updates())
    with pytest.raises(ConfigError, match="^server_chain=.*'clip_per_client' is a client "
                       "stage and must come before the reducer"):
        S.chain(S.sum_updates(), S.clip_per_client(1.0))
    with pytest.raises(ConfigError, match="^server_chain=.*'omniscient_ipm' is a cohort "
                       "stage and must come before the reducer"):
        S.chain(S.weighted_mean(), P.omniscient_attack("ipm", is_malicious))
    with pytest.raises(ConfigError, match=r"^server_chain=.*more than one reducer "
                       r"\(sum_updates, krum\)"):
        S.chain(S.sum_updates(), S.krum(0))
    with pytest.raises(ConfigError, match="^server_chain="):
        S.chain()
    with pytest.raises(ConfigError, match="^server_chain="):
        S.chain(S.weighted_mean(), "dp_mean_normalize")
    # A valid order builds, and chains flatten into their stages.
    c = S.chain(S.chain(S.clip_per_client(1.0), S.top_k_sparsify(2)), S.sum_updates(),
                S.chain(noise, S.dp_mean_normalize(2.0)))
    assert c.names == ("clip_per_client", "top_k_sparsify", "sum_updates", "gaussian_noise",
                       "dp_mean_normalize")
    assert [s.kind for s in c.stages] == [S.StageKind.CLIENT] * 2 + [S.StageKind.REDUCE] + [
        S.StageKind.AGGREGATE] * 2


def test_stage_attributes_are_typed():
    """What the removed info dicts said, as typed stage attributes."""
    K = S.StageKind
    clip = S.clip_per_client(0.8)
    assert (clip.name, clip.kind, clip.bound, clip.preserves_bound) == (
        "clip_per_client", K.CLIENT, 0.8, True)
    filt = S.zero_above_norm(2.5)
    assert (filt.name, filt.kind, filt.bound) == ("zero_above_norm", K.CLIENT, 2.5)
    ada = S.adaptive_clip(1.0, 0.5, 0.2, 0.5, key=_key(1))
    assert (ada.kind, ada.bound) == (K.CLIENT, "state")
    assert float(ada.clip_norm(ada.init(PARAMS))) == 1.0
    for q in (S.stochastic_quantize(3, key=_key(2)), S.hadamard_rotate_quantize(3, key=_key(3))):
        assert q.kind is K.CLIENT and q.bound is None and not q.preserves_bound
    top = S.top_k_sparsify(3)
    assert (top.name, top.kind, top.bound, top.preserves_bound) == (
        "top_k_sparsify", K.CLIENT, None, True)
    assert S.sum_updates().unit_sum and not S.sum_updates(weighted=True).unit_sum
    for r in (S.weighted_mean(), S.unweighted_mean(), S.sum_updates()):
        assert r.kind is K.REDUCE and r.streaming
    for r in (S.coordinate_median(), S.trimmed_mean(0.1), S.geometric_median(),
              S.centered_clipping(1.0)):
        assert r.kind is K.REDUCE and not r.streaming and not r.unit_sum
    assert S.krum(2).min_cohort == 7 and S.multi_krum(2, 9).min_cohort == 9
    assert S.bulyan(2).min_cohort == 11
    noise = S.gaussian_noise(1.3, 0.7, key=_key(4))
    assert (noise.name, noise.kind) == ("gaussian_noise", K.AGGREGATE)
    assert noise.mechanism.noise_multiplier == 1.3 and noise.mechanism.sensitivity == 0.7
    assert S.gaussian_noise(0.0, 0.7, key=_key(4)).mechanism is None  # z = 0: no DP
    assert S.dp_mean_normalize(3.0).kind is K.AGGREGATE
    alie = P.omniscient_attack("alie", is_malicious)
    assert (alie.name, alie.kind) == ("omniscient_alie", K.COHORT)
    assert P.omniscient_attack("ipm", is_malicious).name == "omniscient_ipm"
    assert S.as_chain(S.chain(clip, S.sum_updates())).names == ("clip_per_client",
                                                                "sum_updates")


def test_aggregate_stages_run_alone_on_an_aggregate():
    """AGGREGATE stages and reducer-less chains of them act on an aggregate directly."""
    agg = jax.tree.map(lambda p: p + 2.0, PARAMS)
    norm = S.dp_mean_normalize(4.0)
    out, st = norm.update(agg, norm.init(PARAMS))
    assert st == ()
    chex.assert_trees_all_close(out, jax.tree.map(lambda p: p + 0.5, PARAMS))
    noise = S.gaussian_noise(1.0, 0.5, key=_key(3))
    tree = S.dp_ftrl_tree_noise(noise_multiplier=1.0, clip_norm=1.0, max_rounds=4,
                                key=_key(4))
    post = S.chain(noise, tree, norm)
    assert not post.complete and not post.streaming
    state = post.init(PARAMS)
    value, new = jax.jit(post.update)(agg, state)
    # By hand: one stage after the other, each alone.
    hand, hand_states = agg, []
    for stage, st in zip((noise, tree, norm), state):
        hand, st = stage.update(hand, st)
        hand_states.append(st)
    assert_close((value, new), (hand, tuple(hand_states)), rtol=1e-6, atol=1e-6)
    assert int(new[1].round) == 1
    # A client stage followed by an aggregate stage with no reducer in between: the
    # cohort never becomes an aggregate.
    with pytest.raises(TypeError, match="gaussian_noise: expects an aggregate"):
        S.chain(S.clip_per_client(1.0), noise).update(make_cohort(), (
            S.clip_per_client(1.0).init(PARAMS), noise.init(PARAMS)))


def test_raw_uint32_keys_are_accepted():
    t = S.stochastic_quantize(2, key=jax.random.PRNGKey(0))
    out, state = jax.jit(t.update)(make_cohort(), t.init(PARAMS))
    assert state.key.dtype == jnp.uint32 and S.is_cohort(out)


def test_missing_key_is_a_config_error():
    with pytest.raises(ConfigError, match="key"):
        S.gaussian_noise(1.0, 1.0, key=None)


def test_wrong_value_kind_raises():
    with pytest.raises(TypeError, match="CohortUpdates"):
        S.krum(0).update(PARAMS, ())
    with pytest.raises(TypeError, match="aggregate"):
        noise = S.gaussian_noise(1.0, 1.0, key=_key(0))
        noise.update(make_cohort(), noise.init(PARAMS))


# ----- compression properties -----

def test_fwht_matches_scipy_hadamard_and_is_self_inverse():
    x = jnp.asarray(np.random.default_rng(0).normal(size=16), jnp.float32)
    h = scipy.linalg.hadamard(16) / 4.0
    np.testing.assert_allclose(compression.fwht(x), h @ np.asarray(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(compression.fwht(compression.fwht(x)), x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("factory", [
    lambda k: S.stochastic_quantize(2, key=k),
    lambda k: S.stochastic_quantize(1, key=k, per_leaf=False),
    lambda k: S.hadamard_rotate_quantize(2, key=k),
], ids=["per_leaf", "global", "hadamard"])
def test_quantizers_are_unbiased(factory):
    # Many copies of one client: each copy draws its own rounding noise, so the cohort
    # average estimates E[Q(u)] (for the Hadamard rotation: given the round's shared signs).
    reps = 1000
    one = jax.tree.map(lambda u: u[:1], make_cohort().updates)
    cohort = S.CohortUpdates(jax.tree.map(lambda u: jnp.repeat(u, reps, axis=0), one),
                             jnp.ones((reps,), jnp.float32), jnp.ones((reps,), bool))
    t = factory(_key(11))
    out, _ = jax.jit(t.update)(cohort, t.init(PARAMS))
    for q, x in zip(jax.tree.leaves(out.updates), jax.tree.leaves(one)):
        q, x = np.asarray(q, np.float64), np.asarray(x[0], np.float64)
        assert np.std(q, axis=0).max() > 0  # it does randomise
        # |mean - x| within 5 standard errors (plus float slack) on every coordinate.
        bound = 5.0 * np.std(q, axis=0) / np.sqrt(reps) + 1e-5
        assert np.all(np.abs(q.mean(axis=0) - x) <= bound)


def test_stochastic_quantize_uses_at_most_2_to_the_bits_levels():
    t = S.stochastic_quantize(2, key=_key(0))
    out, _ = jax.jit(t.update)(make_cohort(), t.init(PARAMS))
    for leaf, orig in zip(jax.tree.leaves(out.updates), jax.tree.leaves(make_cohort().updates)):
        for c in range(C):
            vals = np.unique(np.asarray(leaf[c]))
            assert len(vals) <= 4
            if c not in (3, 7):
                assert vals.min() >= float(orig[c].min()) - 1e-6
                assert vals.max() <= float(orig[c].max()) + 1e-6


def test_top_k_keeps_the_largest_magnitudes():
    cohort = make_cohort()
    out, _ = S.top_k_sparsify(4).update(cohort, ())
    flat_in = np.concatenate([np.asarray(u).reshape(C, -1)
                              for u in jax.tree.leaves(cohort.updates)], axis=1)
    flat_out = np.concatenate([np.asarray(u).reshape(C, -1)
                               for u in jax.tree.leaves(out.updates)], axis=1)
    for c in np.flatnonzero(np.asarray(cohort.mask)):
        top = np.argsort(-np.abs(flat_in[c]), kind="stable")[:4]
        expected = np.zeros_like(flat_in[c])
        expected[top] = flat_in[c][top]
        np.testing.assert_array_equal(flat_out[c], expected)


@pytest.mark.parametrize("factory", [
    lambda k: S.stochastic_quantize(2, key=k),
    lambda k: S.hadamard_rotate_quantize(2, key=k),
], ids=["stochastic", "hadamard"])
def test_compressor_randomness_is_keyed_by_client_id(factory):
    """A client's encoding depends on its id and the round key, not on its position, its
    chunk or the cohort size; without ids the position is the id."""
    t = factory(_key(21))
    state = t.init(PARAMS)
    update = jax.jit(t.update)
    cohort = make_cohort(ids=True)
    out, _ = update(cohort, state)
    # The same clients in another order and in a smaller cohort: the same rows.
    rows = np.asarray([9, 0, 4, 5])
    sub, _ = update(take(cohort, rows), state)
    assert_close(sub.updates, take(out, rows).updates, rtol=0, atol=0)
    # Different ids, same uploads: different rounding.
    other, _ = update(cohort._replace(client_ids=cohort.client_ids + 1), state)
    assert not np.allclose(np.asarray(other.updates["w"]), np.asarray(out.updates["w"]))
    # No ids: keyed by position, i.e. ids 0 .. C-1.
    no_ids, _ = update(make_cohort(ids=False), state)
    by_position, _ = update(cohort._replace(client_ids=jnp.arange(C, dtype=jnp.int32)), state)
    assert_close(no_ids.updates, by_position.updates, rtol=0, atol=0)
    # The key advances once per round: the next round rounds differently.
    _, state1 = update(cohort, state)
    again, _ = update(cohort, state1)
    assert not np.allclose(np.asarray(again.updates["w"]), np.asarray(out.updates["w"]))
