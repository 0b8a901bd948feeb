"""The procedural label-skew population: deterministic, masked, skewed as configured."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sim._validation import ConfigError
from fedjax_sim.data.label_skew import procedural_label_skew


@pytest.fixture(scope="module")
def gen():
    return jax.jit(lambda pop, ids: pop.cohort_data(ids))


def test_same_client_same_data_and_padding_clients_are_empty(gen):
    pop = procedural_label_skew(10_000_000, alpha=0.3, seed=1)
    a = gen(pop, jnp.array([5, 9_999_999, -1]))
    b = gen(pop, jnp.array([9_999_999, 5, 7]))
    np.testing.assert_array_equal(a.x[0], b.x[1])
    np.testing.assert_array_equal(a.y[1], b.y[0])
    assert not bool(a.mask[2].any()) and int(a.client_id[2]) == -1
    assert float(jnp.abs(a.x[2]).max()) == 0.0
    counts = np.asarray(a.mask.sum(1))
    assert np.all(counts[:2] >= pop.min_examples) and np.all(counts <= pop.max_examples)


@pytest.mark.slow
def test_label_skew_grows_as_alpha_shrinks(gen):
    def mean_entropy(alpha):
        pop = procedural_label_skew(1000, alpha=alpha, seed=2, max_examples=64,
                                    min_examples=64)
        d = gen(pop, jnp.arange(300))
        ent = []
        for y in np.asarray(d.y):
            p = np.bincount(y, minlength=10) / len(y)
            ent.append(-(p[p > 0] * np.log(p[p > 0])).sum())
        return np.mean(ent)

    assert mean_entropy(0.1) < mean_entropy(1.0) < mean_entropy(100.0)
    assert mean_entropy(100.0) > 0.9 * np.log(10)


def test_examples_follow_the_class_means():
    pop = procedural_label_skew(100, alpha=1.0, seed=3, dim=4, num_classes=3,
                                max_examples=64, min_examples=64)
    d = jax.jit(pop.cohort_data)(jnp.arange(100))
    x, y = np.asarray(d.x).reshape(-1, 4), np.asarray(d.y).ravel()
    mu = np.asarray(pop.class_means())
    for c in range(3):
        resid = x[y == c] - mu[c]
        assert np.abs(resid.mean(0)).max() < 0.1
        assert np.abs(resid.var(0) - 1).max() < 0.15


def test_test_data_is_independent_but_same_mixture():
    pop = procedural_label_skew(50, alpha=0.2, seed=4, max_examples=64, min_examples=64)
    tr = jax.jit(pop.cohort_data)(jnp.arange(50))
    te = jax.jit(pop.test_data)(jnp.arange(50))
    assert not np.allclose(tr.x, te.x)
    np.testing.assert_array_equal(tr.mask, te.mask)
    # Dominant class of each client agrees between train and test in most clients.
    agree = [np.bincount(a, minlength=10).argmax() == np.bincount(b, minlength=10).argmax()
             for a, b in zip(np.asarray(tr.y), np.asarray(te.y))]
    assert np.mean(agree) > 0.8


@pytest.mark.parametrize("kwargs,field", [({"alpha": 0.0}, "alpha"),
                                          ({"alpha": 1.0, "num_clients": 0}, "num_clients"),
                                          ({"alpha": 1.0, "min_examples": 100}, "min_examples"),
                                          ({"alpha": 1.0, "separation": -1.0}, "separation")])
def test_validation(kwargs, field):
    args = {"num_clients": 10, "seed": 0} | kwargs
    with pytest.raises(ConfigError, match=field):
        procedural_label_skew(**args)
