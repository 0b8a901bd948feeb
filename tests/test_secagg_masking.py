"""Pairwise masking (SecAgg / SecAgg+): the graph is a random k-regular (or complete)
graph among the participants, masks cancel so the server recovers the survivors' modular
sum exactly whenever recovery is possible, a single upload is uniform, and the recovery
rule, dropouts and cost model agree with plain references."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fedjax_sim._validation import ConfigError
from fedjax_sim.secagg.masking import (Graph, check_recovery, client_mask, dropouts,
                                       mask_upload, neighbour_graph, pair_mask,
                                       protocol_bytes, self_mask, unmask)
from fedjax_sim.secagg.ring import ring_mask, ring_sum

graph_jit = jax.jit(neighbour_graph, static_argnums=2)
recovery_jit = jax.jit(check_recovery, static_argnums=3)
dropouts_jit = jax.jit(dropouts, static_argnames=("rate", "dropped_ids"))


def _random_encodings(seed, cap, p, bits):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(0, 2**bits, size=(cap, p), dtype=np.int64)
                       .astype(np.uint32))


def _python_graph_checks(nbrs, degree, participants, k):
    nbrs, degree, participants = np.asarray(nbrs), np.asarray(degree), np.asarray(participants)
    n = int(participants.sum())
    members = set(np.flatnonzero(participants).tolist())
    adj = {}
    for c in range(len(participants)):
        row = nbrs[c].tolist()
        listed = [v for v in row if v >= 0]
        assert row == listed + [-1] * (len(row) - len(listed))  # absent entries last
        assert degree[c] == len(listed)
        if c not in members:
            assert listed == []
            continue
        assert len(set(listed)) == len(listed), "duplicate neighbour"
        assert c not in listed, "self loop"
        assert set(listed) <= members, "non-participant listed"
        assert len(listed) == (k if n > k else n - 1)
        if k >= n - 1:
            assert set(listed) == members - {c}
        adj[c] = set(listed)
    for c, vs in adj.items():
        for v in vs:
            assert c in adj[v], "not symmetric"


@pytest.mark.parametrize("k", [2, 4, 6])
def test_graph_is_regular_symmetric_or_complete(k):
    cap = 16
    rng = np.random.default_rng(k)
    for n in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 15, 16]:
        for trial in range(2):
            participants = np.zeros(cap, bool)
            participants[rng.choice(cap, n, replace=False)] = True
            g = graph_jit(jax.random.key(100 * n + trial), jnp.asarray(participants), k)
            _python_graph_checks(g.neighbours, g.degree, participants, k)


def test_graph_is_random():
    """Over many keys, two given participants of n = 10 are joined with probability
    k / (n - 1) (every slot assignment is equally likely)."""
    k, n, draws = 4, 10, 1000
    participants = jnp.asarray(np.arange(16) < n)
    joined = np.mean([1 in np.asarray(graph_jit(jax.random.key(i), participants, k)
                                      .neighbours)[0] for i in range(draws)])
    want = k / (n - 1)
    assert abs(joined - want) < 4 * math.sqrt(want * (1 - want) / draws)


def _python_recovery(nbrs, participants, survivors, t):
    nbrs, participants = np.asarray(nbrs), np.asarray(participants)
    survivors = np.asarray(survivors) & participants
    counts = np.zeros(len(participants), np.int64)
    ok = int(survivors.sum()) >= t
    for c in range(len(participants)):
        if participants[c]:
            counts[c] = sum(1 for v in nbrs[c] if v >= 0 and survivors[v])
            ok = ok and counts[c] >= t
    return ok, counts


def _server(enc, key, ids, graph, participants, survivors, bits):
    """Masks every upload, sums the survivors' ones and unmasks: returns the unmasked sum
    and the plain modular sum of the survivors' encodings."""
    positions = jnp.arange(ids.shape[0], dtype=jnp.int32)
    uploads = jax.vmap(mask_upload, in_axes=(0, None, 0, None, None, None))(
        enc, key, positions, ids, graph, bits)
    keep = (survivors & participants)[:, None]
    masked_sum = ring_sum(jnp.where(keep, uploads, jnp.uint32(0)), bits)
    got = unmask(masked_sum, key, ids, graph, participants, survivors, bits)
    return got, ring_sum(jnp.where(keep, enc, jnp.uint32(0)), bits)


server_jit = jax.jit(_server, static_argnums=6)


