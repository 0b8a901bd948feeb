"""SCAFFOLD through the round agrees with a Python loop over clients, and keeps its state."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_sim import ConfigError, make_algorithm, make_model, make_round
from fedjax_sim.algorithms.scaffold import ScaffoldMessage, scaffold
from fedjax_sim.client_update import ClientConfig, make_local_update
from fedjax_sim.data.federated import ClientData
from fedjax_sim.poisoning import adversarial_client, malicious_by_permutation, sign_flip
from fedjax_sim.rounds import split_round_key
from fedjax_sim.sampling import FixedSizeSampler

from conftest import random_federated

NUM_CLIENTS, COHORT, LR = 20, 8, 0.2
MODEL = make_model("softmax", (5,), 3)


def _client(data, cid):
    return ClientData(x=data.x[cid], y=data.y[cid], mask=data.mask()[cid],
                      client_id=jnp.int32(cid))


def _np(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _row(tree, cid):
    """Client ``cid``'s slice of per-client state, as float64 NumPy."""
    return jax.tree.map(lambda s: np.asarray(s[cid], np.float64), tree)


def _scaled(tree, scale):
    return jax.tree.map(lambda a: scale * a, tree)


def _mean(trees, weights):
    w = np.asarray(weights, np.float64) / np.sum(weights)
    return jax.tree.map(lambda *a: np.tensordot(w, np.stack(a), axes=1), *trees)


def _honest(cid):
    del cid
    return False


@functools.cache
def _jitted_local_update(epochs, batch, weighting):
    return jax.jit(make_local_update(MODEL, ClientConfig(
        optimizer=optax.sgd(LR), local_epochs=epochs, batch_size=batch,
        weighting=weighting)))


def reference_round(data, params, control, controls, round_key, ids, *, epochs, batch,
                    weighting, server_lr, malicious=_honest):
    """SCAFFOLD option II, one jitted client at a time, aggregation in NumPy.

    ``controls`` maps a client id to its c_i (NumPy pytrees); returns new params, c and
    the sampled clients' new c_i. Malicious clients send their negated upload.
    """
    local = _jitted_local_update(epochs, batch, weighting)
    _, client_key = split_round_key(round_key)
    new_controls, dys, dcs, weights = {}, [], [], []
    for cid in ids:
        c_i = controls[cid]
        correction = jax.tree.map(lambda c, ci: (c - ci).astype(np.float32), control, c_i)
        out = local(params, _client(data, cid), jax.random.fold_in(client_key, cid),
                    correction)
        inv = 1.0 / (float(out.metrics["num_steps"]) * LR)  # 1 / (K eta_l)
        # c_i+ = c_i - c + (x - y_i) / (K eta_l)
        c_new = jax.tree.map(np.subtract, c_i, control)
        c_new = jax.tree.map(np.add, c_new, _scaled(_np(out.delta), -inv))
        sign = -1.0 if malicious(cid) else 1.0
        dys.append(_scaled(_np(out.delta), sign))
        dcs.append(_scaled(jax.tree.map(np.subtract, c_new, c_i), sign))
        weights.append(float(out.weight))
        new_controls[cid] = c_new
    new_params = jax.tree.map(np.add, _np(params), _scaled(_mean(dys, weights), server_lr))
    new_control = jax.tree.map(np.add, control,
                               _scaled(_mean(dcs, weights), len(ids) / NUM_CLIENTS))
    return new_params, new_control, new_controls


def _setup(*, epochs=2, batch=3, weighting="uniform", server_lr=1.0, malicious=None):
    """Data, the algorithm and its round (cohort 8 in two chunks of 4)."""
    data = random_federated(num_clients=NUM_CLIENTS, max_examples=8, min_count=1, seed=7)
    alg = scaffold(MODEL, client_lr=LR, local_epochs=epochs,
                   batch_size=batch, server_lr=server_lr, weighting=weighting)
    if malicious is not None:
        alg = alg.with_client(adversarial_client(alg.client, sign_flip(1.0), malicious))
    fr = make_round(alg, FixedSizeSampler(NUM_CLIENTS, COHORT), chunk_size=4)
    assert fr.chunk_size < COHORT
    return data, alg, fr


