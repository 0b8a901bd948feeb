"""The honest-but-curious server inside a run: it keeps exactly what each client sent,
observing changes no model, and the attacks' figures land in metrics.jsonl, the summary
and a PNG grid; behind secure aggregation it attacks only the sum."""

import base64
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim._validation import ConfigError
from fedjax_sim.attacks.capture import victim_capture
from fedjax_sim.client_update import ClientConfig, make_local_update
from fedjax_sim.experiment.cli import main
from fedjax_sim.rounds import split_round_key
from fedjax_sim.server.base import CohortUpdates, chain
from fedjax_sim.server.clipping import clip_cohort, clip_per_client
from fedjax_sim.server.reducers import weighted_mean
from test_report import _check_page

PNG = b"\x89PNG\r\n\x1a\n"
# Digits, one or two examples per client, FedSGD on a small MLP: what the lab attacks.
DIGITS = {"data": "digits", "partition": "iid", "num_clients": 1400, "cohort_size": 10,
          "model": "mlp", "hidden": (16,), "algorithm": "fedsgd", "rounds": 2, "seed": 3}


def _rows(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_the_capture_holds_each_victims_upload_as_sent_and_changes_nothing(small_data):
    """Against a plain reference: each victim trained alone with its own key, then
    clipped (a client-side stage). Observing leaves the round's new params bit for bit."""
    model = fs.make_model("softmax", (5,), 3)
    clip = 0.05
    agg = chain(clip_per_client(clip), weighted_mean())
    alg = fs.make_algorithm("fedavg", model, client_lr=0.5, local_epochs=2, batch_size=3,
                            aggregator=agg)
    sampler = fs.FixedSizeSampler(small_data.num_clients, 7)
    plain = fs.make_round(alg, sampler, chunk_size=3)
    watched = fs.make_round(alg, sampler, chunk_size=3,
                            observers=[victim_capture(4, rounds=[1])])
    state0 = plain.init(jax.random.key(0))
    keys = [jax.random.key(10), jax.random.key(11)]
    s_plain, s_watch = state0, watched.init(jax.random.key(0))
    outs = []
    for key in keys:
        s_plain, _ = plain.step(s_plain, small_data, key)
        before = s_watch.params
        s_watch, out = watched.step(s_watch, small_data, key)
        outs.append((before, out))
        for a, b in zip(jax.tree.leaves(s_plain.params), jax.tree.leaves(s_watch.params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Round 0 is not observed: nothing kept.
    cap0 = outs[0][1].observed["victims"]
    assert not np.asarray(cap0.present).any()
    before, out = outs[1]
    cap = out.observed["victims"]
    ids = np.asarray(out.client_ids)
    np.testing.assert_array_equal(np.asarray(cap.client_ids), ids[:4])
    assert np.asarray(cap.present).all()
    local = make_local_update(model, ClientConfig(optax.sgd(0.5), local_epochs=2,
                                                  batch_size=3))
    _, client_key = split_round_key(keys[1])
    for v, cid in enumerate(ids[:4]):
        data = jax.tree.map(lambda a: a[0], small_data.cohort_data(jnp.asarray([cid])))
        res = local(before, data, jax.random.fold_in(client_key, int(cid)))
        one = jax.tree.map(lambda a: a[None], res.delta)
        sent = clip_cohort(CohortUpdates(one, res.weight[None], jnp.ones((1,), bool)),
                           jnp.float32(clip)).updates
        for want, got in zip(jax.tree.leaves(sent), jax.tree.leaves(cap.uploads)):
            np.testing.assert_allclose(np.asarray(got[v]), np.asarray(want[0]), rtol=1e-5,
                                       atol=1e-7)
        assert float(cap.weights[v]) == float(res.weight)


@pytest.mark.slow
def test_a_run_reports_what_the_server_recovers_and_its_report_shows_it(tmp_path):
    # That observing changes no model is checked bit for bit in the round above (the run
    # adds only host-side reporters, which read the round's outputs).
    watched, dp = str(tmp_path / "watched"), str(tmp_path / "dp")
    observe = dict(DIGITS, observe_rounds=(2,), victims=3, inversion_steps=40)
    summary = fs.run_experiment(fs.make_config(observe), output_dir=watched, progress=False)
    # Every run with an output folder writes its report: the page of a real run, its
    # results against the summary (moved here from test_report.py).
    page = _check_page(os.path.join(watched, "report.html"))
    results = page.rows("results-table")
    assert results["final test accuracy"] == [f"{summary['test_accuracy']:.4f}"]
    assert results["rounds"] == ["2 of 2"]
    assert page.rows("config-data")["num_clients"] == ["1400"]
    assert "leakage" in page.ids and "poisoning" not in page.ids
    rows = _rows(watched)
    assert not any(k.startswith("leak_") for k in rows[0])
    leak = {k: v for k, v in rows[1].items() if k.startswith("leak_")}
    assert leak["leak_victims"] == 3
    # FedSGD: the output-bias delta is positive exactly on the labels a client holds.
    assert leak["leak_idlg_accuracy"] == 1.0
    assert 0.0 <= leak["leak_label_accuracy"] <= 1.0
    for name in ("closed_form", "ig"):
        assert 0.0 <= leak[f"leak_{name}_recovered"] <= 1.0
        assert np.isfinite(leak[f"leak_{name}_psnr"])
    assert leak["leak_closed_form_recovered"] >= 0.5  # most clients hold one example
    block = summary["leakage"]
    assert block["observed_rounds"] == [2] and block["attacks"] == ["labels", "closed_form",
                                                                    "ig"]
    with open(os.path.join(watched, "leakage", "round_0002.png"), "rb") as f:
        grid = f.read()
    assert grid[:8] == PNG
    assert any(base64.b64decode(img["src"].split(",", 1)[1]) == grid for img in page.imgs)
    # Central DP noise is added after the server has each upload: clipping only rescales
    # it, and the closed form is scale-invariant, so the server recovers as much.
    guarded = dict(observe, aggregator="dp_fedavg", clip_norm=0.01, noise_multiplier=1.0,
                   leak_attacks="labels,closed_form")
    fs.run_experiment(fs.make_config(guarded), output_dir=dp, progress=False)
    got = _rows(dp)[1]
    assert got["leak_closed_form_recovered"] == leak["leak_closed_form_recovered"]
    assert got["leak_idlg_accuracy"] == 1.0
    assert "leak_ig_psnr" not in got


@pytest.mark.slow
def test_behind_secure_aggregation_the_server_attacks_only_the_sum(tmp_path):
    out = str(tmp_path / "secure")
    cfg = fs.make_config(dict(DIGITS, secure_aggregation=True, clip_norm=10.0,
                              observe_rounds=(1,), rounds=1))
    summary = fs.run_experiment(cfg, output_dir=out, progress=False)
    row = _rows(out)[0]
    assert row["leak_secure_sum"] == 1.0 and row["leak_victims"] == 10  # the whole cohort
    assert "leak_ig_psnr" not in row and "leak_idlg_accuracy" not in row
    # Ten clients' examples mixed in one sum: the closed form recovers almost nothing.
    assert row["leak_closed_form_recovered"] <= 0.2
    assert 0.0 <= row["leak_label_accuracy"] <= 1.0
    assert summary["leakage"]["sees"].startswith("the decoded secure sum")


@pytest.mark.parametrize("overrides, field", [
    ({"observe_rounds": (3,), "rounds": 2}, "observe_rounds=3"),
    ({"observe_rounds": (1,), "victims": 11}, "victims=11"),
    ({"observe_rounds": (1,), "model": "cnn", "hidden": (200, 200),
      "leak_attacks": "closed_form"},
     "leak_attacks='closed_form'"),
    ({"observe_rounds": (1,), "algorithm": "scaffold", "leak_attacks": "ig"},
     "leak_attacks='ig'"),
    ({"observe_rounds": (1,), "secure_aggregation": True, "clip_norm": 1.0,
      "leak_attacks": "labels,ig"}, "leak_attacks='ig'"),
    ({"observe_rounds": (1,), "leak_attacks": "labels,dlg"}, "leak_attacks='dlg'"),
    ({"victims": 2}, "victims=2"),
    ({"canaries": 20}, "canaries=20"),
    ({"canary_guesses": 3}, "canary_guesses=3"),
    ({"aggregator": "dp_fedavg", "clip_norm": 1.0, "noise_multiplier": 1.0, "canaries": 20,
      "canary_guesses": 11}, "canary_guesses=11"),
])
def test_bad_leakage_settings_get_one_line_naming_the_field(overrides, field):
    with pytest.raises(ConfigError) as e:
        fs.make_config(dict(DIGITS, **overrides))
    message = str(e.value)
    assert "\n" not in message and message.startswith(field), message


def test_the_cli_refuses_observing_past_the_run(capsys):
    rc = main(["run", "--rounds", "2", "--observe-rounds", "5", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "observe_rounds=5" in err[0], err
