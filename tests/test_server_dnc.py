"""DnC (Shejwalkar & Houmansadr 2021, Alg. 2) against a plain NumPy reference, and its
invariants: masked junk, client order, Byzantine resistance, jit, state, validation."""

from __future__ import annotations

import functools
import importlib
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sim import server as S
from fedjax_sim._validation import ConfigError

# ``fedjax_sim.server.dnc`` the attribute is the builder (re-exported by the package
# ``__init__``), which shadows the submodule of the same name; fetch the module itself.
dnc_lib = importlib.import_module("fedjax_sim.server.dnc")

C = 11
MASKED = (3, 8)
PARAMS = {"w": jnp.zeros((4, 3), jnp.float32), "b": jnp.zeros((5,), jnp.float32)}
D = 17  # coordinates of PARAMS
KEY = jax.random.key(42)


def make_cohort(seed=0, c=C, masked=MASKED):
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.3, 2.0, size=(c, 1, 1))
    updates = {"w": rng.normal(size=(c, 4, 3)) * scale, "b": rng.normal(size=(c, 5)) + 0.5}
    mask = np.ones(c, bool)
    mask[list(masked)] = False
    return S.CohortUpdates(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), updates),
                           jnp.asarray(rng.uniform(0.5, 3.0, size=c), jnp.float32),
                           jnp.asarray(mask))


def flat_matrix(updates):
    """``[C, D]`` float64, leaves concatenated in ``jax.tree.leaves`` order."""
    return np.concatenate([np.asarray(u, np.float64).reshape(u.shape[0], -1)
                           for u in jax.tree.leaves(updates)], axis=1)


def flat(tree):
    return np.concatenate([np.asarray(x, np.float64).reshape(-1) for x in jax.tree.leaves(tree)])


# ----- plain NumPy reference of Algorithm 2 (a loop over iterations, float64) -----

def np_dnc_good_set(x, mask, subsets, f, c=1.0):
    """The good set (sorted client indices) and the smallest relative score gap at the
    cut, so a test can check the float32 ranking cannot flip on rounding."""
    valid = np.flatnonzero(mask)
    n = len(valid)
    num_remove = max(min(math.floor(c * f), n - 1), 0)
    good, gap = set(valid.tolist()), np.inf
    for r in subsets:
        xs = x[valid][:, r]
        centred = xs - xs.mean(axis=0)
        v = np.linalg.svd(centred, full_matrices=False)[2][0]
        scores = (centred @ v) ** 2
        order = np.argsort(scores, kind="stable")
        good &= set(valid[order[:n - num_remove]].tolist())
        if 0 < num_remove < n:
            lo, hi = scores[order[n - num_remove - 1]], scores[order[n - num_remove]]
            gap = min(gap, (hi - lo) / max(hi, 1e-30))
    return sorted(good), gap


def np_dnc(x, mask, subsets, f, c=1.0):
    good, gap = np_dnc_good_set(x, mask, subsets, f, c)
    return (x[good].mean(axis=0) if good else np.zeros(x.shape[1])), len(good), gap


def round_subsets(key, b, iters, rounds=1):
    """The coordinate subsets of the first ``rounds`` rounds, by the stage's key schedule."""
    out = []
    for _ in range(rounds):
        key, round_key = jax.random.split(key)
        out.append(np.asarray(dnc_lib.coordinate_subsets(round_key, D, b, iters)))
    return out


@functools.cache
def jitted(f, b, iters, c=1.0):
    t = S.dnc(f, key=KEY, subsample_dim=b, num_iters=iters, filter_frac=c)
    return t, jax.jit(t.update)


# ----------------------------------------------------------------- agreement

@pytest.mark.parametrize("f,b,iters,c", [(1, 6, 3, 1.0), (3, 9, 4, 1.0), (2, 7, 3, 1.5),
                                         (4, 11, 2, 0.5)])
def test_good_set_matches_numpy(f, b, iters, c):
    good_set = jax.jit(dnc_lib.dnc_good_set)
    for seed in range(3):
        cohort = S.zero_masked(make_cohort(seed))
        x, mask = flat_matrix(cohort.updates), np.asarray(cohort.mask)
        rng = np.random.default_rng(100 + seed)
        subsets = np.stack([rng.choice(D, b, replace=False) for _ in range(iters)])
        expected, gap = np_dnc_good_set(x, mask, subsets, f, c)
        assert gap > 1e-4, "test data too close to a tie for float32"
        num_remove = min(math.floor(c * f), int(mask.sum()) - 1)
        for updates in (cohort.updates, jnp.asarray(x, jnp.float32)):  # pytree and [C, D]
            got = good_set(updates, cohort.mask, jnp.asarray(subsets, jnp.int32), num_remove)
            assert np.flatnonzero(np.asarray(got)).tolist() == expected, (f, seed)