def _check_against_reference(fr, data, *, rounds=2, malicious=_honest, **kw):
    """Runs ``rounds`` rounds of the engine and of :func:`reference_round` side by side:
    params, c and every client's c_i agree after each."""
    state = fr.init(jax.random.key(0))
    params, control = _np(state.params), _np(state.server.control)
    controls = {c: _row(state.client_states, c) for c in range(NUM_CLIENTS)}
    for r in range(rounds):
        key = jax.random.key(10 + r)
        state, out = fr.step(state, data, key)
        ids = [int(i) for i in out.client_ids]
        assert len(set(ids)) == COHORT and min(ids) >= 0
        params, control, new = reference_round(data, params, control, controls, key, ids,
                                               malicious=malicious, **kw)
        controls.update(new)
        assert int(out.metrics["num_aggregated"]) == COHORT
        chex.assert_trees_all_close(_np(state.params), params, atol=2e-5, rtol=1e-5)
        chex.assert_trees_all_close(_np(state.server.control), control, atol=2e-5,
                                    rtol=1e-5)
        for cid in range(NUM_CLIENTS):  # the sampled ones updated, the others unchanged
            chex.assert_trees_all_close(_row(state.client_states, cid), controls[cid],
                                        atol=2e-5, rtol=1e-5)
    return state


@pytest.mark.parametrize("weighting,server_lr", [("uniform", 1.0), ("examples", 0.7)])
def test_round_equals_python_loop(weighting, server_lr):
    kw = {"epochs": 2, "batch": 3, "weighting": weighting, "server_lr": server_lr}
    data, _, fr = _setup(**kw)
    state = _check_against_reference(fr, data, **kw)
    assert float(jnp.abs(state.server.control["Dense_0"]["kernel"]).sum()) > 0


def test_unsampled_clients_keep_their_control_variate_bit_for_bit():
    data, _, fr = _setup()
    state, _ = fr.step(fr.init(jax.random.key(0)), data, jax.random.key(1))
    before = jax.tree.map(np.asarray, state.client_states)
    state, out = fr.step(state, data, jax.random.key(2))
    sampled = set(np.asarray(out.client_ids).tolist())
    kept = np.asarray([c for c in range(NUM_CLIENTS) if c not in sampled])
    changed = np.asarray(sorted(sampled))
    after = jax.tree.map(np.asarray, state.client_states)
    # Some kept rows are nonzero (sampled in round 1), so this is not only zeros == zeros.
    assert any(np.abs(b[kept]).sum() > 0 for b in jax.tree.leaves(before))
    for b, a in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a[kept], b[kept])
        assert not np.array_equal(a[changed], b[changed])
    # Uniform weights, no empty client: c = (1/N) sum over ALL clients of c_i, always.
    chex.assert_trees_all_close(
        state.server.control, jax.tree.map(lambda s: s.mean(axis=0), state.client_states),
        atol=1e-6, rtol=1e-5)


def test_c_stays_the_mean_of_every_c_i_with_empty_clients():
    """A client without examples uploads zeros with weight 0; the server counts only the
    clients that contributed, so c = (1/N) sum_i c_i still holds exactly."""
    data = random_federated(num_clients=NUM_CLIENTS, max_examples=8, min_count=0, seed=11)
    assert int(np.sum(np.asarray(data.counts) == 0)) >= 2
    fr = make_round(scaffold(MODEL, client_lr=LR, local_epochs=2, batch_size=3),
                    FixedSizeSampler(NUM_CLIENTS, NUM_CLIENTS), chunk_size=8)
    state = fr.init(jax.random.key(0))
    for r in range(2):
        state, out = fr.step(state, data, jax.random.key(20 + r))
    assert int(out.metrics["num_aggregated"]) == NUM_CLIENTS  # empty clients included
    chex.assert_trees_all_close(
        state.server.control, jax.tree.map(lambda s: s.mean(axis=0), state.client_states),
        atol=1e-6, rtol=1e-5)


