"""What the round reports as aggregated is what the server chain really aggregated."""

import jax
import numpy as np
import optax

import fedjax_sim as fs
from fedjax_sim import server as S

from conftest import random_federated


def test_num_aggregated_counts_after_a_norm_filter_drops_clients():
    data = random_federated(num_clients=20, max_examples=8, min_count=1, seed=3)
    model = fs.make_model("softmax", (5,), 3)
    bound = 1.2
    for aggregator in (S.chain(S.zero_above_norm(bound), S.weighted_mean()),  # streams
                       S.chain(S.zero_above_norm(bound), S.coordinate_median())):  # stacked
        alg = fs.make_algorithm("fedavg", model, client_lr=0.5, local_epochs=2,
                                batch_size=2, aggregator=aggregator)
        fr = fs.make_round(alg, fs.FixedSizeSampler(20, 12), chunk_size=5)
        _, out = fr.step(fr.init(jax.random.key(0)), data, jax.random.key(1))
        norms = np.asarray(out.client_metrics["update_norm"])[np.asarray(out.client_ids) >= 0]
        kept = int(np.sum(norms <= bound))
        assert 0 < kept < 12  # the filter dropped some clients, not all
        assert int(out.metrics["num_clients"]) == 12
        assert int(out.metrics["num_aggregated"]) == kept


def test_a_round_with_a_dropped_client_equals_the_round_without_it():
    """The filtered client contributes nothing: the same as a cohort without it."""
    data = random_federated(num_clients=20, max_examples=8, min_count=1, seed=3)
    model = fs.make_model("softmax", (5,), 3)
    alg = fs.make_algorithm("fedavg", model, client_lr=0.5, local_epochs=2, batch_size=2,
                            aggregator=S.chain(S.zero_above_norm(1.2), S.weighted_mean()))
    fr = fs.make_round(alg, fs.FixedSizeSampler(20, 12), chunk_size=5)
    state = fr.init(jax.random.key(0))
    new, out = fr.step(state, data, jax.random.key(1))
    ids = np.asarray(out.client_ids)
    norms = np.asarray(out.client_metrics["update_norm"])
    weights = np.asarray(out.client_metrics["weight"])
    # Reference: each kept client's delta, one at a time, weighted mean by hand.
    update = jax.jit(fs.make_local_update(model, fs.ClientConfig(
        optax.sgd(0.5), local_epochs=2, batch_size=2)))
    _, client_key = jax.random.split(jax.random.key(1))  # the round's client key
    total, weight = None, 0.0
    for cid, norm, w in zip(ids, norms, weights):
        if norm > 1.2:
            continue
        one = jax.tree.map(lambda a: a[0], data.cohort_data(np.asarray([cid], np.int32)))
        delta = update(state.params, one, jax.random.fold_in(client_key, int(cid))).delta
        scaled = jax.tree.map(lambda d: np.asarray(d, np.float64) * w, delta)
        total = scaled if total is None else jax.tree.map(np.add, total, scaled)
        weight += w
    want = jax.tree.map(lambda p, t: np.asarray(p) + t / weight, state.params, total)
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)