def test_gather_and_subsets():
    cohort = make_cohort()
    x = flat_matrix(cohort.updates)
    index = jnp.asarray([16, 0, 4, 5, 11, 12, 3], jnp.int32)  # both leaves, both edges
    np.testing.assert_array_equal(np.asarray(dnc_lib.gather_coordinates(cohort.updates, index)),
                                  x[:, np.asarray(index)].astype(np.float32))
    subsets = np.asarray(dnc_lib.coordinate_subsets(jax.random.key(0), 1000, 50, 4))
    assert subsets.shape == (4, 50) and subsets.dtype == np.int32
    assert all(len(set(row)) == 50 for row in subsets)  # without replacement
    assert subsets.min() >= 0 and subsets.max() < 1000
    assert len({tuple(row) for row in subsets}) == 4  # a fresh subset per iteration
    # b >= d: every coordinate, once.
    full = np.asarray(dnc_lib.coordinate_subsets(jax.random.key(0), D, D + 3, 5))
    np.testing.assert_array_equal(full, np.arange(D)[None])


@pytest.mark.parametrize("f,b,iters,c", [(2, 6, 3, 1.0), (1, 40, 5, 1.0), (3, 8, 2, 0.7)])
def test_stage_matches_numpy_end_to_end(f, b, iters, c):
    t, update = jitted(f, b, iters, c)
    state = t.init(PARAMS)
    subsets = round_subsets(KEY, b, iters, rounds=3)
    assert not np.array_equal(subsets[0], subsets[1]) or b >= D  # fresh subsets per round
    for r, seed in enumerate((0, 1, 2)):
        cohort = make_cohort(seed)
        out, state = update(cohort, state)
        expected, kept, gap = np_dnc(flat_matrix(S.zero_masked(cohort).updates),
                                     np.asarray(cohort.mask), subsets[r], f, c)
        assert gap > 1e-4
        np.testing.assert_allclose(flat(out), expected, rtol=1e-5, atol=1e-6)
        assert int(state.num_kept) == kept
        chex.assert_trees_all_equal_shapes_and_dtypes(out, PARAMS)


def test_empty_and_tiny_rounds():
    t, update = jitted(2, 6, 3)
    state = t.init(PARAMS)
    none = make_cohort(masked=range(C))
    out, st = update(none, state)
    np.testing.assert_array_equal(flat(out), 0.0)
    assert int(st.num_kept) == 0
    # One unmasked client: nothing is removed (at least one client remains).
    one = make_cohort(masked=[i for i in range(C) if i != 5])
    out, st = update(one, state)
    np.testing.assert_allclose(flat(out), flat_matrix(one.updates)[5], rtol=1e-6)
    assert int(st.num_kept) == 1
    # Fewer unmasked clients than 2f + 1: still finite, at most n - 1 removed per iteration.
    few = make_cohort(masked=[i for i in range(C) if i not in (1, 4, 9)])
    out, st = update(few, state)
    assert np.all(np.isfinite(flat(out))) and 0 <= int(st.num_kept) <= 3


# ----------------------------------------------------------------- invariants

def with_junk(cohort, extra=3):
    """Appends ``extra`` masked clients with huge values and nonzero weight."""
    junk = jax.tree.map(lambda u: jnp.concatenate(
        [u, jnp.full((extra,) + u.shape[1:], 3e38, u.dtype)]), cohort.updates)
    return S.CohortUpdates(junk, jnp.concatenate([cohort.weights, jnp.full((extra,), 7.0)]),
                           jnp.concatenate([cohort.mask, jnp.zeros((extra,), bool)]))


def test_masked_junk_changes_nothing():
    t, update = jitted(2, 6, 3)
    state = t.init(PARAMS)
    cohort = make_cohort(4)
    out, st = update(cohort, state)
    # Junk appended (a larger static cohort) ...
    out_app, st_app = update(with_junk(cohort), state)
    # ... and junk (inf, NaN, huge) written over the masked clients in place.
    bad = np.array([np.inf, np.nan], np.float32)
    junk = jax.tree.map(lambda u: u.at[np.asarray(MASKED)].set(
        bad.reshape((2,) + (1,) * (u.ndim - 1))), cohort.updates)
    out_in, st_in = update(cohort._replace(updates=junk,
                                           weights=cohort.weights.at[MASKED[0]].set(1e6)),
                           state)
    for o, s in ((out_app, st_app), (out_in, st_in)):
        np.testing.assert_allclose(flat(o), flat(out), rtol=1e-5, atol=1e-6)
        assert int(s.num_kept) == int(st.num_kept)
        np.testing.assert_array_equal(jax.random.key_data(s.key), jax.random.key_data(st.key))