def test_nonfinite_client_is_not_aggregated_and_keeps_its_control_variate():
    data, _, fr = _setup()
    key = jax.random.key(3)
    state0, _ = fr.step(fr.init(jax.random.key(0)), data, jax.random.key(1))
    _, probe = fr.step(state0, data, key)  # the cohort of round ``key``
    ids = [int(i) for i in probe.client_ids]
    bad = ids[2]
    state, out = fr.step(state0, data.replace(x=data.x.at[bad].set(jnp.nan)), key)
    np.testing.assert_array_equal(out.client_ids, ids)
    assert int(out.metrics["num_nonfinite"]) == 1
    assert int(out.metrics["num_aggregated"]) == COHORT - 1
    for b, a in zip(jax.tree.leaves(state0.client_states),
                    jax.tree.leaves(state.client_states)):
        np.testing.assert_array_equal(np.asarray(a[bad]), np.asarray(b[bad]))
    # The round is SCAFFOLD over the finite clients (n = 7 in the control step).
    good = [c for c in ids if c != bad]
    params, control, new = reference_round(
        data, _np(state0.params), _np(state0.server.control),
        {c: _row(state0.client_states, c) for c in good}, key, good,
        epochs=2, batch=3, weighting="uniform", server_lr=1.0)
    chex.assert_trees_all_close(_np(state.params), params, atol=2e-5, rtol=1e-5)
    chex.assert_trees_all_close(_np(state.server.control), control, atol=2e-5, rtol=1e-5)
    for c in good:
        chex.assert_trees_all_close(_row(state.client_states, c), new[c], atol=2e-5,
                                    rtol=1e-5)


def test_one_step_first_round_is_fedavg_and_c_i_is_the_client_gradient():
    """With c = c_i = 0 and one full-batch local step the correction is zero, so the
    first round's params are FedAvg's, and c_i+ = (x - y_i) / lr = grad f_i(x)."""
    data = random_federated(num_clients=NUM_CLIENTS, max_examples=8, min_count=1, seed=7)
    sampler = FixedSizeSampler(NUM_CLIENTS, COHORT)
    kw = {"client_lr": LR, "local_epochs": 1, "batch_size": None, "weighting": "uniform"}
    sc = make_round(scaffold(MODEL, **kw), sampler, chunk_size=4)
    fa = make_round(make_algorithm("fedavg", MODEL, **kw), sampler, chunk_size=4)
    key = jax.random.key(5)
    s_state, out = sc.step(sc.init(jax.random.key(0)), data, key)
    f_state, _ = fa.step(fa.init(jax.random.key(0)), data, key)
    chex.assert_trees_all_close(s_state.params, f_state.params, atol=1e-6, rtol=1e-6)
    x = sc.init(jax.random.key(0)).params

    @jax.jit
    def grad(p, xs, ys, m):  # the client's mean loss over its real examples
        return jax.grad(lambda q: jnp.sum(MODEL.per_example_loss(q, xs, ys) * m)
                        / jnp.sum(m))(p)

    grads = []
    for cid in np.asarray(out.client_ids):
        g = grad(x, data.x[cid], data.y[cid], data.mask()[cid].astype(jnp.float32))
        chex.assert_trees_all_close(_row(s_state.client_states, cid), _np(g), atol=2e-5,
                                    rtol=1e-4)
        grads.append(_np(g))
    # c = (M / N) * mean_i grad f_i(x) = (1/N) sum_i c_i.
    expected_c = jax.tree.map(lambda *g: sum(g) / NUM_CLIENTS, *grads)
    chex.assert_trees_all_close(_np(s_state.server.control), expected_c, atol=2e-5,
                                rtol=1e-4)