@pytest.mark.parametrize("bits", [1, 8, 20, 32])
def test_unmask_is_exact_whenever_recovery_is_possible(bits):
    """Every survivor set of a 6-client cohort (k = 4, t = 2; padded to C = 16), then
    random dropouts in cohorts of about 13 participants: the unmasked sum is the plain
    modular sum of the survivors' encodings, bit for bit, whenever recovery is ok."""
    cap, k, t, p = 16, 4, 2, 8
    ids = np.full(cap, -1, np.int32)
    ids[[0, 2, 3, 7, 11, 15]] = [17, 3, 42, 8, 25, 11]
    ids, participants = jnp.asarray(ids), jnp.asarray(ids >= 0)
    key = jax.random.key(bits)
    graph = graph_jit(jax.random.key(bits + 1), participants, k)
    enc = _random_encodings(bits, cap, p, bits)
    members = np.flatnonzero(np.asarray(participants))
    oks = 0
    for alive in itertools.product([False, True], repeat=len(members)):
        survivors = np.zeros(cap, bool)
        survivors[members] = alive
        ok, _ = _python_recovery(graph.neighbours, participants, survivors, t)
        assert bool(recovery_jit(graph, participants, jnp.asarray(survivors), t).ok) == ok
        if ok:
            oks += 1
            got, want = server_jit(enc, key, ids, graph, participants,
                                   jnp.asarray(survivors), bits)
            np.testing.assert_array_equal(got, want)
            assert np.asarray(got).max() <= int(ring_mask(bits))
    assert 0 < oks < 2 ** len(members)

    checked = 0
    for trial in range(4):
        rng = np.random.default_rng(1000 * bits + trial)
        ids = rng.permutation(10_000)[:cap].astype(np.int32)
        ids[rng.random(cap) < 0.1] = -1
        part = (ids >= 0) & (rng.random(cap) < 0.9)
        ids, participants = jnp.asarray(ids), jnp.asarray(part)
        key = jax.random.key(trial)
        graph = graph_jit(jax.random.key(trial + 100), participants, k)
        dropped = np.asarray(dropouts_jit(jax.random.key(trial + 200), ids, participants,
                                          rate=0.1))
        survivors = jnp.asarray(part & ~dropped)
        enc = _random_encodings(trial, cap, p, bits)
        if recovery_jit(graph, participants, survivors, t).ok:
            checked += 1
            got, want = server_jit(enc, key, ids, graph, participants, survivors, bits)
            np.testing.assert_array_equal(got, want)
    assert checked >= 2


masks_jit = jax.jit(jax.vmap(client_mask, in_axes=(None, 0, None, None, None, None)),
                    static_argnums=(4, 5))


def test_masks_follow_ids_not_positions():
    """Reordering the cohort (with the same id graph) gives every client the same mask."""
    cap = 16
    rng = np.random.default_rng(3)
    ids = jnp.asarray(rng.permutation(100)[:cap], jnp.int32)
    participants = jnp.asarray(rng.random(cap) < 0.7)
    key = jax.random.key(11)
    graph = graph_jit(key, participants, 4)
    perm = rng.permutation(cap)
    inv = np.argsort(perm)
    nb = np.asarray(graph.neighbours)[perm]
    moved = Graph(jnp.asarray(np.where(nb >= 0, inv[np.maximum(nb, 0)], -1), jnp.int32),
                  graph.degree[perm])
    positions = jnp.arange(cap, dtype=jnp.int32)
    a = masks_jit(key, positions, ids, graph, 32, 16)
    b = masks_jit(key, positions, ids[perm], moved, 32, 16)
    np.testing.assert_array_equal(np.asarray(a)[perm], b)


def test_pair_masks_signs_and_ring():
    """A pair's mask is symmetric in the ids; the lower id adds it, the higher subtracts
    it; masks lie in Z_(2^b)."""
    bits, p, cap = 16, 32, 16
    ids = jnp.asarray(np.r_[12, 3, np.arange(2, cap) * 5], jnp.int32)
    key = jax.random.key(0)
    graph = graph_jit(key, jnp.asarray(np.arange(cap) < 2), 4)  # complete: one edge
    total = masks_jit(key, jnp.arange(cap, dtype=jnp.int32), ids, graph, p, bits)

    @jax.jit
    def parts(key, a, b):
        return (pair_mask(key, a, b, p, bits), pair_mask(key, b, a, p, bits),
                self_mask(key, a, p, bits), self_mask(key, b, p, bits))

    ab, ba, own_a, own_b = parts(key, ids[0], ids[1])
    np.testing.assert_array_equal(ab, ba)
    modulus = np.int64(2**bits)
    total, ab, own_a, own_b = (np.asarray(x).astype(np.int64)
                               for x in (total, ab, own_a, own_b))
    np.testing.assert_array_equal(total[1], (own_b + ab) % modulus)  # id 3 adds
    np.testing.assert_array_equal(total[0], (own_a - ab) % modulus)  # id 12 subtracts
    assert max(own_a.max(), total.max(), ab.max()) < modulus
    assert not np.array_equal(own_a, ab) and not np.array_equal(own_a, own_b)


@pytest.mark.parametrize("bits", [4, 8])
def test_single_upload_is_uniform(bits):
    """Chi-square: one coordinate of client 0's upload over many round keys, and all
    coordinates of one upload, are uniform over Z_(2^b) whatever the encoding."""
    ids = jnp.asarray(np.arange(16) * 3 + 1, jnp.int32)
    graph = graph_jit(jax.random.key(0), jnp.asarray(np.arange(16) < 5), 2)
    cells = 2**bits
    n = 8 * cells  # draws, and coordinates per upload: 8 expected per cell
    enc = jnp.asarray(np.arange(n) % 3, jnp.uint32)
    uploads = jax.jit(jax.vmap(lambda key: mask_upload(enc, key, jnp.int32(0), ids, graph,
                                                       bits)))
    values = np.asarray(uploads(jax.random.split(jax.random.key(bits), n)))
    for sample in (values[:, 0], values[0]):
        assert stats.chisquare(np.bincount(sample, minlength=cells)).pvalue > 1e-4


