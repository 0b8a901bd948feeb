"""Reducers against plain NumPy references; chain against hand-written composition."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from fedjax_sim import _trees
from fedjax_sim import server as S
from fedjax_sim._validation import ConfigError
from fedjax_sim.server import pairwise as krum_lib

C = 13
MASKED = (2, 9)
PARAMS = {"w": jnp.zeros((4, 3), jnp.float32), "b": jnp.zeros((5,), jnp.float32)}


def make_cohort(seed=0, c=C, masked=MASKED):
    rng = np.random.default_rng(seed)
    updates = {"w": rng.normal(size=(c, 4, 3)) * rng.uniform(0.3, 2.0, size=(c, 1, 1)),
               "b": rng.normal(size=(c, 5)) + 0.5}
    mask = np.ones(c, bool)
    mask[list(masked)] = False
    return S.CohortUpdates(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), updates),
                           jnp.asarray(rng.uniform(0.5, 3.0, size=c), jnp.float32),
                           jnp.asarray(mask))


def flat(tree):
    """A params-shaped tree flattened to one float64 vector (leaf order as in valid_matrix)."""
    return np.concatenate([np.asarray(x, np.float64).reshape(-1) for x in jax.tree.leaves(tree)])


def valid_matrix(cohort):
    """``[n, D]`` float64 matrix of the unmasked clients, and their weights."""
    mask = np.asarray(cohort.mask)
    x = np.concatenate([np.asarray(u, np.float64).reshape(u.shape[0], -1)
                        for u in jax.tree.leaves(cohort.updates)], axis=1)
    return x[mask], np.asarray(cohort.weights, np.float64)[mask]


# ----- plain NumPy references (a loop or a closed form, written for clarity) -----

def np_krum_scores(x, f):
    n = len(x)
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    k = max(n - f - 2, 0)
    return np.array([np.sort(np.delete(d[i], i))[:k].sum() for i in range(n)])


def np_krum(x, w, f):
    del w
    return x[np.argmin(np_krum_scores(x, f))]


def np_multi_krum(x, w, f, m):
    del w
    return x[np.argsort(np_krum_scores(x, f), kind="stable")[:m]].mean(0)


def np_bulyan(x, w, f, iterative):
    del w
    n = len(x)
    theta = n - 2 * f
    if iterative:
        remaining, selected = list(range(n)), []
        for _ in range(theta):
            j = remaining[int(np.argmin(np_krum_scores(x[remaining], f)))]
            selected.append(j)
            remaining.remove(j)
    else:
        selected = np.argsort(np_krum_scores(x, f), kind="stable")[:theta]
    s = x[np.sort(selected)]
    beta = theta - 2 * f
    med = np.median(s, axis=0)
    closest = np.argsort(np.abs(s - med), axis=0, kind="stable")[:beta]
    return np.take_along_axis(s, closest, axis=0).mean(0)


def np_geometric_median(x, w, iters, eps):
    a = w / w.sum()
    v = a @ x
    for _ in range(iters):
        b = a / np.maximum(eps, np.linalg.norm(x - v, axis=1))
        v = (b / b.sum()) @ x
    return v


def np_centered_clipping(x, v, tau, iters):
    for _ in range(iters):
        diff = x - v
        scale = np.minimum(1.0, tau / np.linalg.norm(diff, axis=1))
        v = v + (scale[:, None] * diff).mean(0)
    return v


REFERENCES = {
    "weighted_mean": (S.weighted_mean, lambda x, w: (w @ x) / w.sum()),
    "unweighted_mean": (S.unweighted_mean, lambda x, w: x.mean(0)),
    "sum_updates": (S.sum_updates, lambda x, w: x.sum(0)),
    "sum_updates_weighted": (lambda: S.sum_updates(weighted=True), lambda x, w: w @ x),
    "coordinate_median": (S.coordinate_median, lambda x, w: np.median(x, axis=0)),
    "trimmed_mean_0.2": (lambda: S.trimmed_mean(0.2),
                         lambda x, w: scipy.stats.trim_mean(x, 0.2, axis=0)),
    "trimmed_mean_0": (lambda: S.trimmed_mean(0.0), lambda x, w: x.mean(0)),
    "trimmed_mean_0.45": (lambda: S.trimmed_mean(0.45),
                          lambda x, w: scipy.stats.trim_mean(x, 0.45, axis=0)),
    "krum": (lambda: S.krum(2, block_size=5), lambda x, w: np_krum(x, w, 2)),
    "multi_krum": (lambda: S.multi_krum(2, 4, block_size=5),
                   lambda x, w: np_multi_krum(x, w, 2, 4)),
    "bulyan_iterative": (lambda: S.bulyan(2, selection="iterative"),
                         lambda x, w: np_bulyan(x, w, 2, True)),
    "bulyan_one_shot": (lambda: S.bulyan(2, block_size=4),
                        lambda x, w: np_bulyan(x, w, 2, False)),
    "geometric_median": (lambda: S.geometric_median(40, 1e-8),
                         lambda x, w: np_geometric_median(x, w, 40, 1e-8)),
    "centered_clipping": (lambda: S.centered_clipping(1.5, 3),
                          lambda x, w: np_centered_clipping(x, np.zeros(x.shape[1]), 1.5, 3)),
}


@functools.cache
def transform(name):
    """One transform object and one jitted update per reducer (compiled once per shape)."""
    t = REFERENCES[name][0]()
    return t, jax.jit(t.update)


@pytest.mark.parametrize("name", list(REFERENCES))
def test_matches_numpy_reference(name):
    t, update = transform(name)
    for seed in (0, 1):
        cohort = make_cohort(seed)
        out, _ = update(cohort, t.init(PARAMS))
        x, w = valid_matrix(cohort)
        np.testing.assert_allclose(flat(out), REFERENCES[name][1](x, w), rtol=1e-4,
                                   atol=1e-5, err_msg=f"{name} seed={seed}")


def test_centered_clipping_starts_from_last_aggregate():
    t, update = transform("centered_clipping")
    state = t.init(PARAMS)
    v = np.zeros(sum(p.size for p in jax.tree.leaves(PARAMS)))
    for seed in (3, 4, 5):
        cohort = make_cohort(seed)
        out, state = update(cohort, state)
        v = np_centered_clipping(valid_matrix(cohort)[0], v, 1.5, 3)
        np.testing.assert_allclose(flat(out), v, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(flat(state), v, rtol=1e-4, atol=1e-5)


def test_krum_scores_do_not_depend_on_block_size():
    cohort = S.zero_masked(make_cohort())
    x, _ = valid_matrix(cohort)
    expected = np_krum_scores(x, 2)
    for block in (1, 4, 5, C, 100):
        scores = np.asarray(jax.jit(krum_lib.krum_scores, static_argnums=(1, 2))(cohort, 2, block))
        assert np.all(np.isinf(scores[list(MASKED)]))
        np.testing.assert_allclose(scores[np.asarray(cohort.mask)], expected, rtol=1e-4)


def test_blocked_krum_on_a_larger_cohort():
    # Uneven last block (1000 % 96 != 0) and masked clients; NumPy reference via the
    # same distance expansion in float64.
    c, d, f = 1000, 24, 10
    rng = np.random.default_rng(7)
    x = rng.normal(size=(c, d)).astype(np.float32)
    mask = rng.uniform(size=c) > 0.1
    cohort = S.CohortUpdates({"x": jnp.asarray(x)}, jnp.ones((c,), jnp.float32),
                             jnp.asarray(mask))
    out, _ = jax.jit(S.multi_krum(f, 5, block_size=96).update)(cohort, ())
    xv = x[mask].astype(np.float64)
    sq = (xv ** 2).sum(1)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2 * xv @ xv.T, 0)
    np.fill_diagonal(dist, np.inf)
    k = len(xv) - f - 2
    scores = np.sort(dist, axis=1)[:, :k].sum(1)
    expected = xv[np.argsort(scores, kind="stable")[:5]].mean(0)
    np.testing.assert_allclose(np.asarray(out["x"]), expected, rtol=1e-4, atol=1e-5)


def test_robust_reducers_resist_byzantine_clients():
    # 9 honest clients near +1, 2 Byzantine clients at -100 (n = 11 >= 4f+3 for f = 2).
    rng = np.random.default_rng(0)
    base = make_cohort()
    upd = jax.tree.map(lambda u: 1.0 + 0.05 * rng.normal(size=u.shape).astype(np.float32),
                       base.updates)
    byz = np.flatnonzero(np.asarray(base.mask))[:2]
    upd = jax.tree.map(lambda u: jnp.asarray(u).at[byz].set(-100.0), upd)
    cohort = base._replace(updates=upd)
    for name in ("coordinate_median", "trimmed_mean_0.2", "krum", "multi_krum",
                 "bulyan_iterative", "bulyan_one_shot", "geometric_median"):
        t, update = transform(name)
        out, _ = update(cohort, t.init(PARAMS))
        assert np.all(np.abs(flat(out) - 1.0) < 0.3), name
    t, update = transform("unweighted_mean")
    assert np.all(flat(update(cohort, ())[0]) < -10)  # the plain mean is dragged away


def test_chain_matches_hand_composition():
    key = jax.random.key(3)
    parts = [S.clip_per_client(1.0), S.stochastic_quantize(3, key=key), S.trimmed_mean(0.1),
             S.gaussian_noise(0.5, 1.0, key=jax.random.key(4)), S.dp_mean_normalize(11.0)]
    chained = S.chain(*parts)

    def by_hand(value, states):
        new_states = []
        for part, st in zip(parts, states):
            value, st = part.update(value, st)
            new_states.append(st)
        return value, tuple(new_states)

    state = chained.init(PARAMS)
    hand_state = tuple(p.init(PARAMS) for p in parts)
    for seed in (0, 1):
        out, state = jax.jit(chained.update)(make_cohort(seed), state)
        hand, hand_state = jax.jit(by_hand)(make_cohort(seed), hand_state)
        np.testing.assert_allclose(flat(out), flat(hand), rtol=1e-6, atol=1e-6)
    assert chained.names == ("clip_per_client", "stochastic_quantize", "trimmed_mean",
                             "gaussian_noise", "dp_mean_normalize")
    assert [s.kind for s in chained.stages] == [
        S.StageKind.CLIENT, S.StageKind.CLIENT, S.StageKind.REDUCE, S.StageKind.AGGREGATE,
        S.StageKind.AGGREGATE]


@pytest.mark.parametrize("build,field", [
    (lambda: S.trimmed_mean(0.5), "trim_fraction"),
    (lambda: S.trimmed_mean(-0.1), "trim_fraction"),
    (lambda: S.krum(-1), "num_byzantine"),
    (lambda: S.multi_krum(1, 0), "num_selected"),
    (lambda: S.bulyan(1, selection="exact"), "selection"),
    (lambda: S.geometric_median(3, 0.0), "eps"),
    (lambda: S.centered_clipping(0.0), "tau"),
    (lambda: S.clip_per_client(0.0), "clip_norm"),
    (lambda: S.zero_above_norm(float("inf")), "max_norm"),
    (lambda: S.stochastic_quantize(0, key=jax.random.key(0)), "bits"),
    (lambda: S.top_k_sparsify(), "k"),
    (lambda: S.top_k_sparsify(fraction=1.5), "fraction"),
    (lambda: S.gaussian_noise(-1.0, 1.0, key=jax.random.key(0)), "noise_multiplier"),
    (lambda: S.adaptive_clip(1.0, 1.5, 0.2, 1.0, key=jax.random.key(0)), "target_quantile"),
])
def test_host_validation_names_the_field(build, field):
    with pytest.raises(ConfigError, match=f"^{field}="):
        build()


@pytest.mark.parametrize("build,needed", [
    (lambda: S.bulyan(3), 15),       # 4f + 3
    (lambda: S.krum(6), 15),         # 2f + 3
    (lambda: S.multi_krum(6, 2), 15),
])
def test_cohort_too_small_is_caught_at_trace_time(build, needed):
    t = build()
    with pytest.raises(ConfigError, match=f"^num_byzantine=.*= {needed}, got cohort size {C}"):
        jax.jit(t.update)(make_cohort(), ())
    with pytest.raises(ConfigError, match="num_selected"):
        jax.jit(S.multi_krum(1, C + 1).update)(make_cohort(), ())


# ----- fedjax_sim._trees: norms and finiteness (the one home of both) -----

def _np_norms(updates):
    """float64 NumPy L2 norm of each client's whole upload (all leaves together)."""
    return np.sqrt(sum((np.asarray(u, np.float64).reshape(u.shape[0], -1) ** 2).sum(1)
                       for u in jax.tree.leaves(updates)))


