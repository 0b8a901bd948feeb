"""The malicious server and the malicious client inside a run: a spy round changes no
model, the examples read off the aggregate are exactly those alone in their bin (checked
against a NumPy binning of the cohort's real examples), their share follows the closed
form (1 - 1/k)^(n-1), secure aggregation does not stop it, and bad settings get one line."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_sim as fs
from fedjax_sim._validation import ConfigError
from fedjax_sim.attacks import imprint as imp
from fedjax_sim.experiment.assemble import run_keys
from fedjax_sim.experiment.malicious import cohort_ids
from test_report import _check_page

# Digits, one or two examples per client, FedSGD on a small MLP.
DIGITS = {"data": "digits", "partition": "iid", "num_clients": 1400, "cohort_size": 10,
          "model": "mlp", "hidden": (32,), "algorithm": "fedsgd", "rounds": 2, "seed": 3}


def _rows(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _alone(exp, r, direction, edges, drop=None):
    """NumPy reference: the share of round r's real examples alone in their bin."""
    _, rounds_key = run_keys(exp.key)
    ids = cohort_ids(exp.sampler, rounds_key, r)
    ids = ids[ids != drop] if drop is not None else ids
    data = exp.data.population.cohort_data(jnp.asarray(ids, jnp.int32))
    x = np.asarray(data.x, np.float64)[np.asarray(data.mask, bool)]
    m = imp.measure(x, direction)
    k = len(edges) - 1
    bins = np.searchsorted(edges[:k], m, side="left") - 1  # unit i fires for m > e_i
    _, inverse, counts = np.unique(bins, return_inverse=True, return_counts=True)
    return float(np.mean((counts[inverse] == 1) & (bins >= 0))), len(x)


