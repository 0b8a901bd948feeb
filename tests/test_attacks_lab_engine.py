"""The attack lab on the simulator: the attacker sees what the engine's round sends, every
attack takes every applicable defence, a failed install is a clear result, and the
settings that change results are exposed (with one-line errors)."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sim._trees import per_client_l2_norms
from fedjax_sim._validation import ConfigError
from fedjax_sim.attacks import lab
from fedjax_sim.attacks import malicious_client as mc
from fedjax_sim.attacks.updates import LocalTraining, observe_victims, victim_updates
from fedjax_sim.data.digits import digits_train_test
from fedjax_sim.experiment.cli import main
from fedjax_sim.models import make_model
from fedjax_sim.rounds import split_round_key
from fedjax_sim.server.base import CohortUpdates
from fedjax_sim.server.clipping import clip_cohort

SHAPE = (8, 8, 1)
LOCAL = LocalTraining(0.1, local_epochs=2, batch_size=1)  # reshuffles: the keys must agree


@functools.lru_cache(maxsize=1)
def _victims():
    """Six victims with two digits each, a softmax model, and their updates computed
    alone (the plain reference: the engine's client update with the round's keys)."""
    train_x, train_y, _, _ = digits_train_test(seed=0)
    idx = np.random.default_rng(0).choice(len(train_x), (6, 2), replace=False)
    x, y = train_x[idx], train_y[idx]
    model = make_model("softmax", SHAPE, 10)
    params = jax.jit(model.init)(jax.random.key(0))
    key = jax.random.key(5)
    ref = victim_updates(model, params, jnp.asarray(x), jnp.asarray(y), LOCAL,
                         key=split_round_key(key)[1])
    return model, params, x, y, key, ref


def _leaves(tree):
    return [np.asarray(a) for a in jax.tree.leaves(tree)]


def _clipped(ref, clip):
    n = len(jax.tree.leaves(ref)[0])
    return clip_cohort(CohortUpdates(ref, jnp.ones((n,), jnp.float32), jnp.ones((n,), bool)),
                       jnp.float32(clip)).updates


def test_the_uploads_are_the_engines_as_sent_clipped_and_noised():
    """No defence: each victim's upload is its update alone, bit for bit. Clipping and
    local noise: the clip of that update plus N(0, (z S)^2) per coordinate, independent
    across clients (the noise, 10x smaller than what clipping removes, would not hide a
    wrong clip)."""
    model, params, x, y, key, ref = _victims()
    plain = observe_victims(model, params, x, y, LOCAL, key=key)
    for got, want in zip(_leaves(plain.uploads), _leaves(ref)):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(plain.clean_norms, np.asarray(per_client_l2_norms(ref)),
                               rtol=1e-6)
    clip, z = float(np.min(plain.clean_norms)) / 4, 0.01
    noisy = observe_victims(model, params, x, y, LOCAL, clip_norm=clip, noise_multiplier=z,
                            key=key)
    want = _clipped(ref, clip)
    noise = np.concatenate([(g - w).reshape(6, -1) for g, w in
                            zip(_leaves(noisy.uploads), _leaves(want))], axis=1)
    removed = np.concatenate([(r - w).reshape(6, -1) for r, w in
                              zip(_leaves(ref), _leaves(want))], axis=1)
    assert noise.size > 3000 and removed.std() > 10 * z * clip
    assert abs(noise.std() / (z * clip) - 1.0) < 0.05 and abs(noise.mean()) < 0.1 * z * clip
    assert abs(np.corrcoef(noise[0], noise[1])[0, 1]) < 0.1  # independent clients


@pytest.mark.slow
def test_behind_secure_aggregation_the_server_sees_each_groups_noisy_sum():
    """Two groups of three victims, each a secure sum with distributed noise: each
    observation is its group's sum of clipped updates plus noise of std z S (the ring's
    rounding is far below it; a wrong sum would not pass for that noise)."""
    model, params, x, y, key, ref = _victims()
    clip, z = 0.5 * float(np.min(np.asarray(per_client_l2_norms(ref)))), 0.02
    out = observe_victims(model, params, x, y, LOCAL, clip_norm=clip, noise_multiplier=z,
                          secure_aggregation=True, group_size=3, key=key)
    for g in range(2):  # group g trains under its own round key
        part = slice(3 * g, 3 * g + 3)
        mine = victim_updates(model, params, jnp.asarray(x[part]), jnp.asarray(y[part]),
                              LOCAL, key=split_round_key(jax.random.fold_in(key, g))[1])
        want = jax.tree.map(lambda u: jnp.sum(u, axis=0), _clipped(mine, clip))
        noise = np.concatenate([(got[g] - w).ravel() for got, w in
                                zip(_leaves(out.uploads), _leaves(want))])
        assert abs(noise.std() / (z * clip) - 1.0) < 0.1
        assert abs(noise.mean()) < 0.2 * z * clip


def _mlp_and_target(num_bins=16):
    model = make_model("mlp", SHAPE, 10, hidden=(32, 8))
    params = jax.jit(model.init)(jax.random.key(0))
    config = mc.MaliciousClientConfig(num_bins=num_bins, cohort_size=4)
    target = mc.imprint_target_params(params, np.ones(64) / 8, np.linspace(-1, 1, 17), config)
    return params, config, target


def test_a_failed_install_reads_nothing_with_no_inf_nan_or_warning():
    """theta_{t+1} without the imprint (the boosted update was clipped or dropped): the
    read-off says so, recovers nothing, and divides by no missing gain."""
    params, config, target = _mlp_and_target()
    after = jax.tree.map(lambda p: p + 1e-3, params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = mc.read_off_next_round(params, after, config, SHAPE, target=target)
        landed = mc.read_off_next_round(target, jax.tree.map(lambda p: p + 1e-3, target),
                                        config, SHAPE, target=target)
    assert not out.installed and out.install_error > 0.5
    assert out.reconstructions.shape == (0,) + SHAPE
    assert np.isfinite(out.reconstructions).all()
    assert landed.installed and landed.install_error == 0.0
    assert landed.reconstructions.shape == (16,) + SHAPE


@pytest.mark.slow
def test_the_servers_defences_stop_the_installation():
    """A small reference setting: a norm bound drops the boosted update, clipping shrinks
    it: not installed, nothing recovered, no NaN in sight (without them it installs: the
    reference-setting test)."""
    small = dict(num_bins=64, cohort_size=6, batch_size=2, trials=1, seed=1)
    for defence in (dict(norm_bound=100.0), dict(clip_norm=1.0)):
        out = lab.run_malicious_client(**small, **defence)
        assert out["installed_per_trial"] == [False], defence
        assert out["exact_fraction"] == 0.0 and out["installed_fraction"] == 0.0
        assert out["install_error_per_trial"][0] > 0.5
        assert out["reconstructions"].shape == (0,) + SHAPE


def test_the_servers_chain_filters_clips_sums_and_noises_like_dp_fedavg():
    """``server_chain`` on four uploads: the norm filter drops the large one, the clip
    rescales the next, the sum gets N(0, (z S)^2) and is divided by the cohort size."""
    dim, clip, z = 20_000, 1.0, 0.5
    rng = np.random.default_rng(0)
    units = rng.normal(size=(4, dim)) / np.sqrt(dim)
    units /= np.linalg.norm(units, axis=1, keepdims=True)
    uploads = jnp.asarray(units * np.array([[0.5], [2.0], [50.0], [1.0]]), jnp.float32)
    cohort = CohortUpdates({"w": uploads}, jnp.ones((4,), jnp.float32), jnp.ones((4,), bool))
    plain = mc.server_chain(4, clip_norm=clip, norm_bound=10.0, key=jax.random.key(0))
    dp = mc.server_chain(4, clip_norm=clip, norm_bound=10.0, noise_multiplier=z,
                         key=jax.random.key(0))
    assert plain.names == ("zero_above_norm", "clip_per_client", "weighted_mean")
    assert dp.names == ("zero_above_norm", "clip_per_client", "sum_updates", "gaussian_noise",
                        "dp_mean_normalize")
    kept = units[0] * 0.5 + units[1] * clip + units[3]
    mean, _ = plain.update(cohort, plain.init({"w": uploads[0]}))
    np.testing.assert_allclose(np.asarray(mean["w"]), kept / 3, atol=1e-6)
    noisy, _ = dp.update(cohort, dp.init({"w": uploads[0]}))
    noise = np.asarray(noisy["w"]) - kept / 4
    assert abs(noise.std() / (z * clip / 4) - 1.0) < 0.05


def test_the_inversions_tv_weight_is_a_setting_that_changes_results():
    common = dict(model_name="softmax", num_victims=2, steps=2, restarts=1, seed=2)
    default = lab.run_inversion(**common)
    smooth = lab.run_inversion(**common, tv_weight=1.0)
    assert default["tv_weight"] == 1e-3 and smooth["tv_weight"] == 1.0
    assert not np.allclose(default["reconstructions"], smooth["reconstructions"])


def test_fewer_public_examples_give_worse_bin_edges():
    common = dict(num_bins=64, batch_size=16, num_victims=4, edges_from="public", seed=3)
    full = lab.run_imprint(**common)
    few = lab.run_imprint(**common, public_size=16)
    assert full["public_size"] == 359 and few["public_size"] == 16
    assert few["expected_rate"] < full["expected_rate"] - 0.1
    assert few["exact_fraction"] < full["exact_fraction"]


@pytest.mark.parametrize("fn, kwargs, field", [
    (lab.run_inversion, dict(attack="closed_form", tv_weight=0.1), "tv_weight=0.1"),
    (lab.run_inversion, dict(tv_weight=-1.0), "tv_weight=-1.0"),
    (lab.run_inversion, dict(secure_aggregation=True, num_victims=1), "num_victims=1"),
    (lab.run_imprint, dict(public_size=10), "public_size=10"),
    (lab.run_imprint, dict(edges_from="public", public_size=10**6), "public_size=1000000"),
    (lab.run_malicious_client, dict(num_bins=16, noise_multiplier=0.5),
     "noise_multiplier=0.5"),
])
def test_bad_lab_settings_get_one_line_naming_the_field(fn, kwargs, field):
    with pytest.raises(ConfigError) as e:
        fn(**kwargs)
    message = str(e.value)
    assert "\n" not in message and message.startswith(field), message


@pytest.mark.parametrize("argv, field", [
    (["inversion", "--tv-weight", "-1"], "tv_weight=-1"),
    (["imprint", "--public-size", "1"], "public_size=1"),
    (["imprint", "--public-size", "20"], "public_size=20"),  # edges_from known
    (["malicious-client", "--norm-bound", "0"], "norm_bound=0"),
    (["malicious-client", "--bins", "16", "--noise-multiplier", "1"], "noise_multiplier=1"),
])
def test_bad_attack_flags_print_one_line_and_exit_2(argv, field, capsys):
    rc = main(["attack", *argv])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2 and out == "" and len(lines) == 1, err
    assert lines[0].startswith(f"fedjax-sim attack: error: {field}"), lines