@pytest.mark.parametrize("scale", [1e-20, 1.0, 1e10, 1e25, 1e30])
def test_norms_agree_with_numpy_float64_and_never_overflow(scale):
    rng = np.random.default_rng(int(np.log10(scale)) + 40)
    updates = {"w": (rng.normal(size=(7, 4, 3)) * scale).astype(np.float32),
               "b": (rng.normal(size=(7, 5)) * scale).astype(np.float32)}
    updates["w"][2] = 0.0  # a client whose first leaf is zero
    updates = jax.tree.map(jnp.asarray, updates)
    want = _np_norms(updates)
    assert np.all(np.isfinite(want))
    per_client = np.asarray(jax.jit(_trees.per_client_l2_norms)(updates), np.float64)
    assert np.all(np.isfinite(per_client))
    np.testing.assert_allclose(per_client, want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(S.per_client_l2_norms(updates)), per_client)
    # l2_norm of one client's tree and of the whole stacked tree.
    for c in range(7):
        one = jax.tree.map(lambda u: u[c], updates)
        norm = float(jax.jit(_trees.l2_norm)(one))
        assert np.isfinite(norm)
        assert norm == pytest.approx(want[c], rel=1e-5)
    total = float(_trees.l2_norm(updates))
    assert np.isfinite(total) and total == pytest.approx(np.sqrt((want ** 2).sum()), rel=1e-5)


