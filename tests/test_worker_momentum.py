"""Worker momentum through the round agrees with the recursion run in a Python loop."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sim import ConfigError, make_algorithm, make_model, make_round
from fedjax_sim.algorithms import WorkerMomentumState, with_worker_momentum
from fedjax_sim.algorithms.scaffold import scaffold
from fedjax_sim.data.federated import ClientData
from fedjax_sim.rounds import split_round_key
from fedjax_sim.sampling import FixedSizeSampler

from conftest import random_federated

NUM_CLIENTS, COHORT, BETA, SERVER_LR = 20, 8, 0.8, 0.5
MODEL = make_model("softmax", (5,), 3)
KW = {"client_lr": 0.2, "local_epochs": 2, "batch_size": 3}


def _data():
    return random_federated(num_clients=NUM_CLIENTS, max_examples=8, min_count=1, seed=4)


def _np(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _row(tree, cid):
    return jax.tree.map(lambda s: np.asarray(s[cid], np.float64), tree)


def _mean(trees, weights):
    w = np.asarray(weights, np.float64) / np.sum(weights)
    return jax.tree.map(lambda *a: np.tensordot(w, np.stack(a), axes=1), *trees)


def test_two_rounds_equal_the_recursion_in_a_python_loop():
    data = _data()
    fedavg = make_algorithm("fedavg", MODEL, server_lr=SERVER_LR, **KW)
    alg = fedavg.with_client(with_worker_momentum(fedavg.client, BETA))
    fr = make_round(alg, FixedSizeSampler(NUM_CLIENTS, COHORT), chunk_size=4)
    state = fr.init(jax.random.key(0))
    assert isinstance(state.client_states, WorkerMomentumState)
    assert state.client_states.inner == ()
    plain_update = jax.jit(fedavg.client.update)  # the wrapped program, one client
    params = _np(state.params)
    momentum = {c: _row(state.client_states.momentum, c) for c in range(NUM_CLIENTS)}
    mask = data.mask()
    for r in range(2):
        key = jax.random.key(20 + r)
        sent_params = state.params
        state, out = fr.step(state, data, key)
        ids = [int(i) for i in out.client_ids]
        _, client_key = split_round_key(key)
        uploads, weights = [], []
        for cid in ids:
            client = ClientData(x=data.x[cid], y=data.y[cid], mask=mask[cid],
                                client_id=jnp.int32(cid))
            u = plain_update(sent_params, client, jax.random.fold_in(client_key, cid), ())
            momentum[cid] = jax.tree.map(lambda a, m: (1 - BETA) * a + BETA * m,
                                         _np(u.upload), momentum[cid])
            uploads.append(momentum[cid])
            weights.append(float(u.weight))
        params = jax.tree.map(lambda p, d: p + SERVER_LR * d, params,
                              _mean(uploads, weights))
        chex.assert_trees_all_close(_np(state.params), params, atol=2e-5, rtol=1e-5)
        for cid in range(NUM_CLIENTS):
            chex.assert_trees_all_close(_row(state.client_states.momentum, cid),
                                        momentum[cid], atol=2e-5, rtol=1e-5)


def test_unsampled_clients_keep_their_momentum_bit_for_bit():
    data = _data()
    fedavg = make_algorithm("fedavg", MODEL, server_lr=SERVER_LR, **KW)
    alg = fedavg.with_client(with_worker_momentum(fedavg.client, BETA))
    fr = make_round(alg, FixedSizeSampler(NUM_CLIENTS, COHORT), chunk_size=4)
    state, _ = fr.step(fr.init(jax.random.key(0)), data, jax.random.key(1))
    before = jax.tree.map(np.asarray, state.client_states.momentum)
    state, out = fr.step(state, data, jax.random.key(2))
    sampled = set(np.asarray(out.client_ids).tolist())
    kept = np.asarray([c for c in range(NUM_CLIENTS) if c not in sampled])
    after = jax.tree.map(np.asarray, state.client_states.momentum)
    assert any(np.abs(b[kept]).sum() > 0 for b in jax.tree.leaves(before))
    for b, a in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a[kept], b[kept])


def test_beta_zero_is_the_plain_program_also_with_client_state():
    """beta = 0 on SCAFFOLD (a stateful program): same params, c and c_i as plain
    SCAFFOLD, and the momentum is the last upload; the inner state is composed."""
    data = _data()
    plain = scaffold(MODEL, **KW)
    wrapped = plain.with_client(with_worker_momentum(plain.client, 0.0))
    sampler = FixedSizeSampler(NUM_CLIENTS, COHORT)
    fr_plain = make_round(plain, sampler, chunk_size=4)
    fr_wrapped = make_round(wrapped, sampler, chunk_size=4)
    sp, sw = fr_plain.init(jax.random.key(0)), fr_wrapped.init(jax.random.key(0))
    for r in range(2):
        key = jax.random.key(30 + r)
        previous = sw.client_states.inner
        sp, _ = fr_plain.step(sp, data, key)
        sw, out = fr_wrapped.step(sw, data, key)
    chex.assert_trees_all_close(sw.params, sp.params, atol=1e-6, rtol=1e-6)
    chex.assert_trees_all_close(sw.server, sp.server, atol=1e-6, rtol=1e-6)
    chex.assert_trees_all_close(sw.client_states.inner, sp.client_states, atol=1e-6,
                                rtol=1e-6)
    # The last round's sampled clients hold their last upload; its control part is
    # c_i+ - c_i.
    ids = np.asarray(out.client_ids)
    sent = jax.tree.map(lambda new, old: new[ids] - old[ids], sw.client_states.inner,
                        previous)
    chex.assert_trees_all_close(
        jax.tree.map(lambda m: m[ids], sw.client_states.momentum.delta_control), sent,
        atol=1e-6, rtol=1e-6)
    assert float(jnp.abs(sent["Dense_0"]["kernel"]).sum()) > 0


@pytest.mark.parametrize("beta", [-0.1, 1.0, 1.5, float("nan")])
def test_beta_outside_zero_one_is_refused_in_one_line(beta):
    fedavg = make_algorithm("fedavg", MODEL, **KW)
    with pytest.raises(ConfigError, match=r"^beta="):
        with_worker_momentum(fedavg.client, beta)
