"""The secure-sum reducer inside the round: numerics, masking, dropout, abort, views, bytes."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_sim as fs
from fedjax_sim import server as S
from fedjax_sim._validation import ConfigError
from fedjax_sim.algorithms.scaffold import scaffold
from fedjax_sim.comms import packed_bytes
from fedjax_sim.secagg import masking
from fedjax_sim.secagg.secure_sum import SecureAggregation, secure_sum

from conftest import random_federated

DATA = random_federated(num_clients=24, max_examples=8, min_count=1, seed=3)
MODEL = fs.make_model("softmax", (5,), 3)
DIM = 5 * 3 + 3


def _settings(**kw):
    base = dict(bits=24, clip_norm=0.5, dim=DIM, capacity=10, expected_clients=10.0,
                mean=True)
    base.update(kw)
    return SecureAggregation(**base)


def _round(aggregator, *, cohort=10, server_view=False, algorithm="fedavg", chunk_size=None,
           **kw):
    """One chunk by default (the client program traced once: quicker to compile); the
    full-masking test runs chunks of 4 and a remainder."""
    make = scaffold if algorithm == "scaffold" else functools.partial(fs.make_algorithm,
                                                                        algorithm)
    alg = make(MODEL, client_lr=0.5, local_epochs=1, batch_size=4, aggregator=aggregator,
               **kw)
    return fs.make_round(alg, fs.FixedSizeSampler(24, cohort), chunk_size=chunk_size or cohort,
                         server_view=server_view)


def _step(fr, state=None, key=1):
    state = fr.init(jax.random.key(0)) if state is None else state
    return state, *fr.step(state, DATA, jax.random.key(key))


@functools.lru_cache(maxsize=None)
def _secure_round():
    """One compiled secure round (24-bit ring, complete graph) with its server view."""
    return _round(secure_sum(_settings(), key=jax.random.key(3)), server_view=True)


def test_secure_mean_is_the_clipped_unweighted_mean_up_to_rounding():
    """Same clients, same keys: the secure mean differs from the plain clipped mean only
    by the rounding, whose error the stage reports (and which 24 bits make tiny)."""
    plain = _round(S.chain(S.clip_per_client(0.5), S.unweighted_mean()))
    state, new_plain, _ = _step(plain)
    _, new_secure, out = _step(_secure_round())
    diff = np.sqrt(sum(np.sum((np.asarray(a) - np.asarray(b)) ** 2) for a, b in zip(
        jax.tree.leaves(new_plain.params), jax.tree.leaves(new_secure.params))))
    # The mean's error is the sum's rounding error over the survivors (server_lr 1).
    assert diff <= float(out.metrics["secagg_rounding_error"]) / 10 + 1e-5
    assert 0 < float(out.metrics["secagg_rounding_error"]) < 1e-3
    assert int(out.metrics["secagg_wrapped"]) == 0
    assert int(out.metrics["num_aggregated"]) == 10 and not bool(out.metrics["aborted"])


def test_full_masking_gives_the_same_sum_as_the_shortcut_bit_for_bit():
    for kw in (dict(neighbours=4, threshold=2, dropout=0.3),):  # a graph, and dropouts
        # The modular sum is exact, so chunking cannot change it: the full masks are
        # generated chunk by chunk (4, 4, then a remainder of 2), the shortcut in one.
        short = _round(secure_sum(_settings(**kw), key=jax.random.key(3)))
        full = _round(secure_sum(_settings(full_masking=True, **kw), key=jax.random.key(3)),
                      chunk_size=4)
        _, a, out_a = _step(short)
        _, b, out_b = _step(full)
        for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert int(out_a.metrics["secagg_dropped"]) == int(out_b.metrics["secagg_dropped"])


def test_dropped_clients_are_left_out_of_the_sum():
    """Dropping a given set equals a round whose cohort sum skips them exactly."""
    fr = _round(secure_sum(_settings(mean=False), key=jax.random.key(3)),
                server_view=True)
    state, _, out = _step(fr)
    ids = [int(i) for i in np.asarray(out.client_ids) if i >= 0]
    dropped = tuple(ids[:3])
    fr_d = _round(secure_sum(_settings(mean=False, dropped_ids=dropped),
                             key=jax.random.key(3)), server_view=True)
    _, _, out_d = _step(fr_d)
    assert int(out_d.metrics["secagg_dropped"]) == 3
    assert int(out_d.server_view.count) == 7 and int(out.server_view.count) == 10
    assert int(out_d.metrics["num_aggregated"]) == int(out_d.metrics["secagg_survivors"]) == 7
    # The same clients train with the same keys; the per-client encodings are keyed by
    # id, so the full sum minus the survivors' sum is the dropped clients' part, whose
    # norm is at most 3 clip norms (plus rounding).
    gap = np.sqrt(sum(np.sum((np.asarray(a) - np.asarray(b)) ** 2) for a, b in zip(
        jax.tree.leaves(out.server_view.total), jax.tree.leaves(out_d.server_view.total))))
    assert 0 < gap <= 3 * 0.5 + 1e-3


def test_an_aborted_round_changes_nothing():
    """Threshold 4 of 4 neighbours with half the cohort dropping: some client always
    lacks surviving neighbours, the protocol aborts, params/server/client states stay."""
    for algorithm, dim, kw in (("fedavgm", DIM, dict(server_momentum=0.9, server_lr=1.0)),
                               ("scaffold", 2 * DIM, dict())):  # SCAFFOLD sends delta, dc
        agg = secure_sum(_settings(neighbours=4, threshold=4, dropout=0.5, dim=dim),
                         key=jax.random.key(3))
        fr = _round(agg, algorithm=algorithm, **kw)
        state = fr.init(jax.random.key(0))
        new, out = fr.step(state, DATA, jax.random.key(1))
        assert bool(out.metrics["aborted"])
        assert int(out.metrics["num_aggregated"]) == 0
        for a, b in zip(jax.tree.leaves((state.params, state.server, state.client_states)),
                        jax.tree.leaves((new.params, new.server, new.client_states))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert int(new.round) == 1  # the round happened; its key schedule moved on


def test_the_abort_rule_matches_a_plain_loop():
    """check_recovery aborts exactly when a participant has < t surviving neighbours."""
    rng = np.random.default_rng(0)
    for trial in range(20):
        cap, k, t = 12, 4, int(rng.integers(1, 5))
        sampled = jnp.asarray(rng.random(cap) < 0.9)
        graph = masking.neighbour_graph(jax.random.key(trial), sampled, k)
        survivors = sampled & jnp.asarray(rng.random(cap) < 0.7)
        rec = masking.check_recovery(graph, sampled, survivors, t)
        nb = np.asarray(graph.neighbours)
        ok = int(np.sum(np.asarray(survivors))) >= t
        for i in range(cap):
            if bool(sampled[i]):
                alive = sum(1 for j in nb[i] if j >= 0 and bool(survivors[j]))
                ok &= alive >= t
        assert bool(rec.ok) == ok


def test_the_server_view_hides_uploads_behind_secure_aggregation():
    secure = _secure_round()
    plain = _round(S.weighted_mean(), server_view=True)
    assert secure.hides_clients and secure.streaming
    assert not plain.hides_clients and not plain.streaming  # it keeps every upload
    _, state_s, out_s = _step(secure)
    _, _, out_p = _step(plain)
    # Asking for the server's view changes no model: the same round without it.
    _, state_u, out_u = _step(_round(secure_sum(_settings(), key=jax.random.key(3))))
    assert out_u.server_view is None
    for x, y in zip(jax.tree.leaves((state_s.params, state_s.aggregator)),
                    jax.tree.leaves((state_u.params, state_u.aggregator))):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert out_s.server_view.uploads is None
    assert int(out_s.server_view.count) == 10
    uploads = out_p.server_view.uploads
    assert jax.tree.leaves(uploads.updates)[0].shape[0] == 10
    np.testing.assert_array_equal(np.asarray(uploads.client_ids), np.asarray(out_p.client_ids))


def test_the_chain_rejects_server_side_per_client_stages_with_a_secure_sum():
    sec = secure_sum(_settings(), key=jax.random.key(3))
    with pytest.raises(ConfigError, match=r"server_chain=.*'zero_above_norm' reads each "
                       r"client's upload on the server, but 'secure_sum'"):
        S.chain(S.zero_above_norm(1.0), sec)
    cohort = S.Stage("peek", S.StageKind.COHORT, apply=lambda c, s: (c, s))
    with pytest.raises(ConfigError, match=r"'peek' reads each client's upload"):
        S.chain(cohort, sec)
    S.chain(S.clip_per_client(0.5), sec, S.dp_mean_normalize(10.0))  # client-side: fine


def test_secure_settings_refuse_impossible_combinations_in_one_line():
    for kw, pattern in ((dict(bits=33), r"bits=33"), (dict(neighbours=3), r"neighbours=3: "
                        r"must be even"), (dict(neighbours=10), r"neighbours=10: must be "
                        r"below the expected cohort"), (dict(neighbours=4, threshold=5),
                        r"threshold=5: exceeds the 4 neighbours"),
                        (dict(noise="ddg"), r"noise_multiplier=0.0: mechanism='ddg' needs"),
                        (dict(dropout=1.0), r"dropout=1.0"), (dict(bits=4), r"bits=4: is "
                        r"too few for a cohort of 10")):
        with pytest.raises(ConfigError, match=pattern) as e:
            _settings(**kw).scale  # noqa: B018 (the scale check runs when asked)
        assert "\n" not in str(e.value)


def test_the_communication_ledger_counts_what_is_sent():
    params = 4 * DIM  # float32 broadcast and upload
    cases = [(S.weighted_mean(), params),
             (S.chain(S.stochastic_quantize(4, key=jax.random.key(1)), S.weighted_mean()),
              packed_bytes(DIM, 4) + 8 * 2),
             (S.chain(S.top_k_sparsify(5), S.weighted_mean()), 8 * 5)]
    for agg, payload in cases:
        fr = _round(agg)
        assert fr.comms.download == params and fr.comms.wire.payload == payload
        assert fr.comms.round_bytes(10, 10) == (10 * payload, 10 * params)
    sec = _settings(neighbours=4)
    fr = _round(secure_sum(sec, key=jax.random.key(3)))
    cost = masking.protocol_bytes(4, 32, 24)
    assert fr.comms.wire.payload == packed_bytes(32, 24) == cost.masked_input_bytes
    assert fr.comms.wire.protocol_up == cost.upload_bytes - cost.masked_input_bytes
    up, down = fr.comms.round_bytes(10, 7)  # three dropped before sending
    assert up == 10 * fr.comms.wire.protocol_up + 7 * fr.comms.wire.payload
    assert down == 10 * (params + cost.download_bytes)


@pytest.mark.parametrize("bits", [8, 32])
def test_ring_width_from_8_to_32_bits_decodes_the_sum(bits):
    """The whole stage on a hand-made cohort, against NumPy: the decoded sum is the sum of
    the clipped uploads within the rounding bound sqrt(p) n / gamma."""
    n, d = 6, 10
    cfg = SecureAggregation(bits=bits, clip_norm=1.0, dim=d, capacity=n,
                            expected_clients=float(n))
    stage = S.chain(secure_sum(cfg, key=jax.random.key(0)))
    x = np.random.default_rng(1).normal(size=(n, d)).astype(np.float32)
    cohort = S.CohortUpdates({"w": jnp.asarray(x)}, jnp.ones((n,), jnp.float32),
                             jnp.ones((n,), bool), jnp.arange(n, dtype=jnp.int32))
    state = stage.init({"w": jnp.zeros((d,), jnp.float32)})
    roster = stage.setup(cohort.client_ids, cohort.mask, state)
    agg, _, counts = jax.jit(lambda c, s, r: stage.reduce(c, s, r))(cohort, state, roster)
    clipped = x / np.maximum(1.0, np.linalg.norm(x, axis=1, keepdims=True))
    err = np.linalg.norm(np.asarray(agg["w"]) - clipped.sum(0))
    assert err <= math.sqrt(16) * n / cfg.scale + 1e-5 * n
    assert int(counts.aggregated) == n


def test_config_rejects_every_impossible_combination_in_one_line():
    base = dict(secure_aggregation=True, clip_norm=1.0)
    cases = [
        (dict(bits=12), r"bits=12: only applies with secure_aggregation=true"),
        (dict(mechanism="ddg"), r"mechanism='ddg': only applies with secure_aggregation"),
        (dict(base, aggregator="krum", num_byzantine=1), r"aggregator='krum': is not a sum"),
        (dict(base, attack="ipm", num_malicious=3), r"attack='ipm': an omniscient attack"),
        (dict(base, norm_bound=2.0), r"norm_bound=2.0: a norm filter"),
        (dict(base, quantize_bits=4), r"quantize_bits=4: secure aggregation encodes"),
        (dict(base, neighbours=6, threshold=7), r"threshold=7: exceeds the 6 neighbours"),
        (dict(base, neighbours=1000), r"neighbours=1000: must be below"),
        (dict(base, bits=10), r"bits=10: is too few for a cohort of 1000"),
        (dict(base, mechanism="ddg"), r"mechanism='ddg': distributed DP replaces"),
        (dict(secure_aggregation=True), r"clip_norm=None: secure aggregation needs"),
    ]
    for overrides, pattern in cases:
        with pytest.raises(ConfigError, match=pattern) as e:
            fs.make_config(overrides)
        assert "\n" not in str(e.value)


def test_settings_are_frozen_and_hashable():
    s = _settings()
    assert dataclasses.replace(s, bits=20).bits == 20 and hash(s) == hash(_settings())