def test_norms_around_1e25_are_finite_where_squaring_overflows():
    x = jnp.full((3, 1000), 1e25, jnp.float32)
    assert not np.isfinite(float(jnp.sum(jnp.square(x[0]))))  # the naive sum overflows
    norms = np.asarray(_trees.per_client_l2_norms({"x": x}))
    assert np.all(np.isfinite(norms))
    np.testing.assert_allclose(norms, 1e25 * np.sqrt(1000), rtol=1e-5)
    assert float(_trees.l2_norm({"x": x})) == pytest.approx(1e25 * np.sqrt(3000), rel=1e-5)
    # Clipping such a client lands on the bound (no inf / NaN from the norm).
    out, _ = S.clip_per_client(1.0).update(
        S.CohortUpdates({"x": x}, jnp.ones(3), jnp.ones(3, bool)), ())
    np.testing.assert_allclose(np.asarray(S.per_client_l2_norms(out.updates)), 1.0, rtol=1e-5)


def test_norms_of_zero_vectors_are_zero():
    zeros = {"w": jnp.zeros((4, 3, 2)), "b": jnp.zeros((4, 5))}
    np.testing.assert_array_equal(np.asarray(_trees.per_client_l2_norms(zeros)), 0.0)
    assert float(_trees.l2_norm(zeros)) == 0.0
    assert float(_trees.l2_norm({"w": jnp.zeros((3,))})) == 0.0
    assert float(_trees.l2_norm({})) == 0.0  # the empty tree
    # One zero client among nonzero ones: 0 for it, the others unaffected.
    mixed = {"w": jnp.asarray([[0.0, 0.0], [3.0, 4.0]]), "b": jnp.asarray([[0.0], [12.0]])}
    np.testing.assert_allclose(np.asarray(_trees.per_client_l2_norms(mixed)), [0.0, 13.0],
                               rtol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_all_finite_flags_nan_and_inf(bad):
    tree = {"w": jnp.ones((3, 2)), "b": jnp.zeros((4,))}
    assert bool(_trees.all_finite(tree))
    assert bool(_trees.all_finite({}))  # the empty tree is finite
    for leaf in ("w", "b"):
        broken = dict(tree)
        broken[leaf] = tree[leaf].reshape(-1).at[1].set(bad).reshape(tree[leaf].shape)
        assert not bool(jax.jit(_trees.all_finite)(broken))
    # Huge but finite values are finite.
    assert bool(_trees.all_finite({"x": jnp.full((2,), 3e38, jnp.float32)}))
