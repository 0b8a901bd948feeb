"""Honest-server attacks on real digits: closed form, iDLG/label counts, DLG, IG, vmapping."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sim._validation import ConfigError
from fedjax_sim.attacks import (InversionConfig, LocalTraining, closed_form_attack, dlg_attack,
                                evaluate_victims, inverting_gradients_attack,
                                label_count_accuracy, observe_victims, recover_labels,
                                simulate_update, victim_updates)
from fedjax_sim.attacks.inversion import victim_keys
from fedjax_sim.client_update import epoch_order
from fedjax_sim.data.digits import digits_train_test
from fedjax_sim.models import make_model
from fedjax_sim.server.base import per_client_l2_norms

SHAPE = (8, 8, 1)


@functools.lru_cache(maxsize=1)
def _digits():
    return digits_train_test(seed=0)


def _victims(num, batch, seed=0):
    train_x, train_y, _, _ = _digits()
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.choice(len(train_x), batch, replace=False) for _ in range(num)])
    return jnp.asarray(train_x[idx]), jnp.asarray(train_y[idx])


FEDSGD = LocalTraining(0.1)
FEDAVG = LocalTraining(0.05, local_epochs=3)  # several local steps


@functools.lru_cache(maxsize=None)
def _setup(name, num, batch, local=FEDSGD, seed=0):
    """Victims and their updates; cached, so tests share data and compiled functions."""
    model = make_model(name, SHAPE, 10, hidden=(64,))
    params = jax.jit(model.init)(jax.random.key(seed))
    x, y = _victims(num, batch, seed)
    ups = victim_updates(model, params, x, y, local, key=jax.random.key(seed + 1))
    return model, params, x, y, ups


def test_simulated_update_equals_engine_client_update():
    """2 epochs of 3 local steps: the simulation, fed the engine's epoch orders, agrees."""
    model = make_model("mlp", SHAPE, 10, hidden=(16,))
    params = jax.jit(model.init)(jax.random.key(0))
    x, y = _victims(2, 6)
    soft = jax.nn.one_hot(y, 10)
    local = LocalTraining(0.1, local_epochs=2, batch_size=2)
    ups = victim_updates(model, params, x, y, local, key=jax.random.key(3))
    one_epoch = LocalTraining(0.1, local_epochs=1, batch_size=2)
    simulate = jax.jit(lambda p, xs, ys: simulate_update(model, p, xs, ys, one_epoch))
    for v in range(2):
        key = jax.random.fold_in(jax.random.key(3), v)
        p = params
        for e in range(2):  # the engine reshuffles every epoch; simulate epoch by epoch
            order = epoch_order(key, jnp.ones((6,), bool), e)
            d = simulate(p, x[v][order], soft[v][order])
            p = jax.tree.map(jnp.add, p, d)
        sim = jax.tree.map(jnp.subtract, p, params)
        jax.tree.map(lambda a, b, v=v: np.testing.assert_allclose(a, b[v], atol=1e-6), sim, ups)


@pytest.mark.parametrize("name,local", [("mlp", FEDSGD), ("softmax", FEDSGD),
                                        ("mlp", FEDAVG)])
def test_closed_form_fc_recovery_batch1_exceeds_30db(name, local):
    _, _, x, _, ups = _setup(name, 50, 1, local)
    out = evaluate_victims(np.asarray(closed_form_attack(ups, SHAPE).inputs), x)
    assert out["psnr"] > 30.0
    assert out["exact_fraction"] == 1.0  # exact up to float32 rounding (max error < 1e-3)


def test_dlg_softmax_batch1_psnr_above_30db():
    model, params, x, y, ups = _setup("softmax", 50, 1)
    rec = dlg_attack(model, params, ups, LocalTraining(0.1), batch_size=1,
                     key=jax.random.key(7), config=InversionConfig(steps=300))
    out = evaluate_victims(np.asarray(rec.inputs), x, recon_labels=np.asarray(rec.labels),
                           true_labels=np.asarray(y))
    assert out["psnr"] > 30.0 and out["label_accuracy"] == 1.0


def test_idlg_recovers_every_batch1_label_fedsgd_and_fedavg():
    """50 victims with one example each, FedSGD and 3 local steps: every label."""
    _, _, public_x, _ = _digits()
    for local in (FEDSGD, FEDAVG):
        model, params, _, y, ups = _setup("mlp", 50, 1, local)
        labels = recover_labels(model, params, ups, jnp.asarray(public_x[:64]), batch_size=1,
                                learning_rate=local.learning_rate, num_steps=local.steps(1))
        np.testing.assert_array_equal(np.asarray(labels), np.asarray(y))


def test_label_counts_of_batches_from_bias_update():
    _, _, public_x, _ = _digits()
    model, params, _, y, ups = _setup("mlp", 16, 8)
    labels = np.asarray(recover_labels(model, params, ups, jnp.asarray(public_x[:256]),
                                       batch_size=8, learning_rate=0.1, num_steps=1))
    acc = np.mean([label_count_accuracy(labels[v], np.asarray(y[v])) for v in range(16)])
    assert acc >= 0.9


IG_TEST = InversionConfig(steps=200, learning_rate=0.1, restarts=2, tv_weight=1e-3,
                          signed=True, decay=True)


def _ig(model, params, ups, labels, key=None):
    return inverting_gradients_attack(model, params, ups, labels, LocalTraining(0.1),
                                      key=jax.random.key(5) if key is None else key,
                                      config=IG_TEST)


