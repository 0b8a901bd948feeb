"""Models build and validate; evaluation agrees with a NumPy computation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_sim._validation import ConfigError
from fedjax_sim.evaluation import (evaluate_clients, make_central_evaluator,
                                   per_client_metrics)
from fedjax_sim.models import make_model, per_example_cross_entropy

from conftest import random_federated


@pytest.mark.parametrize("name,shape", [("softmax", (6,)), ("mlp", (4, 4, 1)),
                                        ("cnn", (8, 8, 1))])
def test_models_produce_logits(name, shape):
    model = make_model(name, shape, 7)
    params = model.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (5,) + shape)
    assert model.apply(params, x).shape == (5, 7)
    per = model.per_example_metrics(params, x, jnp.arange(5))
    assert per["loss"].shape == (5,) and per["accuracy"].shape == (5,)


@pytest.mark.parametrize("args,field", [(("rnn", (3,), 2), "model"),
                                        (("mlp", (3,), 1), "num_classes"),
                                        (("cnn", (8, 8), 3), "example_shape"),
                                        (("softmax", (0,), 3), "example_shape")])
def test_model_validation(args, field):
    with pytest.raises(ConfigError, match=field):
        make_model(*args)


def _numpy_metrics(model, params, x, y):
    logits = np.asarray(model.apply(params, jnp.asarray(x)), np.float64)
    logz = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    loss = logz - logits[np.arange(len(y)), y]
    return loss, (logits.argmax(1) == y).astype(float)


def test_central_evaluator_matches_numpy():
    model = make_model("mlp", (5,), 3, hidden=(7,))
    params = model.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1003, 5)).astype(np.float32)
    y = rng.integers(0, 3, 1003)
    got = make_central_evaluator(model, batch_size=100)(params, x, y)
    loss, acc = _numpy_metrics(model, params, x, y)
    assert got["num_examples"] == 1003
    np.testing.assert_allclose(got["loss"], loss.mean(), rtol=1e-5)
    np.testing.assert_allclose(got["accuracy"], acc.mean(), rtol=1e-6)


def test_per_client_evaluation_both_aggregates():
    data = random_federated(num_clients=9, max_examples=8, seed=3)
    model = make_model("softmax", (5,), 3)
    params = model.init(jax.random.key(2))
    clients = data.cohort_data(jnp.arange(9))
    summary = evaluate_clients(model, params, clients, chunk_size=4)
    per = per_client_metrics(model, params, clients, chunk_size=4)
    losses, accs, ns = [], [], []
    for k in range(9):
        x, y = data.client(k)
        ns.append(len(y))
        if len(y):
            loss, acc = _numpy_metrics(model, params, x, y)
            losses.append(loss.mean())
            accs.append(acc.mean())
            np.testing.assert_allclose(per["accuracy"][k], acc.mean(), rtol=1e-6)
    ns = np.array(ns)
    pooled_x, pooled_y = data.pooled()
    _, pooled_acc = _numpy_metrics(model, params, pooled_x, pooled_y)
    np.testing.assert_allclose(summary["accuracy_example_weighted"], pooled_acc.mean(),
                               rtol=1e-5)
    np.testing.assert_allclose(summary["accuracy_client_averaged"], np.mean(accs), rtol=1e-5)
    np.testing.assert_allclose(summary["loss_client_averaged"], np.mean(losses), rtol=1e-5)
    assert summary["num_clients"] == int((ns > 0).sum())


@pytest.mark.parametrize("rounding", [None, 0, 1])  # rounded logits: many exact ties
def test_cross_entropy_and_correctness_match_optax_and_argmax(rounding):
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(2000, 7)).astype(np.float32) * 2
    if rounding is not None:
        logits = np.round(logits, rounding)
    logits[:7] = 0.0  # all classes tied: argmax says class 0
    labels = rng.integers(0, 7, 2000)
    labels[:7] = np.arange(7)
    loss, correct = per_example_cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
    np.testing.assert_allclose(
        loss, optax.softmax_cross_entropy_with_integer_labels(logits, labels), rtol=1e-6,
        atol=1e-6)
    np.testing.assert_array_equal(correct, logits.argmax(-1) == labels)
    assert correct[:7].tolist() == [True] + [False] * 6
    grad = jax.grad(lambda z: per_example_cross_entropy(z, labels)[0].sum())(logits)
    ref = jax.grad(lambda z: optax.softmax_cross_entropy_with_integer_labels(z, labels).sum())(
        logits)
    np.testing.assert_allclose(grad, ref, rtol=1e-6, atol=1e-7)


def test_cross_entropy_flags_labels_out_of_range():
    logits = jnp.zeros((3, 4))
    loss, correct = per_example_cross_entropy(logits, jnp.array([-1, 4, 2]))
    assert np.isnan(loss[0]) and np.isnan(loss[1]) and np.isfinite(loss[2])
    assert correct.tolist() == [False, False, False]
