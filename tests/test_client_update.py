"""The one-client update agrees with a plain NumPy SGD loop and honours masks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_sim._trees import all_finite
from fedjax_sim._validation import ConfigError
from fedjax_sim.algorithms import local_training_client
from fedjax_sim.client_update import ClientConfig, epoch_order, make_local_update
from fedjax_sim.data.federated import ClientData
from fedjax_sim.models import make_model
from fedjax_sim.rounds import engine_client

from conftest import random_federated


def numpy_local_sgd(w, b, x, y, orders, *, lr, batch_size, mu=0.0):
    """Reference: mini-batch SGD on softmax regression with hand-written gradients."""
    w0, b0 = w.copy(), b.copy()
    w, b = w.astype(np.float64), b.astype(np.float64)
    n = len(y)
    losses = []
    for order in orders:
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            xb, yb = x[idx].astype(np.float64), y[idx]
            logits = xb @ w + b
            logits -= logits.max(1, keepdims=True)
            p = np.exp(logits)
            p /= p.sum(1, keepdims=True)
            losses.extend(-np.log(p[np.arange(len(yb)), yb]))
            g = p.copy()
            g[np.arange(len(yb)), yb] -= 1.0
            g /= len(yb)
            gw = xb.T @ g + mu * (w - w0)
            gb = g.sum(0) + mu * (b - b0)
            w, b = w - lr * gw, b - lr * gb
    return w - w0, b - b0, float(np.mean(losses)) if losses else 0.0


def _client(data, k):
    return ClientData(x=data.x[k], y=data.y[k], mask=data.mask()[k],
                      client_id=jnp.int32(k))


@pytest.mark.parametrize("epochs,batch_size,mu", [(1, 4, 0.0), (3, 3, 0.0), (2, 5, 0.5),
                                                  (1, None, 0.0)])
def test_matches_numpy_sgd(epochs, batch_size, mu):
    data = random_federated(num_clients=6, max_examples=11, min_count=1, seed=1)
    model = make_model("softmax", (5,), 3)
    params = model.init(jax.random.key(0))
    cfg = ClientConfig(optax.sgd(0.3), local_epochs=epochs, batch_size=batch_size,
                       prox_mu=mu)
    # The client as the engine runs it: FedAvg's program (make_local_update's delta as the
    # upload) plus the engine's finite flag and upload norm.
    update = jax.jit(engine_client(local_training_client(model, cfg)))
    for k in range(data.num_clients):
        client = _client(data, k)
        key = jax.random.key(100 + k)
        out = update(params, client, key, ())
        n = int(data.counts[k])
        orders = [np.asarray(epoch_order(key, client.mask, e))[:n] for e in range(epochs)]
        x, y = data.client(k)
        dw, db, loss = numpy_local_sgd(
            np.asarray(params["Dense_0"]["kernel"]), np.asarray(params["Dense_0"]["bias"]),
            x, y, orders, lr=0.3, batch_size=batch_size or data.max_examples, mu=mu)
        np.testing.assert_allclose(out.upload["Dense_0"]["kernel"], dw, atol=2e-5)
        np.testing.assert_allclose(out.upload["Dense_0"]["bias"], db, atol=2e-5)
        np.testing.assert_allclose(out.metrics["train_loss"], loss, rtol=1e-4)
        np.testing.assert_allclose(out.metrics["update_norm"],
                                   np.sqrt((dw ** 2).sum() + (db ** 2).sum()), rtol=1e-4,
                                   atol=1e-6)
        assert float(out.weight) == n
        assert bool(out.finite)
        assert out.client_state == ()
        steps = epochs * -(-n // (batch_size or data.max_examples))
        assert float(out.metrics["num_steps"]) == steps


def test_padding_examples_change_nothing():
    """The same client padded to a larger size yields the same delta."""
    data = random_federated(num_clients=1, max_examples=7, min_count=7, seed=2)
    model = make_model("mlp", (5,), 3, hidden=(8,))
    params = model.init(jax.random.key(1))
    cfg = ClientConfig(optax.adam(0.05), local_epochs=2, batch_size=3)
    # One function: the padded size is read from the data's static shape (7, then 13).
    small = big = make_local_update(model, cfg)
    client = _client(data, 0)
    # Random junk in the padding must not matter either.
    junk = jax.random.normal(jax.random.key(9), (6, 5)) * 1e3
    padded = ClientData(x=jnp.concatenate([client.x, junk]),
                        y=jnp.concatenate([client.y, jnp.full((6,), 2, jnp.int32)]),
                        mask=jnp.concatenate([client.mask, jnp.zeros(6, bool)]),
                        client_id=client.client_id)
    key = jax.random.key(3)
    a = small(params, client, key)
    b = big(params, padded, key)
    for da, db in zip(jax.tree.leaves(a.delta), jax.tree.leaves(b.delta)):
        np.testing.assert_allclose(da, db, atol=1e-6)
    np.testing.assert_allclose(a.metrics["train_loss"], b.metrics["train_loss"], rtol=1e-6)
    assert float(b.weight) == 7.0
    assert float(a.metrics["num_steps"]) == float(b.metrics["num_steps"]) == 6.0


def test_empty_client_returns_zero_delta_and_weight():
    data = random_federated(num_clients=1, max_examples=5, seed=3)
    model = make_model("softmax", (5,), 3)
    params = model.init(jax.random.key(0))
    cfg = ClientConfig(optax.sgd(0.1, momentum=0.9), local_epochs=2, batch_size=2)
    client = ClientData(x=data.x[0], y=data.y[0], mask=jnp.zeros(5, bool),
                        client_id=jnp.int32(0))
    out = make_local_update(model, cfg)(params, client, jax.random.key(0))
    assert float(out.weight) == 0.0
    assert float(out.metrics["num_steps"]) == 0.0
    assert all(float(jnp.abs(d).max()) == 0.0 for d in jax.tree.leaves(out.delta))


def test_uniform_weighting():
    data = random_federated(num_clients=1, max_examples=5, min_count=3, seed=4)
    model = make_model("softmax", (5,), 3)
    cfg = ClientConfig(optax.sgd(0.1), weighting="uniform", batch_size=2)
    out = make_local_update(model, cfg)(model.init(jax.random.key(0)), _client(data, 0),
                                        jax.random.key(0))
    assert float(out.weight) == 1.0


def test_nonfinite_update_is_flagged():
    data = random_federated(num_clients=1, max_examples=5, min_count=5, seed=5)
    model = make_model("softmax", (5,), 3)
    cfg = ClientConfig(optax.sgd(1e38), batch_size=5)
    client = _client(data, 0)
    client = client.replace(x=client.x * 1e30)
    params = model.init(jax.random.key(0))
    out = make_local_update(model, cfg)(params, client, jax.random.key(0))
    assert not bool(all_finite(out.delta))
    # The engine computes the flag (the one place uploads are checked).
    engine = engine_client(local_training_client(model, cfg))(params, client,
                                                              jax.random.key(0), ())
    assert not bool(engine.finite)


@pytest.mark.parametrize("n", [7, 256, 300])  # packed-word sort and (key, index) argsort
def test_epoch_order_puts_real_examples_first(n):
    rng = np.random.default_rng(n)
    for trial in range(5):
        mask = jnp.asarray(rng.random(n) < 0.6)
        order = np.asarray(epoch_order(jax.random.key(trial), mask, trial))
        real = np.flatnonzero(np.asarray(mask))
        assert sorted(order) == list(range(n))
        assert sorted(order[:len(real)]) == list(real)
        np.testing.assert_array_equal(order[len(real):], np.flatnonzero(~np.asarray(mask)))


def test_epoch_order_is_the_sort_of_the_clients_threefry_stream():
    """Reference: a NumPy lexsort of the documented key, from JAX's own Threefry."""
    from jax.extend.random import threefry_2x32
    key = jax.random.key(11)
    for n, epoch in [(50, 0), (50, 3), (129, 1), (400, 2)]:
        mask = np.arange(n) < n - 5
        k = jax.random.key_data(key)
        counters = np.concatenate([np.arange(n), np.full(n, epoch)]).astype(np.uint32)
        bits = np.asarray(threefry_2x32(k, jnp.asarray(counters)))[:n]
        width = max(1, (n - 1).bit_length())
        kept = bits >> (width + 1) if n <= 256 else bits >> 1
        primary = np.where(mask, kept, np.uint64(2**32))  # padding after every real slot
        ref = np.lexsort((np.arange(n), primary))
        np.testing.assert_array_equal(np.asarray(epoch_order(key, jnp.asarray(mask), epoch)),
                                      ref)


