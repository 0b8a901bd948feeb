"""One shared suite run over every server transform, jitted and not jitted.

Checks: state shapes/dtypes are stable across updates (and a jitted update never retraces),
masked junk clients change nothing, client order does not matter where it must not, and
jit agrees with eager execution. Plus the compressors' own properties.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from fedjax_sim import server as S
from fedjax_sim._validation import ConfigError
from fedjax_sim.server import compression

C = 11          # clients in the base cohort
NUM_JUNK = 4    # masked junk clients appended in the mask test
PARAMS = {"w": jnp.zeros((3, 2), jnp.float32), "b": jnp.zeros((4,), jnp.float32)}


def _key(i):
    return jax.random.key(i)


# (id, factory, kind, order_invariant). kind: "client" (CohortUpdates out) or "aggregate".
# order_invariant=False for transforms whose randomness is tied to a client's position.
CASES = [
    ("clip_per_client", lambda: S.clip_per_client(0.8), "client", True),
    ("zero_above_norm", lambda: S.zero_above_norm(2.5), "client", True),
    ("adaptive_clip", lambda: S.adaptive_clip(1.0, 0.5, 0.2, 0.5, key=_key(1)), "client", True),
    ("stochastic_quantize_leaf", lambda: S.stochastic_quantize(3, key=_key(2)), "client", False),
    ("stochastic_quantize_global",
     lambda: S.stochastic_quantize(2, key=_key(2), per_leaf=False), "client", False),
    ("hadamard_rotate_quantize", lambda: S.hadamard_rotate_quantize(3, key=_key(3)), "client",
     False),
    ("top_k", lambda: S.top_k_sparsify(3), "client", True),
    ("top_k_fraction", lambda: S.top_k_sparsify(fraction=0.3), "client", True),
    ("weighted_mean", S.weighted_mean, "aggregate", True),
    ("unweighted_mean", S.unweighted_mean, "aggregate", True),
    ("sum_updates", S.sum_updates, "aggregate", True),
    ("sum_updates_weighted", lambda: S.sum_updates(weighted=True), "aggregate", True),
    ("coordinate_median", S.coordinate_median, "aggregate", True),
    ("trimmed_mean", lambda: S.trimmed_mean(0.2), "aggregate", True),
    ("krum", lambda: S.krum(2, block_size=4), "aggregate", True),
    ("multi_krum", lambda: S.multi_krum(2, 3, block_size=4), "aggregate", True),
    ("bulyan", lambda: S.bulyan(1, block_size=4), "aggregate", True),
    ("bulyan_iterative", lambda: S.bulyan(1, selection="iterative"), "aggregate", True),
    ("geometric_median", lambda: S.geometric_median(5, 1e-6), "aggregate", True),
    ("centered_clipping", lambda: S.centered_clipping(1.0, 2), "aggregate", True),
    ("sum_then_noise", lambda: S.chain(S.sum_updates(), S.gaussian_noise(1.0, 1.0, key=_key(4))),
     "aggregate", True),
    ("mean_then_normalize", lambda: S.chain(S.unweighted_mean(), S.dp_mean_normalize(3.0)),
     "aggregate", True),
    ("dp_fedavg", lambda: S.dp_fedavg_aggregator(0.5, 1.1, 9.0, key=_key(5)), "aggregate", True),
    ("dp_fedavg_adaptive",
     lambda: S.dp_fedavg_aggregator(0.5, 0.8, 20.0, key=_key(6), adaptive=True),
     "aggregate", True),
    ("clip_quantize_trim",
     lambda: S.chain(S.clip_per_client(1.0), S.stochastic_quantize(4, key=_key(7)),
                     S.trimmed_mean(0.1)), "aggregate", False),
]
IDS = [c[0] for c in CASES]


def make_cohort(seed=0, c=C):
    rng = np.random.default_rng(seed)
    updates = {"w": rng.normal(size=(c, 3, 2)) * rng.uniform(0.2, 3.0, size=(c, 1, 1)),
               "b": rng.normal(size=(c, 4))}
    mask = np.ones(c, bool)
    mask[[3, 7]] = False  # masked clients inside the cohort, with nonzero weights
    weights = rng.uniform(0.5, 2.0, size=c)
    return S.CohortUpdates(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), updates),
                           jnp.asarray(weights, jnp.float32), jnp.asarray(mask))


def with_junk(cohort, seed=1):
    rng = np.random.default_rng(seed)
    junk = jax.tree.map(
        lambda u: jnp.asarray(rng.normal(size=(NUM_JUNK,) + u.shape[1:]) * 1e8, u.dtype),
        cohort.updates)
    cat = lambda a, b: jnp.concatenate([a, b], axis=0)
    return S.CohortUpdates(jax.tree.map(cat, cohort.updates, junk),
                           cat(cohort.weights, jnp.full((NUM_JUNK,), 5.0, jnp.float32)),
                           cat(cohort.mask, jnp.zeros((NUM_JUNK,), bool)))


def permute(cohort, perm):
    return jax.tree.map(lambda x: x[perm], cohort)


def comparable(tree):
    """Typed PRNG keys as their raw data, so trees can be compared numerically."""
    def conv(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.key_data(x)
        return x
    return jax.tree.map(conv, tree)


def assert_close(a, b, rtol=2e-5, atol=1e-5):
    chex.assert_trees_all_close(comparable(a), comparable(b), rtol=rtol, atol=atol)


@pytest.mark.parametrize("name,factory,kind,order_invariant", CASES, ids=IDS)
def test_shared_suite(name, factory, kind, order_invariant):
    has_noise = name.startswith(("sum_then_noise", "dp_fedavg"))
    t = factory()
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
    if kind == "client":
        assert S.is_cohort(out)
        chex.assert_trees_all_equal_shapes_and_dtypes(out, cohort)
        # Masked clients stay masked with weight 0 and a zero update.
        assert not np.any(np.asarray(out.mask) & ~np.asarray(cohort.mask))
        np.testing.assert_array_equal(np.asarray(out.weights)[~np.asarray(out.mask)], 0.0)
        for leaf in jax.tree.leaves(out.updates):
            np.testing.assert_array_equal(np.asarray(leaf)[~np.asarray(out.mask)], 0.0)
    else:
        assert not S.is_cohort(out)
        chex.assert_trees_all_equal_shapes_and_dtypes(out, PARAMS)

    # Not jitted (jax.disable_jit) agrees with jitted, output and state.
    with jax.disable_jit():
        out_eager, state_eager = t.update(cohort, state0)
    assert_close((out_eager, state_eager), (out, state1))

    # Appending masked junk clients (huge values, nonzero weights) changes nothing.
    out_junk, state_junk = update(with_junk(cohort), state0)
    if kind == "client":
        assert_close(jax.tree.map(lambda x: x[:C], out_junk), out)
        np.testing.assert_array_equal(np.asarray(out_junk.mask)[C:], False)
        np.testing.assert_array_equal(np.asarray(out_junk.weights)[C:], 0.0)
        for leaf in jax.tree.leaves(out_junk.updates):
            np.testing.assert_array_equal(np.asarray(leaf)[C:], 0.0)
    else:
        assert_close(out_junk, out)
    assert_close(state_junk, state1)

    # Client order does not matter (same key); per-client outputs permute along.
    if order_invariant:
        perm = np.random.default_rng(3).permutation(C)
        out_perm, state_perm = update(permute(cohort, perm), state0)
        expected = permute(out, perm) if kind == "client" else out
        assert_close(out_perm, expected)
        assert_close(state_perm, state1)

    # A round with every client masked: nothing gets through (noise aside).
    none = cohort._replace(mask=jnp.zeros_like(cohort.mask))
    out_none, _ = update(none, state0)
    if kind == "client":
        out_none = out_none.updates
    if not has_noise:
        for leaf in jax.tree.leaves(out_none):
            np.testing.assert_array_equal(np.asarray(leaf), 0.0)
    assert len(traces) == 2  # one more shape (the junk cohort), nothing else


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