def test_check_recovery_matches_python_loop():
    cap, k = 16, 4
    rng = np.random.default_rng(5)
    outcomes = set()
    for trial in range(30):
        participants = rng.random(cap) < rng.choice([0.0, 0.3, 0.8, 1.0])
        survivors = rng.random(cap) < rng.random()
        t = int(rng.integers(1, k + 1))
        g = graph_jit(jax.random.key(trial), jnp.asarray(participants), k)
        rec = recovery_jit(g, jnp.asarray(participants), jnp.asarray(survivors), t)
        ok, counts = _python_recovery(g.neighbours, participants, survivors, t)
        assert bool(rec.ok) == ok
        np.testing.assert_array_equal(rec.surviving_neighbours, counts)
        outcomes.add(ok)
    assert outcomes == {True, False}
    none = jnp.zeros((cap,), jnp.bool_)
    assert not bool(recovery_jit(graph_jit(jax.random.key(0), none, k), none, none, 1).ok)


def test_dropouts():
    cap = 4000
    ids_np = np.arange(cap, dtype=np.int32)
    ids_np[::10] = -1
    part = (ids_np >= 0) & (np.arange(cap) % 7 != 3)
    ids, participants = jnp.asarray(ids_np), jnp.asarray(part)
    key = jax.random.key(0)
    draw = dropouts_jit
    assert not np.asarray(draw(key, ids, participants)).any()
    rate = 0.3
    d = np.asarray(draw(key, ids, participants, rate=rate))
    assert not d[~part].any()
    frac, m = d[part].mean(), part.sum()
    assert abs(frac - rate) < 4 * math.sqrt(rate * (1 - rate) / m)
    perm = np.random.default_rng(0).permutation(cap)
    d_perm = np.asarray(draw(key, jnp.asarray(ids_np[perm]), jnp.asarray(part[perm]),
                             rate=rate))
    np.testing.assert_array_equal(d_perm, d[perm])  # keyed by id, not position
    listed = draw(key, ids, participants, dropped_ids=(0, 1, 2, 3, 10, 4001))
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(listed)), [1, 2])
    both = np.asarray(draw(key, ids, participants, rate=rate, dropped_ids=(5,)))
    np.testing.assert_array_equal(both, d | (ids_np == 5))


def test_cost_model():
    p, bits = 1024, 20
    costs = [protocol_bytes(k, p, bits) for k in (2, 4, 6, 8)]
    for field in ("upload_bytes", "download_bytes"):
        steps = np.diff([getattr(c, field) for c in costs])
        assert steps[0] > 0 and np.all(steps == steps[0])
    for p, bits in [(1, 1), (8, 1), (1024, 20), (4, 3), (2**20, 32)]:
        c = protocol_bytes(4, p, bits)
        assert c.masked_input_bytes == math.ceil(p * bits / 8)
        assert c.overhead_upload_bytes == protocol_bytes(4, 16, bits).overhead_upload_bytes
        assert c.upload_bytes > c.masked_input_bytes


def test_bad_inputs():
    part = jnp.ones((5,), jnp.bool_)
    ids = jnp.arange(5, dtype=jnp.int32)
    key = jax.random.key(0)
    for k in (3, 0, 1, 2.0):
        with pytest.raises(ConfigError, match=r"^k="):
            neighbour_graph(key, part, k)
        with pytest.raises(ConfigError, match=r"^k="):
            protocol_bytes(k, 16, 8)
    g = Graph(jnp.full((5, 2), -1, jnp.int32), jnp.zeros((5,), jnp.int32))
    for t in (0, 3):
        with pytest.raises(ConfigError, match=r"^threshold="):
            check_recovery(g, part, part, t)
    for rate in (-0.1, 1.0, 1.5):
        with pytest.raises(ConfigError, match=r"^rate="):
            dropouts(key, ids, part, rate=rate)
    for bits in (0, 33):
        with pytest.raises(ConfigError, match=r"^bits="):
            protocol_bytes(2, 16, bits)
        with pytest.raises(ConfigError, match=r"^bits="):
            mask_upload(jnp.zeros((4,), jnp.uint32), key, jnp.int32(0), ids, g, bits)
        with pytest.raises(ConfigError, match=r"^bits="):
            unmask(jnp.zeros((4,), jnp.uint32), key, ids, g, part, part, bits)
    with pytest.raises(ConfigError, match=r"^dropped_ids="):
        dropouts(key, ids, part, dropped_ids=[-2])
    with pytest.raises(TypeError, match="bool"):
        neighbour_graph(key, ids, 2)
    for call, msg in [(lambda: neighbour_graph(key, part, 3), "k=3: must be even"),
                      (lambda: check_recovery(g, part, part, 3), "threshold=3: must be <= 2")]:
        with pytest.raises(ConfigError) as err:
            call()
        assert str(err.value).startswith(msg) and "\n" not in str(err.value)
