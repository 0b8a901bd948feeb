"""The vectorised round agrees with a Python loop over clients, and its invariants hold."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_sim.algorithms import FEDOPT, ClientProgram, make_algorithm
from fedjax_sim.cohort import ClientOutput, map_cohort
from fedjax_sim.data.federated import ClientData
from fedjax_sim.models import make_model
from fedjax_sim.poisoning import omniscient_attack
from fedjax_sim.rounds import engine_client, make_round, split_round_key
from fedjax_sim.sampling import FixedSizeSampler, PoissonSampler
from fedjax_sim.server import (adaptive_clip, chain, clip_per_client, coordinate_median,
                               dp_mean_normalize, sum_updates, weighted_mean)

from conftest import random_federated

# The server optimiser of each member with make_algorithm's documented defaults (server_lr
# 1.0 for the SGD servers and 0.01 for the adaptive ones, momentum 0.9, betas 0.9/0.99,
# tau 1e-3), written out independently of the library.
SERVER_OPTIMIZERS = {
    "fedsgd": lambda: optax.sgd(1.0),
    "fedavg": lambda: optax.sgd(1.0),
    "fedavgm": lambda: optax.sgd(1.0, momentum=0.9),
    "fedadam": lambda: optax.adam(0.01, b1=0.9, b2=0.99, eps=1e-3),
    "fedyogi": lambda: optax.yogi(0.01, b1=0.9, b2=0.99, eps=1e-3),
    "fedadagrad": lambda: optax.adagrad(0.01, initial_accumulator_value=0.0, eps=1e-3),
    "fedprox": lambda: optax.sgd(1.0),
}


def loop_reference_round(algorithm, optimizer, data, params, opt_state, round_key, ids):
    """Plain Python loop: one jitted client program at a time, then weighted mean + optax."""
    update = jax.jit(algorithm.client.update)
    _, client_key = split_round_key(round_key)
    mask = np.asarray(data.mask())
    deltas, weights = [], []
    for cid in ids:
        client = ClientData(x=data.x[cid], y=data.y[cid], mask=jnp.asarray(mask[cid]),
                            client_id=jnp.int32(cid))
        out = update(params, client, jax.random.fold_in(client_key, cid), ())
        deltas.append(out.upload)
        weights.append(float(out.weight))
    w = np.asarray(weights, np.float64)
    mean = jax.tree.map(lambda *ds: np.tensordot(w / w.sum(), np.stack(ds), axes=1), *deltas)
    grad = jax.tree.map(lambda d: -jnp.asarray(d, jnp.float32), mean)
    with jax.numpy_dtype_promotion("standard"):  # optax Adam/Yogi: 1 - decay**int32 count
        updates, opt_state = optimizer.update(grad, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


@pytest.mark.parametrize("name,chunk_size", [(n, 64) for n in SERVER_OPTIMIZERS]
                         + [("fedavg", 3)])
def test_round_equals_python_loop(name, chunk_size):
    assert set(SERVER_OPTIMIZERS) == set(FEDOPT)  # every member of the family is tested
    data = random_federated(num_clients=20, max_examples=8, min_count=1, seed=7)
    model = make_model("softmax", (5,), 3)
    alg = make_algorithm(name, model, client_lr=0.2, local_epochs=2, batch_size=3)
    sampler = FixedSizeSampler(20, 7)
    fr = make_round(alg, sampler, chunk_size=chunk_size)
    assert fr.streaming  # the default weighted mean reduces chunk by chunk
    state = fr.init(jax.random.key(0))
    optimizer = SERVER_OPTIMIZERS[name]()
    ref_params, ref_opt = state.params, optimizer.init(state.params)
    for r in range(2):
        key = jax.random.key(10 + r)
        ids = np.asarray(sampler.sample(split_round_key(key)[0]).ids)
        ref_params, ref_opt = loop_reference_round(alg, optimizer, data, ref_params, ref_opt,
                                                   key, ids)
        state, out = fr.step(state, data, key)
        np.testing.assert_array_equal(out.client_ids, ids)
        chex.assert_trees_all_close(state.params, ref_params, atol=2e-5, rtol=1e-5)
        assert int(out.metrics["num_clients"]) == 7
        assert int(out.metrics["num_aggregated"]) == 7
        assert int(state.round) == r + 1


@pytest.mark.slow
def test_fedsgd_delta_is_minus_the_gradient():
    data = random_federated(num_clients=5, max_examples=6, min_count=1, seed=8)
    model = make_model("mlp", (5,), 3, hidden=(4,))
    alg = make_algorithm("fedsgd", model, server_lr=0.5)
    fr = make_round(alg, FixedSizeSampler(5, 5))
    state = fr.init(jax.random.key(0))
    new, _ = fr.step(state, data, jax.random.key(1))
    # FedSGD with example weights = one step of full-batch GD on the pooled data.
    x, y = data.pooled()
    grad = jax.grad(lambda p: model.per_example_loss(p, x, y).mean())(state.params)
    expected = jax.tree.map(lambda p, g: p - 0.5 * g, state.params, grad)
    chex.assert_trees_all_close(new.params, expected, atol=1e-5)


def _ids_round(ids, mask):
    """A sampler stand-in returning a given cohort (for order/padding invariance tests)."""

    class Fixed:
        num_clients = 1000
        capacity = len(ids)

        @staticmethod
        def sample(key, round_index=None):
            from fedjax_sim.sampling import Cohort
            return Cohort(ids=jnp.asarray(ids, jnp.int32), mask=jnp.asarray(mask),
                          overflow=jnp.int32(0))

    return Fixed()


def test_padding_clients_and_client_order_change_nothing():
    data = random_federated(num_clients=10, max_examples=6, min_count=1, seed=9)
    model = make_model("softmax", (5,), 3)
    alg = make_algorithm("fedavg", model, client_lr=0.3, local_epochs=1, batch_size=2)
    key = jax.random.key(4)
    results = []
    for ids, mask in [([1, 4, 7, 8], [True] * 4),
                      ([8, 1, 7, 4], [True] * 4),
                      ([8, -1, 1, 7, 3, 4], [True, False, True, True, False, True])]:
        fr = make_round(alg, _ids_round(ids, mask), chunk_size=4)
        state = fr.init(jax.random.key(0))
        new, out = fr.step(state, data, key)
        assert int(out.metrics["num_aggregated"]) == 4
        results.append(new.params)
    for other in results[1:]:
        chex.assert_trees_all_close(results[0], other, atol=1e-6)


def test_same_seed_identical_different_seed_differs():
    data = random_federated(num_clients=30, max_examples=6, min_count=1, seed=10)
    model = make_model("softmax", (5,), 3)
    alg = make_algorithm("fedavg", model, client_lr=0.3, batch_size=2)
    fr = make_round(alg, PoissonSampler(30, 0.3))

    def run(seed):
        state = fr.init(jax.random.key(0))
        for r in range(3):
            state, _ = fr.step(state, data, jax.random.fold_in(jax.random.key(seed), r))
        return state.params

    chex.assert_trees_all_equal(run(1), run(1))
    assert not np.allclose(run(1)["Dense_0"]["kernel"], run(2)["Dense_0"]["kernel"])


def test_rounds_do_not_recompile():
    data = random_federated(num_clients=30, max_examples=6, min_count=1, seed=11)
    model = make_model("softmax", (5,), 3)
    alg = make_algorithm("fedadam", model, client_lr=0.3, batch_size=2)
    fr = make_round(alg, PoissonSampler(30, 0.3))
    traced = chex.assert_max_traces(fr.step_unjitted, n=1)
    step = jax.jit(traced)
    state = fr.init(jax.random.key(0))
    for r in range(4):
        state, _ = step(state, data, jax.random.key(r))
    assert int(state.round) == 4


def test_nonfinite_client_is_dropped_and_counted():
    data = random_federated(num_clients=6, max_examples=5, min_count=2, seed=12)
    model = make_model("softmax", (5,), 3)
    alg = make_algorithm("fedavg", model, client_lr=0.1, batch_size=5)
    honest = alg.client.update

    def poisoned(message, client, key, state=()):
        out = honest(message, client, key, state)
        bad = client.client_id == 2
        upload = jax.tree.map(lambda d: jnp.where(bad, jnp.nan, d), out.upload)
        return out._replace(upload=upload)  # the engine must find the NaN itself

    ids = [0, 2, 4]
    fr_bad = make_round(alg.with_client(ClientProgram(poisoned)), _ids_round(ids, [True] * 3))
    fr_ref = make_round(alg, _ids_round([0, 4], [True] * 2))
    state = fr_bad.init(jax.random.key(0))
    key = jax.random.key(5)
    new_bad, out = fr_bad.step(state, data, key)
    new_ref, _ = fr_ref.step(state, data, key)
    assert int(out.metrics["num_nonfinite"]) == 1
    assert int(out.metrics["num_aggregated"]) == 2
    np.testing.assert_array_equal(out.client_metrics["finite"], [True, False, True])
    chex.assert_trees_all_close(new_bad.params, new_ref.params, atol=1e-6)


def test_client_state_is_gathered_and_scattered():
    """Per-client state (a client program's init_state, as SCAFFOLD's control variates)
    round-trips by client id; unsampled clients keep theirs bit for bit."""
    data = random_federated(num_clients=8, max_examples=4, min_count=1, seed=13)
    model = make_model("softmax", (5,), 3)
    alg = make_algorithm("fedavg", model, client_lr=0.1, batch_size=4)
    honest = alg.client.update

    def counting(message, client, key, state):
        out = honest(message, client, key, ())
        return out._replace(state={"visits": state["visits"] + 1,
                                   "last_id": client.client_id})

    program = ClientProgram(counting, init_state=lambda params: {
        "visits": jnp.zeros((), jnp.int32), "last_id": jnp.full((), -7, jnp.int32)})
    fr = make_round(alg.with_client(program), FixedSizeSampler(8, 3))
    state = fr.init(jax.random.key(0))
    chex.assert_shape(state.client_states["visits"], (8,))
    np.testing.assert_array_equal(state.client_states["last_id"], -7)
    seen = np.zeros(8, int)
    for r in range(5):
        state, out = fr.step(state, data, jax.random.key(r))
        seen[np.asarray(out.client_ids)] += 1
    np.testing.assert_array_equal(state.client_states["visits"], seen)
    visited = seen > 0
    np.testing.assert_array_equal(state.client_states["last_id"][visited],
                                  np.arange(8)[visited])
    np.testing.assert_array_equal(state.client_states["last_id"][~visited], -7)


def test_map_cohort_chunking_matches_vmap():
    data = random_federated(num_clients=11, max_examples=5, min_count=1, seed=14)
    model = make_model("softmax", (5,), 3)
    alg = make_algorithm("fedavg", model, client_lr=0.1, batch_size=2)
    fn = engine_client(alg.client)
    params = model.init(jax.random.key(0))
    ids = jnp.arange(11)
    keys = jax.random.split(jax.random.key(1), 11)
    run = jax.jit(lambda chunk: map_cohort(fn, params, data, ids, keys, (), chunk_size=chunk),
                  static_argnums=0)
    full, chunked = run(64), run(4)
    assert isinstance(chunked, ClientOutput)
    chex.assert_trees_all_close(full.upload, chunked.upload, atol=1e-6)
    chex.assert_trees_all_close(full.weight, chunked.weight)
    np.testing.assert_array_equal(chunked.finite, True)


def stacked(aggregator):
    """The same chain with its reducer's streaming form removed: the same math
    (finalize of partial on the whole cohort) as a reducer that needs the stacked cohort."""
    c = chain(aggregator)
    r = c.reducer
    flat = dataclasses.replace(r, name=r.name + "_stacked", partial=None, finalize=None,
                               apply=lambda cohort, st: r.finalize(r.partial(cohort, st), st))
    return chain(*c.stages[:c.reducer_index], flat, *c.stages[c.reducer_index + 1:])


@pytest.mark.slow
@pytest.mark.parametrize("make_aggregator", [
    lambda: weighted_mean(),
    lambda: chain(clip_per_client(0.05), sum_updates(), dp_mean_normalize(7.0)),
    lambda: chain(adaptive_clip(0.05, 0.5, 0.2, 0.1, key=jax.random.key(3)), sum_updates()),
], ids=["weighted_mean", "clip_sum_normalize", "adaptive_clip_sum"])
def test_streaming_reduction_equals_stacked_reduction(make_aggregator):
    """Chunk-by-chunk reduction gives the aggregate (and the chain state) of the stacked
    [C, ...] path."""
    data = random_federated(num_clients=20, max_examples=6, min_count=1, seed=15)
    model = make_model("mlp", (5,), 3, hidden=(4,))
    streaming = make_aggregator()
    flat = stacked(streaming)
    assert chain(streaming).streaming and not flat.streaming
    states, counts = [], []
    for aggregator in (streaming, flat):
        alg = make_algorithm("fedavgm", model, client_lr=0.2, batch_size=2,
                             aggregator=aggregator)
        fr = make_round(alg, FixedSizeSampler(20, 7), chunk_size=3)
        assert fr.streaming is (aggregator is streaming)
        assert (fr.why_stacked is None) is fr.streaming
        state = fr.init(jax.random.key(0))
        for r in range(2):
            state, out = fr.step(state, data, jax.random.key(r))
            counts.append(int(out.metrics["num_aggregated"]))
        states.append(state)
    chex.assert_trees_all_close(states[0].params, states[1].params, atol=1e-6)
    chex.assert_trees_all_close(jax.tree.map(_raw, states[0].aggregator),
                                jax.tree.map(_raw, states[1].aggregator), atol=1e-6)
    assert counts == [7, 7, 7, 7]


def _raw(x):
    return jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x


def test_chain_streams_only_after_client_stages():
    assert chain(clip_per_client(1.0), weighted_mean()).streaming
    assert not chain(coordinate_median()).streaming
    assert "not a sum" in chain(coordinate_median()).why_stacked
    # Adaptive clipping keeps its per-round statistic (the unclipped count) additive over
    # chunks, so it streams now (it used to need the stacked cohort).
    assert chain(adaptive_clip(1.0, 0.5, 0.2, 0.1, key=jax.random.key(0)),
                 sum_updates()).streaming
    # A cohort stage (the omniscient adversary) reads every upload: stacked.
    attacked = chain(omniscient_attack("ipm", lambda ids: ids == 0), weighted_mean())
    assert not attacked.streaming
    assert "omniscient_ipm" in attacked.why_stacked
