"""Properties of the host-side partitioners and partition_dataset."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fedjax_sim._validation import ConfigError
import fedjax_sim.data.partition as part_mod
from fedjax_sim.data.partition import (PARTITIONERS, dirichlet_partition, iid_partition,
                                       partition_by_name, partition_dataset,
                                       quantity_skew_partition, shard_partition)

NUM_CLASSES = 10


def balanced_labels(per_class=100, num_classes=NUM_CLASSES, seed=0):
    labels = np.repeat(np.arange(num_classes), per_class)
    return np.random.default_rng(seed).permutation(labels)


def assert_disjoint_cover(parts, num_examples):
    flat = np.concatenate(parts)
    assert flat.shape == (num_examples,)
    np.testing.assert_array_equal(np.sort(flat), np.arange(num_examples))


def mean_label_entropy(parts, labels):
    out = []
    for p in parts:
        freq = np.bincount(labels[p], minlength=NUM_CLASSES) / len(p)
        nz = freq[freq > 0]
        out.append(-(nz * np.log(nz)).sum())
    return float(np.mean(out))


SCHEMES = {
    "iid": {},
    "dirichlet": {"alpha": 0.3},
    "shards": {"shards_per_client": 2},
    "quantity": {"sigma": 1.0},
}


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_partitions_are_disjoint_and_cover(name):
    labels = balanced_labels()
    parts = partition_by_name(name, labels, 20, seed=3, **SCHEMES[name])
    assert len(parts) == 20
    assert_disjoint_cover(parts, len(labels))
    assert all(p.dtype == np.int64 for p in parts)


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_same_seed_same_partition_other_seed_differs(name):
    labels = balanced_labels()
    a = partition_by_name(name, labels, 20, seed=5, **SCHEMES[name])
    b = partition_by_name(name, labels, 20, seed=5, **SCHEMES[name])
    c = partition_by_name(name, labels, 20, seed=6, **SCHEMES[name])
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


@settings(max_examples=30, deadline=None, derandomize=True)
@given(num_examples=st.integers(1, 300), frac=st.floats(0.0, 1.0), seed=st.integers(0, 99),
       sigma=st.floats(0.0, 3.0))
def test_iid_and_quantity_invariants(num_examples, frac, seed, sigma):
    num_clients = max(1, int(frac * num_examples))
    iid = iid_partition(num_examples, num_clients, seed=seed)
    assert_disjoint_cover(iid, num_examples)
    sizes = [len(p) for p in iid]
    assert max(sizes) - min(sizes) <= 1
    qty = quantity_skew_partition(num_examples, num_clients, seed=seed, sigma=sigma)
    assert_disjoint_cover(qty, num_examples)
    assert min(len(p) for p in qty) >= 1


def test_dirichlet_small_alpha_is_more_skewed_than_large_alpha():
    labels = balanced_labels(per_class=200)
    skewed = dirichlet_partition(labels, 20, 0.1, seed=0)
    mixed = dirichlet_partition(labels, 20, 100.0, seed=0)
    h_skewed = mean_label_entropy(skewed, labels)
    h_mixed = mean_label_entropy(mixed, labels)
    assert h_skewed < 0.6 * h_mixed
    assert h_mixed > 0.9 * np.log(NUM_CLASSES)  # large alpha is close to uniform labels


def test_dirichlet_min_examples_is_respected_and_infeasible_is_clear():
    labels = balanced_labels()
    parts = dirichlet_partition(labels, 20, 0.5, seed=1, min_examples=10)
    assert min(len(p) for p in parts) >= 10
    with pytest.raises(ConfigError, match="min_examples"):
        dirichlet_partition(labels, 20, 0.5, seed=1, min_examples=60)  # 20*60 > 1000
    with pytest.raises(ConfigError, match="min_examples"):
        # Feasible in principle, but tiny alpha never spreads 2 classes over 50 clients.
        dirichlet_partition(np.repeat([0, 1], 50), 50, 0.001, seed=0, min_examples=2,
                            max_retries=3)


def test_dirichlet_tiny_alpha_still_covers():
    labels = balanced_labels()
    parts = dirichlet_partition(labels, 10, 1e-4, seed=0, min_examples=0)
    assert_disjoint_cover(parts, len(labels))


def test_shards_limit_labels_per_client():
    labels = balanced_labels(per_class=100)  # 1000 examples, 100 shards of 10: one label each
    parts = shard_partition(labels, 50, 2, seed=0)
    assert_disjoint_cover(parts, len(labels))
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)
    assert all(len(p) == 20 for p in parts)
    # Uneven shard boundaries may straddle one label boundary each.
    uneven = shard_partition(balanced_labels(per_class=37), 7, 3, seed=0)
    assert all(len(np.unique(balanced_labels(per_class=37)[p])) <= 6 for p in uneven)


def test_quantity_skew_sizes_vary_more_with_sigma():
    def cv(sigma):
        sizes = np.array([len(p) for p in quantity_skew_partition(10_000, 100, seed=0,
                                                                  sigma=sigma)])
        return sizes.std() / sizes.mean()

    assert cv(0.0) < 0.01
    assert cv(2.0) > 3 * cv(0.3) > 0


def test_clients_are_not_sorted_by_label():
    labels = balanced_labels()
    parts = shard_partition(labels, 10, 2, seed=0)
    assert any(np.any(np.diff(labels[p]) < 0) for p in parts)


def test_partition_dataset_gathers_clients():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 3, 2)).astype(np.float32)
    y = rng.integers(0, 4, size=50)
    parts = iid_partition(50, 4, seed=0)
    data = partition_dataset(x, y, parts, num_classes=6)
    assert data.num_clients == 4 and data.num_classes == 6
    assert data.example_shape == (3, 2)
    assert data.max_examples == max(len(p) for p in parts)
    for k, p in enumerate(parts):
        xk, yk = data.client(k)
        np.testing.assert_array_equal(xk, x[p])
        np.testing.assert_array_equal(yk, y[p])
    padded = partition_dataset(x, y, parts, max_examples=20)
    assert padded.max_examples == 20 and padded.num_examples == 50


def test_partition_dataset_validates():
    x, y = np.zeros((10, 2), np.float32), np.zeros(10, np.int64)
    with pytest.raises(ConfigError, match=r"parts\[1\]"):
        partition_dataset(x, y, [np.arange(3), np.array([4, 10])])
    with pytest.raises(ConfigError, match=r"parts\[0\]"):
        partition_dataset(x, y, [np.array([0.5])])
    with pytest.raises(ConfigError, match="y.shape"):
        partition_dataset(x, y[:5], [np.arange(3)])
    with pytest.raises(ConfigError, match="max_examples"):
        partition_dataset(x, y, [np.arange(10)], max_examples=5)


def test_validation_names_field():
    labels = balanced_labels()
    with pytest.raises(ConfigError, match="alpha"):
        dirichlet_partition(labels, 10, 0.0, seed=0)
    with pytest.raises(ConfigError, match="alpha"):
        dirichlet_partition(labels, 10, float("nan"), seed=0)
    with pytest.raises(ConfigError, match="num_clients"):
        iid_partition(5, 6, seed=0)
    with pytest.raises(ConfigError, match="num_clients"):
        dirichlet_partition(labels, 0, 1.0, seed=0)
    with pytest.raises(ConfigError, match="shards_per_client"):
        shard_partition(labels, 600, 2, seed=0)
    with pytest.raises(ConfigError, match="sigma"):
        quantity_skew_partition(100, 10, seed=0, sigma=-1.0)
    with pytest.raises(ConfigError, match="seed"):
        iid_partition(100, 10, seed=-1)
    with pytest.raises(ConfigError, match="labels.dtype"):
        dirichlet_partition(labels.astype(np.float32), 10, 1.0, seed=0)
    with pytest.raises(ConfigError, match="labels"):
        shard_partition(-labels - 1, 10, 2, seed=0)
    with pytest.raises(ConfigError, match="partition"):
        partition_by_name("pathological", labels, 10, seed=0)


def test_registry_lists_every_scheme():
    assert set(PARTITIONERS) == set(SCHEMES)
    assert set(part_mod.__all__) >= {"iid_partition", "dirichlet_partition",
                                     "shard_partition", "quantity_skew_partition"}
