"""The materialised FedProx Synthetic(alpha, beta) generator follows its recipe."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fedjax_sim._validation import ConfigError
from fedjax_sim.data.synthetic import (SyntheticConfig, as_key, feature_variances,
                                       synthetic_client_model, synthetic_client_size,
                                       synthetic_fedprox, synthetic_streams)


NON_IID = dict(alpha=1.0, beta=1.0, max_examples=400)
IID = dict(alpha=1.0, beta=1.0, iid=True, max_examples=400)
NUM_CLIENTS = 40  # one shape for every generator call: compiled once per config


@pytest.fixture(scope="module")
def small_split():
    return synthetic_fedprox(NUM_CLIENTS, seed=0, **NON_IID)


@pytest.fixture(scope="module")
def iid_split():
    return synthetic_fedprox(NUM_CLIENTS, seed=0, **IID)


def clients_np(data):
    """Each client's real examples as NumPy arrays (one host copy, no per-client jit)."""
    x, y, counts = np.asarray(data.x), np.asarray(data.y), np.asarray(data.counts)
    return [(x[k, :n], y[k, :n]) for k, n in enumerate(counts)]


def client_models_np(seed, num_clients, **config):
    """(w [K, d, c], b [K, c], v [K, d]) of clients 0..K-1, from the public recipe."""
    config = SyntheticConfig(**config)
    streams = synthetic_streams(as_key(seed))
    models = jax.jit(jax.vmap(lambda i: synthetic_client_model(config, streams, i)))(
        jnp.arange(num_clients))
    return tuple(np.asarray(a, np.float64) for a in models)


def test_shapes_counts_and_split(small_split):
    train, test = small_split
    assert train.num_clients == test.num_clients == NUM_CLIENTS
    assert train.example_shape == test.example_shape == (60,)
    assert train.num_classes == test.num_classes == 10
    total = np.asarray(train.counts) + np.asarray(test.counts)
    assert total.min() >= 50 and total.max() <= 400
    # The authors' split: int(0.9 n) for training, the rest for testing.
    np.testing.assert_array_equal(np.asarray(train.counts), (0.9 * total).astype(int))
    # Sizes are the recipe's draws.
    config = SyntheticConfig(alpha=1.0, beta=1.0, max_examples=400)
    streams = synthetic_streams(as_key(0))
    sizes = jax.jit(jax.vmap(lambda i: synthetic_client_size(config, streams, i)))(
        jnp.arange(NUM_CLIENTS))
    np.testing.assert_array_equal(total, np.asarray(sizes))
    assert train.x.dtype == jnp.float32 and train.y.dtype == jnp.int32


def test_padding_is_zero(small_split):
    for data in small_split:
        mask = np.asarray(data.mask())
        assert not np.any(np.asarray(data.x)[~mask])
        assert not np.any(np.asarray(data.y)[~mask])


def test_client_sizes_follow_lognormal_recipe():
    config = SyntheticConfig(alpha=0.0, beta=0.0, max_examples=10**6)
    streams = synthetic_streams(as_key(1))
    n = 20_000
    sizes = np.asarray(jax.jit(jax.vmap(lambda i: synthetic_client_size(config, streams, i)))(
        jnp.arange(n)))
    assert sizes.min() >= 50
    draws = sizes - 50  # floor(LogNormal(4, 2)); floor(L) >= t  <=>  L >= t for integer t
    for t in (5, 20, 55, 150, 1000, 10000):
        expected = stats.norm.sf((np.log(t) - 4.0) / 2.0)
        assert abs((draws >= t).mean() - expected) < 0.015, t


def test_size_cap_bounds_every_client():
    config = SyntheticConfig(alpha=0.0, beta=0.0, min_examples=5, max_examples=64,
                             size_mean=10.0, size_sigma=5.0)  # huge draws, some inf in f32
    streams = synthetic_streams(as_key(2))
    sizes = np.asarray(jax.jit(jax.vmap(lambda i: synthetic_client_size(config, streams, i)))(
        jnp.arange(5000)))
    assert sizes.min() >= 5 and sizes.max() == 64


def test_feature_covariance_is_the_diagonal_sigma(small_split):
    train, test = small_split
    _, _, v = client_models_np(0, NUM_CLIENTS, **NON_IID)
    centred = np.concatenate([x - v[k] for data in (train, test)
                              for k, (x, _) in enumerate(clients_np(data))])
    assert len(centred) > 4000
    sigma = np.arange(1, 61) ** -1.2
    np.testing.assert_allclose(np.asarray(feature_variances(60)), sigma, rtol=1e-6)
    # Mean v_k: standard error sqrt(sigma_j / n).
    assert np.all(np.abs(centred.mean(0)) < 5 * np.sqrt(sigma / len(centred)))
    # Variance sigma_j: relative standard error sqrt(2 / n) < 2.3%.
    np.testing.assert_allclose(centred.var(0), sigma, rtol=0.1)
    assert abs(np.mean(centred.var(0) / sigma) - 1) < 0.02
    # Off-diagonal correlations vanish.
    corr = np.corrcoef(centred, rowvar=False)
    assert np.abs(corr - np.eye(60)).max() < 0.08


