"""The vectorised round agrees with a Python loop over clients, and its invariants hold."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_sim.algorithms import ALGORITHM_NAMES, make_algorithm
from fedjax_sim.client_update import ClientOutput, make_client_update
from fedjax_sim.cohort import map_cohort
from fedjax_sim.data.federated import ClientData
from fedjax_sim.models import make_model
from fedjax_sim.rounds import make_round, split_round_key
from fedjax_sim.sampling import FixedSizeSampler, PoissonSampler
from fedjax_sim.server import (adaptive_clip, chain, clip_per_client, coordinate_median,
                               dp_mean_normalize, sum_updates, weighted_mean)

from conftest import random_federated


def loop_reference_round(model, algorithm, data, params, opt_state, round_key, ids):
    """Plain Python loop: one jitted client at a time, then weighted mean + optax."""
    update = jax.jit(make_client_update(model, algorithm.client, data.max_examples))
    _, client_key = split_round_key(round_key)
    mask = np.asarray(data.mask())
    deltas, weights = [], []
    for cid in ids:
        client = ClientData(x=data.x[cid], y=data.y[cid], mask=jnp.asarray(mask[cid]),
                            client_id=jnp.int32(cid))
        out = update(params, client, jax.random.fold_in(client_key, cid))
        deltas.append(out.delta)
        weights.append(float(out.weight))
    w = np.asarray(weights, np.float64)
    mean = jax.tree.map(lambda *ds: np.tensordot(w / w.sum(), np.stack(ds), axes=1), *deltas)
    grad = jax.tree.map(lambda d: -jnp.asarray(d, jnp.float32), mean)
    updates, opt_state = algorithm.server_optimizer.update(grad, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


@pytest.mark.parametrize("name,chunk_size", [(n, 64) for n in ALGORITHM_NAMES]
                         + [("fedavg", 3)])
def test_round_equals_python_loop(name, chunk_size):
    data = random_federated(num_clients=20, max_examples=8, min_count=1, seed=7)
    model = make_model("softmax", (5,), 3)
    alg = make_algorithm(name, client_lr=0.2, local_epochs=2, batch_size=3)
    sampler = FixedSizeSampler(20, 7)
    fr = make_round(model, alg, sampler, max_examples=8, chunk_size=chunk_size)
    state = fr.init(jax.random.key(0))
    ref_params, ref_opt = state.params, state.opt_state
    for r in range(2):
        key = jax.random.key(10 + r)
        ids = np.asarray(sampler.sample(split_round_key(key)[0]).ids)
        ref_params, ref_opt = loop_reference_round(model, alg, data, ref_params, ref_opt,
                                                   key, ids)
        state, out = fr.step(state, data, key)
        np.testing.assert_array_equal(out.client_ids, ids)
        chex.assert_trees_all_close(state.params, ref_params, atol=2e-5, rtol=1e-5)
        assert int(out.metrics["num_clients"]) == 7


@pytest.mark.slow
def test_fedsgd_delta_is_minus_the_gradient():
    data = random_federated(num_clients=5, max_examples=6, min_count=1, seed=8)
    model = make_model("mlp", (5,), 3, hidden=(4,))
    alg = make_algorithm("fedsgd", server_lr=0.5)
    fr = make_round(model, alg, FixedSizeSampler(5, 5), max_examples=6)
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
    alg = make_algorithm("fedavg", client_lr=0.3, local_epochs=1, batch_size=2)
    key = jax.random.key(4)
    results = []
    for ids, mask in [([1, 4, 7, 8], [True] * 4),
                      ([8, 1, 7, 4], [True] * 4),
                      ([8, -1, 1, 7, 3, 4], [True, False, True, True, False, True])]:
        fr = make_round(model, alg, _ids_round(ids, mask), max_examples=6, chunk_size=4)
        state = fr.init(jax.random.key(0))
        new, out = fr.step(state, data, key)
        assert int(out.metrics["num_aggregated"]) == 4
        results.append(new.params)
    for other in results[1:]:
        chex.assert_trees_all_close(results[0], other, atol=1e-6)


def test_same_seed_identical_different_seed_differs():
    data = random_federated(num_clients=30, max_examples=6, min_count=1, seed=10)
    model = make_model("softmax", (5,), 3)
    alg = make_algorithm("fedavg", client_lr=0.3, batch_size=2)
    fr = make_round(model, alg, PoissonSampler(30, 0.3), max_examples=6)

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
    alg = make_algorithm("fedadam", client_lr=0.3, batch_size=2)
    fr = make_round(model, alg, PoissonSampler(30, 0.3), max_examples=6)
    traced = chex.assert_max_traces(fr.step_unjitted, n=1)
    step = jax.jit(traced)
    state = fr.init(jax.random.key(0))
    for r in range(4):
        state, _ = step(state, data, jax.random.key(r))
    assert int(state.round) == 4


def test_nonfinite_client_is_dropped_and_counted():
    data = random_federated(num_clients=6, max_examples=5, min_count=2, seed=12)
    model = make_model("softmax", (5,), 3)
    alg = make_algorithm("fedavg", client_lr=0.1, batch_size=5)
    honest = make_client_update(model, alg.client, 5)

    def poisoned(params, client, key, state=()):
        out = honest(params, client, key, state)
        bad = client.client_id == 2
        delta = jax.tree.map(lambda d: jnp.where(bad, jnp.nan, d), out.delta)
        return out._replace(delta=delta, finite=out.finite & ~bad)

    ids = [0, 2, 4]
    fr_bad = make_round(model, alg, _ids_round(ids, [True] * 3), max_examples=5,
                        client_update=poisoned)
    fr_ref = make_round(model, alg, _ids_round([0, 4], [True] * 2), max_examples=5)
    state = fr_bad.init(jax.random.key(0))
    key = jax.random.key(5)
    new_bad, out = fr_bad.step(state, data, key)
    new_ref, _ = fr_ref.step(state, data, key)
    assert int(out.metrics["num_nonfinite"]) == 1
    assert int(out.metrics["num_aggregated"]) == 2
    chex.assert_trees_all_close(new_bad.params, new_ref.params, atol=1e-6)


def test_client_state_is_gathered_and_scattered():
    """The per-client state hook (for SCAFFOLD-like algorithms) round-trips by client id."""
    data = random_federated(num_clients=8, max_examples=4, min_count=1, seed=13)
    model = make_model("softmax", (5,), 3)
    alg = make_algorithm("fedavg", client_lr=0.1, batch_size=4)
    honest = make_client_update(model, alg.client, 4)

    def counting(params, client, key, state):
        out = honest(params, client, key, ())
        return out._replace(client_state={"visits": state["visits"] + 1,
                                          "last_id": client.client_id})

    def init_states(params, n):
        return {"visits": jnp.zeros((n,), jnp.int32), "last_id": jnp.full((n,), -7)}

    fr = make_round(model, alg, FixedSizeSampler(8, 3), max_examples=4,
                    client_update=counting, client_state_init=init_states)
    state = fr.init(jax.random.key(0))
    seen = np.zeros(8, int)
    for r in range(5):
        state, out = fr.step(state, data, jax.random.key(r))
        seen[np.asarray(out.client_ids)] += 1
    np.testing.assert_array_equal(state.client_states["visits"], seen)
    visited = seen > 0
    np.testing.assert_array_equal(state.client_states["last_id"][visited],
                                  np.arange(8)[visited])


def test_map_cohort_chunking_matches_vmap():
    data = random_federated(num_clients=11, max_examples=5, min_count=1, seed=14)
    model = make_model("softmax", (5,), 3)
    alg = make_algorithm("fedavg", client_lr=0.1, batch_size=2)
    fn = make_client_update(model, alg.client, 5)
    params = model.init(jax.random.key(0))
    ids = jnp.arange(11)
    keys = jax.random.split(jax.random.key(1), 11)
    run = jax.jit(lambda chunk: map_cohort(fn, params, data, ids, keys, (), chunk_size=chunk),
                  static_argnums=0)
    full, chunked = run(64), run(4)
    assert isinstance(chunked, ClientOutput)
    chex.assert_trees_all_close(full.delta, chunked.delta, atol=1e-6)
    chex.assert_trees_all_close(full.weight, chunked.weight)


@pytest.mark.slow
@pytest.mark.parametrize("make_transform", [
    lambda: weighted_mean(),
    lambda: chain(clip_per_client(0.05), sum_updates(), dp_mean_normalize(7.0)),
])
def test_streaming_reduction_equals_stacked_reduction(make_transform):
    """Chunk-by-chunk reduction gives the aggregate of the stacked [C, ...] path."""
    data = random_federated(num_clients=20, max_examples=6, min_count=1, seed=15)
    model = make_model("mlp", (5,), 3, hidden=(4,))
    streaming = make_transform()
    assert streaming.streaming is not None
    stacked = streaming._replace(streaming=None)
    params = []
    for transform in (streaming, stacked):
        alg = make_algorithm("fedavgm", client_lr=0.2, batch_size=2,
                             server_transform=transform)
        fr = make_round(model, alg, FixedSizeSampler(20, 7), max_examples=6, chunk_size=3)
        state = fr.init(jax.random.key(0))
        for r in range(2):
            state, _ = fr.step(state, data, jax.random.key(r))
        params.append(state.params)
    chex.assert_trees_all_close(params[0], params[1], atol=1e-6)


def test_chain_streams_only_after_per_client_transforms():
    assert chain(clip_per_client(1.0), weighted_mean()).streaming is not None
    assert chain(coordinate_median()).streaming is None
    assert chain(adaptive_clip(1.0, 0.5, 0.2, 0.1, key=jax.random.key(0)),
                 sum_updates()).streaming is None
