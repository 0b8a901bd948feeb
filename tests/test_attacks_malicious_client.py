"""Malicious client: model replacement installs an imprint; the next round leaks (digits)."""

import jax
import numpy as np
import pytest

from fedjax_sim._validation import ConfigError
from fedjax_sim.attacks import malicious_client as mc
from fedjax_sim.attacks.lab import run_malicious_client
from fedjax_sim.models import make_model


def test_reference_setting_recovers_at_least_half_of_other_clients_examples():
    """15 honest clients x 4 digits per round, FedSGD (lr 0.1), plain mean, k = 512 bins from
    public data, float64 global model: at least half of the 60 examples, in every trial."""
    out = run_malicious_client(trials=3, seed=0)
    print("malicious client exact fractions:", out["exact_fraction_per_trial"],
          "predicted (equiprobable bins):", round(out["predicted_rate"], 3),
          "expected (realised bins):", round(out["expected_rate"], 3))
    assert out["num_examples"] == 60 and out["honest_clients"] == 15
    assert out["installed_per_trial"] == [True, True, True]
    assert min(out["exact_fraction_per_trial"]) >= 0.5
    assert out["exact_fraction"] <= out["predicted_rate"] + 0.1


def test_float32_global_model_rounds_the_signal_away():
    out = run_malicious_client(trials=1, precision="float32", seed=0)
    assert out["exact_fraction"] < 0.1


def test_model_replacement_lands_on_the_target_when_others_send_nothing():
    model = make_model("mlp", (8, 8, 1), 10, hidden=(32, 8))
    params = jax.jit(model.init)(jax.random.key(0))
    config = mc.MaliciousClientConfig(num_bins=16, cohort_size=10)
    edges = np.linspace(-1.0, 1.0, 17)
    target = mc.imprint_target_params(params, np.ones(64) / 8, edges, config)
    boosted = mc.replacement_update(params, target, 10)
    landed = jax.tree.map(lambda p, b: p + b / 10, params, boosted)  # 9 others send 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), landed, target)
    first = np.asarray(target["Dense_0"]["kernel"])
    assert np.allclose(first[:, :16], first[:, :1])  # every bin shares the direction
    assert np.all(np.diff(-np.asarray(target["Dense_0"]["bias"])[:16]) > 0)


def test_needs_a_deep_enough_mlp():
    config = mc.MaliciousClientConfig(num_bins=16, cohort_size=4)
    small = make_model("mlp", (8, 8, 1), 10, hidden=(32,))
    with pytest.raises(ConfigError, match="model"):
        mc.imprint_target_params(jax.jit(small.init)(jax.random.key(0)), np.ones(64),
                                 np.linspace(0, 1, 17), config)
    narrow = make_model("mlp", (8, 8, 1), 10, hidden=(8, 8))
    with pytest.raises(ConfigError, match="num_bins=16"):
        mc.imprint_target_params(jax.jit(narrow.init)(jax.random.key(0)), np.ones(64),
                                 np.linspace(0, 1, 17), config)
    with pytest.raises(ConfigError, match="precision"):
        mc.MaliciousClientConfig(precision="bfloat16")