def test_epoch_order_is_uniform_over_permutations_and_fresh_every_epoch():
    """Chi-square over the 24 orders of 4 real examples (plus padding), 4,800 draws."""
    from scipy import stats
    mask = jnp.asarray([True, True, False, True, True, False])
    keys = jax.random.split(jax.random.key(5), 2400)
    orders = np.asarray(jax.vmap(lambda k: jax.vmap(
        lambda e: epoch_order(k, mask, e))(jnp.arange(2)))(keys))  # [2400, 2, 6]
    codes = [tuple(o[:4]) for o in orders.reshape(-1, 6)]
    counts = np.unique(np.asarray(codes), axis=0, return_counts=True)[1]
    assert len(counts) == 24
    assert stats.chisquare(counts).pvalue > 1e-3
    # Two epochs of one client: independent orders agree only by chance (1/24).
    same = np.mean([tuple(o[0, :4]) == tuple(o[1, :4]) for o in orders])
    assert same < 0.08


@pytest.mark.parametrize("field,kwargs", [
    ("local_epochs", {"local_epochs": 0}),
    ("batch_size", {"batch_size": -1}),
    ("prox_mu", {"prox_mu": -0.1}),
    ("weighting", {"weighting": "votes"}),
    ("optimizer", {"optimizer": "sgd"}),
])
def test_config_validation(field, kwargs):
    args = {"optimizer": optax.sgd(0.1)} | kwargs
    with pytest.raises(ConfigError, match=field):
        ClientConfig(**args)