@pytest.mark.slow
def test_psnr_falls_as_client_batch_grows():
    """Inverting Gradients (true labels), mean over 50/16/4 victims: 1 > 8 > 32 in PSNR.

    The closed form falls from exact (batch 1) to mixtures (batch 8).
    """
    ig, cf = [], []
    for batch, victims in ((1, 50), (8, 16), (32, 4)):
        model, params, x, y, ups = _setup("mlp", victims, batch)
        rec = _ig(model, params, ups, y)
        ig.append(evaluate_victims(np.asarray(rec.inputs), x)["psnr"])
        if batch <= 8:
            rec = closed_form_attack(ups, SHAPE, num_reconstructions=batch)
            cf.append(evaluate_victims(np.asarray(rec.inputs), x)["psnr"])
    print("IG PSNR at batch 1/8/32:", ig, "closed form at 1/8:", cf)
    assert ig[0] > 30.0
    assert ig[0] > ig[1] + 3.0 > ig[2] + 6.0
    assert cf[0] > 60.0 and cf[1] < 25.0


def test_attacks_are_vmapped_same_as_loop_over_victims():
    """50 victims in one jitted call = each victim alone with its own key (IG, closed form)."""
    model, params, x, y, ups = _setup("mlp", 50, 1)
    keys = victim_keys(jax.random.key(3), 50)
    joint = _ig(model, params, ups, y, key=keys)
    cf_joint = closed_form_attack(ups, SHAPE)
    for v in (0, 17, 49):
        one = jax.tree.map(lambda u, v=v: u[v:v + 1], ups)
        alone = _ig(model, params, one, y[v:v + 1], key=keys[v:v + 1])
        # Tens of Adam steps amplify the last-bit differences between the batched and
        # the one-victim program (their reductions are tiled differently): up to ~1e-4
        # here, against differences of order 1 between two victims.
        np.testing.assert_allclose(alone.inputs[0], joint.inputs[v], atol=3e-4)
        np.testing.assert_allclose(alone.objective[0], joint.objective[v], rtol=1e-4)
        np.testing.assert_allclose(closed_form_attack(one, SHAPE).inputs[0],
                                   cf_joint.inputs[v], atol=1e-6)
    assert evaluate_victims(np.asarray(joint.inputs), x)["psnr"] > 30.0


def test_dp_noise_lowers_psnr_and_clipping_alone_does_not():
    """Per-client clip + Gaussian noise, as the engine's round sends them: IG and
    closed-form PSNR drop far below the clean attack; clipping alone only rescales the
    update, and both attacks are scale-invariant."""
    model, params, x, y, ups = _setup("mlp", 50, 1)
    norms = np.asarray(per_client_l2_norms(ups))
    clip = float(np.median(norms)) / 2
    clean = evaluate_victims(np.asarray(_ig(model, params, ups, y).inputs), x)["psnr"]
    clipped = observe_victims(model, params, x, y, FEDSGD, clip_norm=clip,
                              key=jax.random.key(8)).uploads
    np.testing.assert_array_less(np.asarray(per_client_l2_norms(clipped)), clip * 1.0001)
    cf_clipped = evaluate_victims(np.asarray(closed_form_attack(clipped, SHAPE).inputs), x)
    assert cf_clipped["exact_fraction"] == 1.0
    noisy = observe_victims(model, params, x, y, FEDSGD, clip_norm=clip, noise_multiplier=0.05,
                            key=jax.random.key(9)).uploads
    ig_noisy = evaluate_victims(np.asarray(_ig(model, params, noisy, y).inputs), x)["psnr"]
    cf_noisy = evaluate_victims(np.asarray(closed_form_attack(noisy, SHAPE).inputs), x)["psnr"]
    print(f"IG PSNR clean {clean:.1f} dB, noisy {ig_noisy:.1f} dB; closed form noisy "
          f"{cf_noisy:.1f} dB")
    assert clean > 30.0
    assert ig_noisy < clean - 10.0 and cf_noisy < 30.0


def test_secure_aggregation_sum_is_a_big_batch():
    """The decoded secure sum of 8 batch-1 updates leaks far less than each update alone
    (closed form)."""
    model, params, x, y, ups = _setup("mlp", 50, 1)
    ups, x, y = jax.tree.map(lambda u: u[:8], ups), x[:8], y[:8]
    alone = evaluate_victims(np.asarray(closed_form_attack(ups, SHAPE).inputs), x)["psnr"]
    summed = observe_victims(model, params, x, y, FEDSGD, secure_aggregation=True,
                             key=jax.random.key(4)).uploads
    rec = closed_form_attack(summed, SHAPE, num_reconstructions=8)
    pooled = evaluate_victims(np.asarray(rec.inputs), np.asarray(x).reshape(1, 8, *SHAPE))
    assert alone > 60.0 and pooled["psnr"] < 25.0


def test_bad_settings_raise_one_line_config_errors():
    with pytest.raises(ConfigError, match="steps=0"):
        InversionConfig(steps=0)
    with pytest.raises(ConfigError, match="learning_rate"):
        LocalTraining(-1.0)
    with pytest.raises(ConfigError, match="model"):
        ups = {"Conv_0": {"kernel": jnp.zeros((1, 3, 3, 1, 4)), "bias": jnp.zeros((1, 4))}}
        closed_form_attack(ups, SHAPE)
