"""`fedjax-sim run --attack ...`: backdoor success is logged; bad combinations are one line."""

import json

import pytest

from fedjax_sim._validation import ConfigError
from fedjax_sim.experiment.cli import main
from fedjax_sim.experiment.config import make_config

SMALL = ["--num-clients", "200", "--cohort-size", "40", "--rounds", "2",
         "--max-examples", "16", "--eval-clients", "50", "--no-progress"]


@pytest.mark.slow
def test_backdoor_run_logs_backdoor_success_per_evaluation(tmp_path):
    out = tmp_path / "run"
    assert main(["run", *SMALL, "--attack", "backdoor", "--malicious-fraction", "0.1",
                 "--target-label", "2", "--output", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(0.0 <= r["backdoor_success"] <= 1.0 for r in rows)
    assert all({"honest_cosine", "honest_inner_product", "num_malicious"} <= r.keys()
               for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["attack"] == "backdoor" and summary["num_malicious"] == 20
    assert summary["backdoor_success"] == rows[-1]["backdoor_success"]


@pytest.mark.slow
def test_omniscient_attack_runs_through_a_robust_reducer(tmp_path):
    out = tmp_path / "run"
    assert main(["run", *SMALL, "--attack", "alie", "--num-malicious", "30",
                 "--aggregator", "median", "--output", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("backdoor_success" not in r for r in rows)
    assert all(r["num_aggregated"] == r["num_clients"] for r in rows)
    # Detection statistics: 30 of 200 clients are adversarial, 40 sampled per round.
    assert all(0 <= r["num_malicious"] <= r["num_clients"] for r in rows)
    assert sum(r["num_malicious"] for r in rows) > 0
    assert all(-1.0 - 1e-6 <= r["honest_cosine"] <= 1.0 + 1e-6 for r in rows)
    assert all(r["honest_update_norm"] > 0 for r in rows)
    assert all((r["malicious_update_norm"] > 0) == (r["num_malicious"] > 0) for r in rows)


@pytest.mark.parametrize("overrides,field", [
    ({"attack": "backdoor"}, "num_malicious"),
    ({"attack": "backdoor", "num_malicious": 2, "malicious_fraction": 0.1}, "num_malicious"),
    ({"num_malicious": 3}, "num_malicious"),
    ({"attack": "sign_flip", "num_malicious": 1, "target_label": 1}, "target_label"),
    ({"attack": "backdoor", "num_malicious": 1, "boost": 10.0}, "boost"),
    ({"attack": "constrain_scale", "num_malicious": 1}, "attack_norm"),
    ({"attack": "alie", "malicious_fraction": 1.0}, "attack"),
    ({"attack": "gaussian", "malicious_fraction": 0.00001}, "malicious_fraction"),
    ({"attack": "nope"}, "attack"),
    ({"attack": "backdoor", "num_malicious": 10**6}, "num_malicious"),
])
def test_impossible_combinations_are_one_line_errors(overrides, field):
    with pytest.raises(ConfigError) as err:
        make_config(overrides)
    msg = str(err.value)
    assert msg.startswith(f"{field}=") and "\n" not in msg


def test_target_label_beyond_the_classes_is_caught_when_the_data_is_known(capsys):
    assert main(["run", *SMALL, "--attack", "backdoor", "--num-malicious", "1",
                 "--target-label", "10"]) != 0
    assert "target_label=10" in capsys.readouterr().err
