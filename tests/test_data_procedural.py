"""Procedural populations: per-client data from (key, id) inside jit, O(cohort) memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sim._validation import ConfigError
from fedjax_sim.data.federated import ClientData, FederatedData, check_cohort_data
from fedjax_sim.data.procedural import ProceduralSynthetic, procedural_synthetic
from fedjax_sim.data.synthetic import synthetic_fedprox

CONFIG = dict(alpha=1.0, beta=1.0, max_examples=400)
NUM_CLIENTS = 40  # matches tests/test_data_synthetic.py so shapes (and compiles) are shared


@jax.jit
def cohort(population, client_ids):
    return population.cohort_data(client_ids)


@jax.jit
def held_out_cohort(population, client_ids):
    return population.test_data(client_ids)


def as_np(data):
    return jax.tree.map(np.asarray, data)


@pytest.fixture(scope="module")
def huge():
    return procedural_synthetic(10**7, seed=0, **CONFIG)


def test_memory_does_not_scale_with_population(huge):
    small = procedural_synthetic(10, seed=0, **CONFIG)
    leaves = jax.tree.leaves(huge)
    assert sum(leaf.nbytes for leaf in leaves) <= 16  # one raw PRNG key
    assert [leaf.shape for leaf in leaves] == [leaf.shape for leaf in jax.tree.leaves(small)]
    ids = jnp.arange(NUM_CLIENTS, dtype=jnp.int32) * 249_989  # spread over the population
    data = cohort(huge, ids)
    check_cohort_data(data, NUM_CLIENTS)
    assert data.x.shape == (NUM_CLIENTS, 400, 60) and data.x.dtype == jnp.float32
    # The compiled cohort function's buffers are the same for 10 and 10^7 clients.
    sizes = []
    for population in (small, huge):
        analysis = cohort.lower(population, ids).compile().memory_analysis()
        if analysis is None:
            pytest.skip("backend reports no memory analysis")
        sizes.append((analysis.argument_size_in_bytes, analysis.temp_size_in_bytes,
                      analysis.output_size_in_bytes))
    assert sizes[0] == sizes[1]
    assert sizes[1][0] < 1024  # arguments: the key and the ids


def test_same_id_same_data_different_ids_differ(huge):
    ids = jnp.array([9_999_999, 123, 123, 5_000_000] + [0] * (NUM_CLIENTS - 4), jnp.int32)
    first, second = as_np(cohort(huge, ids)), as_np(cohort(huge, ids))
    np.testing.assert_array_equal(first.x, second.x)
    np.testing.assert_array_equal(first.y, second.y)
    np.testing.assert_array_equal(first.x[1], first.x[2])  # same id twice in one cohort
    assert not np.allclose(first.x[0], first.x[3])
    np.testing.assert_array_equal(first.client_id[:4], [9_999_999, 123, 123, 5_000_000])
    counts = first.mask.sum(1)
    assert counts.min() >= 50 and counts.max() <= 400
    assert not np.any(first.x[~first.mask]) and not np.any(first.y[~first.mask])


def test_padding_and_out_of_range_ids_are_empty(huge):
    ids = jnp.array([-1, 10**7, 7] + [-1] * (NUM_CLIENTS - 3), jnp.int32)
    data = as_np(cohort(huge, ids))
    assert not data.mask[0].any() and not data.mask[1].any() and data.mask[2].any()
    assert not np.any(data.x[0]) and not np.any(data.x[1])
    np.testing.assert_array_equal(data.client_id[:3], [-1, -1, 7])


def test_matches_materialised_generator(huge):
    """Client k's examples are synthetic_fedprox's client k, before its train/test split.

    A client's data depends on (key, id) only, so the first clients of a 10^7-client
    population are the clients of a small materialised one with the same seed.
    """
    split = synthetic_fedprox(NUM_CLIENTS, seed=0, **CONFIG)
    data = as_np(cohort(huge, jnp.arange(NUM_CLIENTS, dtype=jnp.int32)))
    train_n, test_n = np.asarray(split.train.counts), np.asarray(split.test.counts)
    np.testing.assert_array_equal(data.mask.sum(1), train_n + test_n)
    train_x, test_x = np.asarray(split.train.x), np.asarray(split.test.x)
    train_y, test_y = np.asarray(split.train.y), np.asarray(split.test.y)
    for k in range(NUM_CLIENTS):
        t, n = train_n[k], train_n[k] + test_n[k]
        np.testing.assert_allclose(data.x[k, :t], train_x[k, :t], rtol=0, atol=1e-6)
        np.testing.assert_allclose(data.x[k, t:n], test_x[k, :n - t], rtol=0, atol=1e-6)
        np.testing.assert_array_equal(data.y[k, :t], train_y[k, :t])
        np.testing.assert_array_equal(data.y[k, t:n], test_y[k, :n - t])


def test_held_out_data_is_fresh_and_deterministic(huge):
    ids = jnp.arange(NUM_CLIENTS, dtype=jnp.int32) + 17
    train = as_np(cohort(huge, ids))
    test_a, test_b = as_np(held_out_cohort(huge, ids)), as_np(held_out_cohort(huge, ids))
    np.testing.assert_array_equal(test_a.x, test_b.x)
    np.testing.assert_array_equal(test_a.mask, train.mask)  # same size as the train set
    assert not np.allclose(test_a.x[train.mask], train.x[train.mask])
    # Same client distribution: per-client feature means agree (mean v_k).
    for k in range(3):
        m = train.mask[k]
        diff = train.x[k][m].mean(0) - test_a.x[k][m].mean(0)
        assert np.abs(diff).max() < 6 * np.sqrt(2.0 / m.sum())


def test_population_is_a_pytree_argument_without_retracing():
    traces = []

    @jax.jit
    def mean_x(population, ids):
        traces.append(None)
        data = population.cohort_data(ids)
        m = data.mask.astype(data.x.dtype)
        return jnp.sum(data.x * m[..., None]) / jnp.sum(m)

    ids = jnp.arange(4, dtype=jnp.int32)
    a = mean_x(procedural_synthetic(10**7, seed=1, **CONFIG), ids)
    b = mean_x(procedural_synthetic(10**7, seed=2, **CONFIG), ids)
    assert len(traces) == 1 and a != b


def test_interface_and_materialize(huge):
    assert huge.num_clients == 10**7 and huge.max_examples == 400
    assert huge.num_classes == 10 and huge.example_shape == (60,)
    ids = np.array([5, 9_000_000, 5])
    train = huge.materialize(ids)
    assert isinstance(train, FederatedData) and train.num_clients == 3
    direct = as_np(cohort(huge, jnp.asarray(np.resize(ids, NUM_CLIENTS), jnp.int32)))
    np.testing.assert_array_equal(np.asarray(train.counts), direct.mask[:3].sum(1))
    np.testing.assert_array_equal(np.asarray(train.x), direct.x[:3])
    assert isinstance(direct, ClientData)
    test = huge.materialize(ids, split="test", num_examples=8)
    assert test.max_examples == 8 and np.all(np.asarray(test.counts) == 8)
    np.testing.assert_array_equal(np.asarray(test.x)[0], np.asarray(test.x)[2])
    assert not np.allclose(np.asarray(test.x)[0], np.asarray(train.x)[0, :8])


def test_iid_variant_clients_share_the_model():
    population = procedural_synthetic(1000, seed=3, iid=True, **CONFIG)
    data = as_np(cohort(population, jnp.arange(8)))
    pooled = data.x[data.mask]
    assert np.abs(pooled.mean(0)).max() < 5 * np.sqrt(1.0 / len(pooled))  # v_k = 0
    assert data.client_id.tolist() == list(range(8))


def test_validation_names_field():
    with pytest.raises(ConfigError, match="num_clients"):
        procedural_synthetic(2**31, seed=0, **CONFIG)
    with pytest.raises(ConfigError, match="num_clients"):
        procedural_synthetic(0, seed=0, **CONFIG)
    with pytest.raises(ConfigError, match="alpha"):
        procedural_synthetic(10, alpha=-0.5, beta=1.0, seed=0)
    with pytest.raises(ConfigError, match="min_examples"):
        procedural_synthetic(10, alpha=1.0, beta=1.0, seed=0, min_examples=0)
    with pytest.raises(ConfigError, match="seed"):
        procedural_synthetic(10, alpha=1.0, beta=1.0, seed=1.5)
    population = procedural_synthetic(10, seed=0, **CONFIG)
    with pytest.raises(ConfigError, match="client_ids"):
        population.materialize([3, 10])
    with pytest.raises(ConfigError, match="split"):
        population.materialize([3], split="validation")
    with pytest.raises(ConfigError, match="num_examples"):
        population.test_data(jnp.arange(2), num_examples=0)


def test_accepts_keys_and_raw_key_data():
    by_int = procedural_synthetic(10, seed=4, **CONFIG)
    by_key = procedural_synthetic(10, seed=jax.random.key(4), **CONFIG)
    by_data = procedural_synthetic(10, seed=jax.random.key_data(jax.random.key(4)), **CONFIG)
    assert isinstance(by_key, ProceduralSynthetic)
    for other in (by_key, by_data):
        np.testing.assert_array_equal(np.asarray(other.key_data), np.asarray(by_int.key_data))
