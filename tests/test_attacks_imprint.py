"""Malicious server (Robbing the Fed imprint) on real digits: rates vs the analytic prediction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedjax_sim._validation import ConfigError
from fedjax_sim.attacks import imprint as imp
from fedjax_sim.attacks.lab import run_imprint
from fedjax_sim.attacks.updates import LocalTraining, victim_updates
from fedjax_sim.data.digits import load_digits_arrays
from fedjax_sim.models import make_model

SHAPE = (8, 8, 1)


@pytest.mark.parametrize("num_bins", [64, 256])
def test_exact_recovery_rate_matches_analytic_prediction(num_bins):
    """One client with n examples, bins at the known quantiles; >= 1024 examples per cell.

    Victims are drawn without replacement from the 1797 digits, so for n = 256 the realised
    rate sits a little above the i.i.d. prediction (k = 256: about +0.04).
    """
    for n, victims in ((16, 64), (64, 16), (256, 4)):
        out = run_imprint(num_bins=num_bins, batch_size=n, num_victims=victims, seed=n)
        pred = imp.predicted_recovery_rate(n, num_bins)
        print(f"k={num_bins} n={n}: exact {out['exact_fraction']:.3f} vs predicted {pred:.3f}")
        assert out["predicted_rate"] == pytest.approx(pred)
        assert abs(out["exact_fraction"] - pred) < 0.08


def test_secure_aggregation_sum_and_sparse_variant_recover_at_the_predicted_rate():
    """8 clients x 32 examples summed (the server sees only the sum); then the sparse block."""
    agg = run_imprint(num_bins=256, batch_size=32, clients_per_aggregate=8, num_victims=4,
                      seed=1)
    sparse = run_imprint(num_bins=256, batch_size=64, num_victims=16, variant="sparse",
                         seed=2)
    assert agg["secure_aggregation"] and agg["num_examples"] == 256
    assert abs(agg["exact_fraction"] - agg["predicted_rate"]) < 0.08
    assert abs(sparse["exact_fraction"] - sparse["predicted_rate"]) < 0.08


def test_single_example_is_exact_and_attack_is_vmapped():
    x_all, y_all = load_digits_arrays()
    inner = make_model("mlp", SHAPE, 10, hidden=(16,))
    config = imp.ImprintConfig(num_bins=32)
    w = imp.measurement_direction("random", 64, key=jax.random.key(0))
    edges = imp.bin_edges_from_data(imp.measure(x_all, w), 32)
    model, params = imp.make_imprint_model(inner, inner.init(jax.random.key(1)), config, w,
                                           edges)
    x, y = jnp.asarray(x_all[:6, None]), jnp.asarray(y_all[:6, None])
    ups = victim_updates(model, params, x, y, LocalTraining(0.1), key=jax.random.key(2))
    joint = np.asarray(imp.imprint_attack(ups, config, SHAPE).inputs)
    for v in range(6):
        rows = joint[v][np.all(np.isfinite(joint[v].reshape(32, -1)), axis=1)]
        assert len(rows) == 1
        np.testing.assert_allclose(rows[0], x_all[v], atol=1e-4)
        one = jax.tree.map(lambda u, v=v: u[v:v + 1], ups)
        np.testing.assert_array_equal(np.asarray(imp.imprint_attack(one, config, SHAPE)
                                                 .inputs[0]), joint[v])


@settings(max_examples=20, deadline=None, derandomize=True)
@given(st.lists(st.integers(0, 15), min_size=1, max_size=12),
       st.lists(st.floats(0.2, 3.0), min_size=12, max_size=12))
def test_read_off_is_exact_for_every_singleton_bin(bins, scales):
    """Synthetic nested-bin gradients: every example alone in its bin is read off exactly,
    whatever the per-example gradient scalars (client weights, 1/B, signs)."""
    k, d = 16, 5
    rng = np.random.default_rng(len(bins))
    xs = rng.uniform(size=(len(bins), d))
    g = np.asarray(scales[:len(bins)]) * np.where(np.arange(len(bins)) % 2, -1.0, 1.0)
    active = np.arange(k)[None, :] <= np.asarray(bins)[:, None]  # unit i fires if bin >= i
    dw = np.einsum("ei,e,ed->di", active, g, xs)
    db = (active * g[:, None]).sum(0)
    with jax.enable_x64(True):
        rec, nonempty = imp.read_off_bins(jnp.asarray(dw), jnp.asarray(db), "dense")
        rec, nonempty = np.asarray(rec), np.asarray(nonempty)
    counts = np.bincount(bins, minlength=k)
    for e, b in enumerate(bins):
        if counts[b] == 1:
            np.testing.assert_allclose(rec[b], xs[e], atol=1e-9)
    assert set(np.flatnonzero(nonempty)) == set(np.flatnonzero(counts))


def test_defences_and_local_steps_blunt_the_imprint():
    """Noise on the (per-client) update destroys exact recovery; FedAvg's local steps move
    the imprint weights and lower it; clipping alone only rescales (ratio unchanged)."""
    base = dict(num_bins=64, batch_size=16, num_victims=8, seed=3)
    clean = run_imprint(**base)["exact_fraction"]
    clipped = run_imprint(**base, clip_norm=1e-3)["exact_fraction"]
    noisy = run_imprint(**base, clip_norm=1e-3, noise_multiplier=0.01)["exact_fraction"]
    fedavg = run_imprint(**base, local_batch_size=2, learning_rate=0.5)["exact_fraction"]
    print(f"exact: clean {clean:.3f} clipped {clipped:.3f} noisy {noisy:.3f} "
          f"fedavg {fedavg:.3f}")
    assert clean > 0.6 and clipped == pytest.approx(clean, abs=0.02)
    assert noisy < 0.05 and fedavg < clean - 0.2


def test_bin_edges_and_validation():
    m = np.random.default_rng(0).normal(size=10_000)
    edges = imp.bin_edges_from_data(m, 8)
    counts = np.bincount(np.searchsorted(edges, m) - 1, minlength=8)
    assert counts.min() >= 1249 and counts.max() <= 1251
    g = imp.bin_edges_gaussian(0.0, 1.0, 4)
    np.testing.assert_allclose(g[1:4], [-0.6744897501960817, 0.0, 0.6744897501960817])
    assert imp.expected_recovery_rate(np.full(10, 0.1), 5) == \
        pytest.approx(imp.predicted_recovery_rate(5, 10))
    with pytest.raises(ConfigError, match="num_bins=1"):
        imp.ImprintConfig(num_bins=1)
    with pytest.raises(ConfigError, match="variant='hard'"):
        imp.ImprintConfig(variant="hard")
    inner = make_model("softmax", SHAPE, 10)
    with pytest.raises(ConfigError, match="edges"):
        imp.make_imprint_model(inner, {}, imp.ImprintConfig(num_bins=4), np.ones(64),
                               np.array([0.0, 1.0, 1.0, 2.0, 3.0]))