def test_sign_flip_adversary_negates_both_parts_of_the_upload():
    is_malicious = malicious_by_permutation(NUM_CLIENTS, 5, seed=1)
    malicious = {c for c in range(NUM_CLIENTS) if bool(is_malicious(jnp.int32(c)))}
    assert len(malicious) == 5
    data, alg, fr = _setup(malicious=is_malicious)
    # The round: SCAFFOLD where the malicious clients send -(delta_y, delta_c).
    _check_against_reference(fr, data, malicious=malicious.__contains__, epochs=2, batch=3,
                             weighting="uniform", server_lr=1.0)
    # One client's program: the malicious upload is the honest one negated, both parts,
    # and the client's own new c_i is the honest one (the attack rewrites the upload).
    honest = scaffold(MODEL, client_lr=LR, local_epochs=2,
                      batch_size=3).client
    params = MODEL.init(jax.random.key(0))
    message = ScaffoldMessage(params, jax.tree.map(lambda p: jnp.full_like(p, 0.01), params))
    c_i = jax.tree.map(lambda p: jnp.full_like(p, -0.02), params)
    honest_update, attacked_update = jax.jit(honest.update), jax.jit(alg.client.update)
    for cid in range(NUM_CLIENTS):
        key = jax.random.key(cid)
        h = honest_update(message, _client(data, cid), key, c_i)
        a = attacked_update(message, _client(data, cid), key, c_i)
        sign = -1.0 if cid in malicious else 1.0
        chex.assert_trees_all_close(a.upload.delta_params,
                                    _scaled(h.upload.delta_params, sign))
        chex.assert_trees_all_close(a.upload.delta_control,
                                    _scaled(h.upload.delta_control, sign))
        chex.assert_trees_all_close(a.state, h.state)


def test_client_state_over_budget_is_refused_naming_the_bytes():
    alg = scaffold(MODEL, client_lr=LR, local_epochs=1,
                   batch_size=None)
    need = NUM_CLIENTS * (5 * 3 + 3) * 4  # one float32 c_i (kernel + bias) per client
    with pytest.raises(ConfigError, match=rf"^client_state=.*needs {need} bytes"):
        make_round(alg, FixedSizeSampler(NUM_CLIENTS, COHORT),
                   client_state_budget_bytes=need - 1)
    make_round(alg, FixedSizeSampler(NUM_CLIENTS, COHORT), client_state_budget_bytes=need)


def test_empty_client_keeps_c_i_and_uploads_zeros():
    """K = 0 (no examples, no local step): no division by zero, c_i kept, zero upload."""
    alg = scaffold(MODEL, client_lr=LR, local_epochs=2, batch_size=2)
    data = random_federated(num_clients=4, max_examples=6, min_count=1, seed=3)
    params = MODEL.init(jax.random.key(0))
    c_i = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
    message = ScaffoldMessage(params, jax.tree.map(jnp.zeros_like, params))
    client = _client(data, 1).replace(mask=jnp.zeros((6,), bool))
    out = jax.jit(alg.client.update)(message, client, jax.random.key(1), c_i)
    assert float(out.weight) == 0.0 and float(out.metrics["num_steps"]) == 0.0
    for leaf in jax.tree.leaves(out.upload):
        np.testing.assert_array_equal(leaf, 0.0)
    for a, b in zip(jax.tree.leaves(out.state), jax.tree.leaves(c_i)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("field,value", [
    ("client_momentum", 0.9), ("client_lr", 0.0), ("server_lr", -1.0),
    ("weighting", "clients"), ("local_epochs", 0), ("batch_size", 0),
])
def test_bad_settings_are_refused_in_one_line(field, value):
    args = {"client_lr": LR, "local_epochs": 1,
            "batch_size": None, field: value}
    with pytest.raises(ConfigError, match=rf"^{field}=") as err:
        scaffold(MODEL, **args)
    assert "\n" not in str(err.value)