def test_a_spy_round_sends_the_imprint_and_changes_no_model():
    cfg = fs.make_config(dict(DIGITS, imprint_rounds=(2,), imprint_bins=8, rounds=3))
    exp = fs.assemble(cfg)
    init_key, rounds_key = run_keys(exp.key)
    state = exp.round.init(init_key)
    pop = exp.data.population
    states = [state]
    for r in range(3):
        state, out = exp.round.step(state, pop, jax.random.fold_in(rounds_key, r))
        states.append(state)
    for before, after in ((states[1], states[2]),):  # round 2 is the spy round
        for a, b in zip(jax.tree.leaves((before.params, before.server)),
                        jax.tree.leaves((after.params, after.server))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    changed = [not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
               zip(jax.tree.leaves(states[2].params), jax.tree.leaves(states[3].params))]
    assert any(changed)  # the other rounds train
    # The imprinted copy keeps every layer but the first two as they were.
    imprint = exp.malicious.imprint
    sent = imprint.apply(states[1].params)
    k = imprint.config.num_bins
    np.testing.assert_array_equal(np.asarray(sent["Dense_0"]["kernel"][:, k:]),
                                  np.asarray(states[1].params["Dense_0"]["kernel"][:, k:]))
    np.testing.assert_allclose(np.asarray(sent["Dense_1"]["kernel"][:k, 0]), imprint.gain)


def test_the_malicious_server_reads_exactly_the_examples_alone_in_their_bin(tmp_path):
    out = str(tmp_path / "spy")
    rounds = tuple(range(1, 9))
    cfg = fs.make_config(dict(DIGITS, imprint_rounds=rounds, imprint_bins=16,
                              rounds=len(rounds)))
    summary = fs.run_experiment(cfg, output_dir=out, progress=False)
    exp = fs.assemble(cfg)
    imprint = exp.malicious.imprint
    rows = _rows(out)
    shares, expected = [], []
    for r, row in enumerate(rows):
        alone, n = _alone(exp, r, imprint.direction, imprint.edges)
        assert row["leak_imprint_examples"] == n
        # float32 through the mean of the cohort: each lone example comes back above 30 dB,
        # and nothing else does.
        assert row["leak_imprint_recovered"] == pytest.approx(alone, abs=1e-9), r
        shares.append(alone * n)
        expected.append(imp.predicted_recovery_rate(n, 16) * n)
        assert row["leak_imprint_expected"] == pytest.approx(expected[-1] / n)
    # The closed form: the lone share over 8 rounds (~100 examples) within 4 sigma.
    n_total = sum(row["leak_imprint_examples"] for row in rows)
    p = sum(expected) / n_total
    assert abs(sum(shares) / n_total - p) < 4 * np.sqrt(p * (1 - p) / n_total) + 0.05
    # Every spy round was discarded: the model never trained.
    assert summary["malicious"]["server"]["spy_rounds"] == list(rounds)
    page = _check_page(os.path.join(out, "report.html"))
    alts = {img["alt"] for img in page.imgs}
    assert {f"reconstruction, round {r}, malicious server" for r in rounds} <= alts
    table = page.rows("malicious-summary")
    assert table["server.bins"] == ["16"]


@pytest.mark.slow
def test_secure_aggregation_does_not_stop_the_malicious_server(tmp_path):
    out = str(tmp_path / "secure")
    cfg = fs.make_config(dict(DIGITS, imprint_rounds=(1, 2), imprint_bins=16,
                              secure_aggregation=True, clip_norm=10.0))
    fs.run_experiment(cfg, output_dir=out, progress=False)
    exp = fs.assemble(cfg)
    for r, row in enumerate(_rows(out)):
        alone, _ = _alone(exp, r, exp.malicious.imprint.direction,
                          exp.malicious.imprint.edges)
        assert row["leak_imprint_recovered"] == pytest.approx(alone, abs=1e-9)


def test_the_malicious_client_installs_its_imprint_and_reads_the_next_round(tmp_path):
    out = str(tmp_path / "client")
    cfg = fs.make_config(dict(DIGITS, hidden=(32, 16), weighting="uniform",
                              malicious_client_round=1, malicious_bins=8, rounds=2))
    summary = fs.run_experiment(cfg, output_dir=out, progress=False)
    exp = fs.assemble(cfg)
    plan = exp.malicious
    rows = _rows(out)
    assert "leak_mclient_recovered" not in rows[0]
    row = rows[1]
    assert row["leak_mclient_installed"] is True
    assert row["leak_mclient_install_error"] <= 0.1
    alone, n = _alone(exp, 1, plan.direction, plan.client_edges, drop=plan.attacker)
    assert row["leak_mclient_examples"] == n
    assert row["leak_mclient_recovered"] <= alone + 1e-9
    assert row["leak_mclient_recovered"] > 0
    block = summary["malicious"]["client"]
    assert block["install_round"] == 1 and block["attacker"] == plan.attacker
    # The attacker was sampled in round 1 and had never been sampled before.
    _, rounds_key = run_keys(exp.key)
    assert plan.attacker in cohort_ids(exp.sampler, rounds_key, 0)
    # A server that drops uploads above a norm drops the boosted one: nothing installed,
    # nothing read, no inf or NaN in the row.
    guarded = str(tmp_path / "guarded")
    fs.run_experiment(fs.make_config(dict(DIGITS, hidden=(32, 16), weighting="uniform",
                                          malicious_client_round=1, malicious_bins=8,
                                          rounds=2, norm_bound=10.0)),
                      output_dir=guarded, progress=False)
    row = _rows(guarded)[1]
    assert row["leak_mclient_installed"] is False and row["leak_mclient_recovered"] == 0.0
    assert np.isfinite(row["leak_mclient_install_error"])


@pytest.mark.parametrize("overrides, field", [
    ({"imprint_rounds": (3,)}, "imprint_rounds=3"),
    ({"imprint_rounds": (1,), "model": "cnn", "hidden": (200, 200)}, "imprint_rounds=(1,)"),
    ({"imprint_rounds": (1,), "model": "softmax", "hidden": (200, 200)},
     "imprint_rounds=(1,)"),
    ({"imprint_rounds": (1,), "imprint_bins": 64}, "imprint_bins=64"),
    ({"imprint_bins": 8}, "imprint_bins=8"),
    ({"imprint_rounds": (1,), "observe_rounds": (1,)}, "imprint_rounds=1"),
    ({"malicious_client_round": 2}, "malicious_client_round=2"),
    ({"malicious_client_round": 1, "hidden": (32, 16)}, "malicious_client_round=1"),
    ({"malicious_client_round": 1, "hidden": (32,), "weighting": "uniform"},
     "malicious_client_round=1"),
    ({"malicious_client_round": 1, "hidden": (32, 16), "weighting": "uniform",
      "algorithm": "fedadam"}, "malicious_client_round=1"),
    ({"malicious_bins": 8}, "malicious_bins=8"),
    ({"imprint_public": 100}, "imprint_public=100"),
])
def test_bad_malicious_settings_get_one_line_naming_the_field(overrides, field):
    with pytest.raises(ConfigError) as e:
        fs.make_config(dict(DIGITS, **overrides))
    message = str(e.value)
    assert "\n" not in message and message.startswith(field), message