def test_client_order_does_not_matter():
    t, update = jitted(2, 6, 3)
    state = t.init(PARAMS)
    cohort = S.zero_masked(make_cohort(6))
    perm = np.random.default_rng(3).permutation(C)
    permuted = jax.tree.map(lambda x: x[perm], cohort)
    out, st = update(cohort, state)
    out_p, st_p = update(permuted, state)
    np.testing.assert_allclose(flat(out_p), flat(out), rtol=1e-5, atol=1e-6)
    assert int(st_p.num_kept) == int(st.num_kept)
    # The good set permutes along with the clients (the subsets depend on the key only).
    subsets = jnp.asarray(round_subsets(KEY, 6, 3)[0])
    good = np.asarray(dnc_lib.dnc_good_set(cohort.updates, cohort.mask, subsets, 2))
    good_p = np.asarray(dnc_lib.dnc_good_set(permuted.updates, permuted.mask, subsets, 2))
    np.testing.assert_array_equal(good_p, good[perm])


def test_resists_byzantine_clients():
    # 24 honest clients ~ N(mu, 0.1^2 I); 6 colluding Byzantine clients at mu + a shift of
    # norm 3 in one direction (each only ~1.5 honest-norms away from the honest mean).
    c, d, f = 30, 200, 6
    rng = np.random.default_rng(0)
    mu = rng.normal(size=d)
    x = mu + 0.1 * rng.normal(size=(c, d))
    direction = rng.normal(size=d)
    byz = rng.choice(c, f, replace=False)
    x[byz] = mu + 3.0 * direction / np.linalg.norm(direction)
    honest_mean = np.delete(x, byz, axis=0).mean(axis=0)
    cohort = S.CohortUpdates({"x": jnp.asarray(x, jnp.float32)}, jnp.ones((c,), jnp.float32),
                             jnp.ones((c,), bool))
    t = S.dnc(f, key=jax.random.key(1), subsample_dim=50, num_iters=5)
    out, st = jax.jit(t.update)(cohort, t.init({"x": jnp.zeros((d,))}))
    plain = x.mean(axis=0)
    dnc_err = np.linalg.norm(np.asarray(out["x"]) - honest_mean)
    mean_err = np.linalg.norm(plain - honest_mean)
    assert mean_err > 0.5  # the plain mean is dragged by f/n * 3 = 0.6
    assert dnc_err < 0.1 * mean_err, (dnc_err, mean_err)
    assert int(st.num_kept) == c - f  # exactly the honest clients survive


def test_jit_and_no_jit_agree_state_stable_no_retrace():
    t = S.dnc(2, key=KEY, subsample_dim=6, num_iters=3)
    traces = []

    def counted(cohort, state):
        traces.append(1)
        return t.update(cohort, state)

    update = jax.jit(counted)
    state0 = t.init(PARAMS)
    out1, state1 = update(make_cohort(0), state0)
    out2, state2 = update(make_cohort(5), state1)
    assert len(traces) == 1
    chex.assert_trees_all_equal_shapes_and_dtypes(state0, state1, state2)
    assert not np.array_equal(jax.random.key_data(state1.key), jax.random.key_data(state0.key))
    with jax.disable_jit():
        eager1, est1 = t.update(make_cohort(0), state0)
        eager2, est2 = t.update(make_cohort(5), est1)
    for (o, s), (eo, es) in (((out1, state1), (eager1, est1)), ((out2, state2), (eager2, est2))):
        np.testing.assert_allclose(flat(eo), flat(o), rtol=1e-5, atol=1e-6)
        assert int(es.num_kept) == int(s.num_kept)
        np.testing.assert_array_equal(jax.random.key_data(es.key), jax.random.key_data(s.key))


def test_stage_metadata_and_chain():
    t = S.dnc(3, key=KEY)
    assert t.name == "dnc" and t.kind is S.StageKind.REDUCE and t.min_cohort == 7
    assert not t.streaming
    chained = S.chain(S.clip_per_client(1.0), S.dnc(2, key=KEY, subsample_dim=6, num_iters=3))
    assert chained.why_stacked == "reducer 'dnc' is not a sum"
    out, _ = jax.jit(chained.update)(make_cohort(), chained.init(PARAMS))
    assert np.linalg.norm(flat(out)) <= 1.0 + 1e-5  # a mean of clipped uploads


@pytest.mark.parametrize("kwargs,field", [
    ({"num_byzantine": -1}, "num_byzantine"),
    ({"num_byzantine": 1.5}, "num_byzantine"),
    ({"num_byzantine": True}, "num_byzantine"),
    ({"subsample_dim": 0}, "subsample_dim"),
    ({"subsample_dim": 10.0}, "subsample_dim"),
    ({"num_iters": 0}, "num_iters"),
    ({"filter_frac": 0.0}, "filter_frac"),
    ({"filter_frac": -0.5}, "filter_frac"),
    ({"filter_frac": float("nan")}, "filter_frac"),
    ({"key": None}, "key"),
    ({"key": 3}, "key"),
])
def test_host_validation_names_the_field(kwargs, field):
    args = {"num_byzantine": 1, "key": KEY} | kwargs
    with pytest.raises(ConfigError, match=f"^{field}=") as info:
        S.dnc(args.pop("num_byzantine"), **args)
    assert "\n" not in str(info.value)