def assert_labels_are_argmax_per_client(x, y, w, b):
    """Labels equal argmax(W_k^T x + b_k), each example with its own client's model."""
    logits = np.einsum("nd,ndc->nc", x.astype(np.float64), w) + b
    expected = logits.argmax(-1)
    top2 = np.sort(logits, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 1e-4  # float32 rounding may flip exact near-ties
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(y[clear], expected[clear])


@pytest.mark.parametrize("iid", [False, True])
def test_labels_are_argmax_of_client_model(iid, small_split, iid_split):
    split, config = (iid_split, IID) if iid else (small_split, NON_IID)
    w, b, _ = client_models_np(0, NUM_CLIENTS, **config)
    for data in split:
        x, y = np.asarray(data.x), np.asarray(data.y)
        mask = np.asarray(data.mask())
        k = np.broadcast_to(np.arange(NUM_CLIENTS)[:, None], mask.shape)[mask]
        assert_labels_are_argmax_per_client(x[mask], y[mask], w[k], b[k])


def test_iid_variant_shares_model_and_centres_features(iid_split, small_split):
    w, b, v = client_models_np(0, NUM_CLIENTS, **IID)
    assert np.all(w == w[0]) and np.all(b == b[0]) and not np.any(v)
    x, _ = iid_split.train.pooled()
    assert np.all(np.abs(x.mean(0)) < 5 * np.sqrt(np.arange(1, 61) ** -1.2 / len(x)))
    # Shared model: label frequencies agree across clients far more than without it.
    def label_spread(split):
        freqs = [np.bincount(y, minlength=10) / len(y) for _, y in clients_np(split.train)]
        return np.std(freqs, axis=0).mean()

    assert label_spread(iid_split) < 0.5 * label_spread(small_split)


def test_non_iid_clients_have_distinct_models_and_heterogeneity_grows_with_alpha():
    def spread_of_model_means(alpha):
        w, _, _ = client_models_np(6, 200, alpha=alpha, beta=0.0)
        return np.std(w.mean(axis=(1, 2)))

    # mean(W_k) = u_k + N(0, 1/600): std ~ sqrt(alpha^2 + 1/600).
    assert spread_of_model_means(0.0) < 0.06
    assert 0.8 < spread_of_model_means(1.0) < 1.2
    w, _, v = client_models_np(6, 2, alpha=1.0, beta=1.0)
    assert not np.allclose(w[0], w[1]) and not np.allclose(v[0], v[1])


def test_deterministic_in_seed():
    a = synthetic_fedprox(NUM_CLIENTS, seed=7, **NON_IID)
    b = synthetic_fedprox(NUM_CLIENTS, seed=7, **NON_IID)
    c = synthetic_fedprox(NUM_CLIENTS, seed=8, **NON_IID)
    np.testing.assert_array_equal(np.asarray(a.train.x), np.asarray(b.train.x))
    assert not np.array_equal(np.asarray(a.train.x)[:, :45], np.asarray(c.train.x)[:, :45])
    key = synthetic_fedprox(NUM_CLIENTS, seed=jax.random.key(7), **NON_IID)
    np.testing.assert_array_equal(np.asarray(a.test.x), np.asarray(key.test.x))


def test_validation_names_field():
    with pytest.raises(ConfigError, match="alpha"):
        synthetic_fedprox(3, alpha=-1.0, beta=1.0, seed=0)
    with pytest.raises(ConfigError, match="beta"):
        synthetic_fedprox(3, alpha=1.0, beta=float("inf"), seed=0)
    with pytest.raises(ConfigError, match="num_clients"):
        synthetic_fedprox(0, alpha=1.0, beta=1.0, seed=0)
    with pytest.raises(ConfigError, match="test_fraction"):
        synthetic_fedprox(3, alpha=1.0, beta=1.0, seed=0, test_fraction=0.0)
    with pytest.raises(ConfigError, match="test_fraction"):
        synthetic_fedprox(3, alpha=1.0, beta=1.0, seed=0, min_examples=1, test_fraction=0.5)
    with pytest.raises(ConfigError, match="max_examples"):
        synthetic_fedprox(3, alpha=1.0, beta=1.0, seed=0, min_examples=50, max_examples=10)
    with pytest.raises(ConfigError, match="seed"):
        synthetic_fedprox(3, alpha=1.0, beta=1.0, seed=-3)
    with pytest.raises(ConfigError, match="seed"):
        synthetic_fedprox(3, alpha=1.0, beta=1.0, seed="zero")
    with pytest.raises(ConfigError, match="iid"):
        synthetic_fedprox(3, alpha=1.0, beta=1.0, seed=0, iid="yes")
