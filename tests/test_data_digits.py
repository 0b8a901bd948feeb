"""scikit-learn digits: image layout, seeded split, federated partitions."""

import numpy as np
import pytest

from fedjax_sim._validation import ConfigError
from fedjax_sim.data.digits import digits_federated, digits_train_test, load_digits_arrays


def test_images_are_scaled_float32_nhwc():
    x, y = load_digits_arrays()
    assert x.shape == (1797, 8, 8, 1) and x.dtype == np.float32
    assert y.shape == (1797,) and y.dtype == np.int32
    assert x.min() == 0.0 and x.max() == 1.0
    assert set(np.unique(y)) == set(range(10))


def test_split_is_seeded_stratified_and_disjoint():
    a = digits_train_test(seed=0)
    b = digits_train_test(seed=0)
    c = digits_train_test(seed=1)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a[2], c[2])
    train_x, train_y, test_x, test_y = a
    assert len(train_y) + len(test_y) == 1797
    assert abs(len(test_y) / 1797 - 0.2) < 0.01
    # Every class is held out in proportion.
    full = np.bincount(np.concatenate([train_y, test_y]))
    np.testing.assert_allclose(np.bincount(test_y) / full, 0.2, atol=0.02)
    # No image is in both sets (the digits contain no exact duplicates across this split).
    train_rows = {row.tobytes() for row in train_x.reshape(len(train_x), -1)}
    assert not any(row.tobytes() in train_rows for row in test_x.reshape(len(test_x), -1))


@pytest.mark.parametrize("partition", ["dirichlet", "iid", "shards", "quantity"])
def test_federated_partitions_cover_the_training_set(partition):
    split = digits_federated(20, seed=0, partition=partition)
    train = split.train
    assert train.num_clients == 20 and train.num_classes == 10
    assert train.example_shape == (8, 8, 1)
    n_train = 1797 - len(split.test_y)
    assert train.num_examples == n_train
    assert split.test_x.shape == (len(split.test_y), 8, 8, 1)
    # Train clients plus the test set hold every digit exactly once.
    x, y = train.pooled()
    all_x, all_y = load_digits_arrays()
    def rows(images, labels):
        flat = np.concatenate([images.reshape(len(images), -1), labels[:, None]], axis=1)
        return flat[np.lexsort(flat.T[::-1])]
    np.testing.assert_array_equal(
        rows(np.concatenate([x, split.test_x]), np.concatenate([y, split.test_y])),
        rows(all_x, all_y))


def test_dirichlet_skew_depends_on_alpha():
    def distinct_labels(alpha):
        train = digits_federated(20, seed=0, alpha=alpha).train
        y, mask = np.asarray(train.y), np.asarray(train.mask())
        return np.mean([len(np.unique(y[k][mask[k]])) for k in range(20)])

    assert distinct_labels(0.05) < distinct_labels(100.0) - 3


def test_shards_give_few_labels_per_client():
    train = digits_federated(50, seed=0, partition="shards", shards_per_client=2).train
    y, mask = np.asarray(train.y), np.asarray(train.mask())
    assert max(len(np.unique(y[k][mask[k]])) for k in range(50)) <= 4


def test_validation_names_field():
    with pytest.raises(ConfigError, match="partition"):
        digits_federated(10, seed=0, partition="pathological")
    with pytest.raises(ConfigError, match="alpha"):
        digits_federated(10, seed=0, alpha=-1.0)
    with pytest.raises(ConfigError, match="num_clients"):
        digits_federated(5000, seed=0, partition="iid")
    with pytest.raises(ConfigError, match="test_fraction"):
        digits_train_test(seed=0, test_fraction=1.0)
    with pytest.raises(ConfigError, match="seed"):
        digits_federated(10, seed=-2)
