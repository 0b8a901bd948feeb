"""`fedjax-sim run`: success path writes the documented files; errors are one line."""

import json
import os
import subprocess
import sys

import pytest

from fedjax_sim.cli import main
from fedjax_sim.config import ExperimentConfig, make_config

SMALL = ["--num-clients", "300", "--cohort-size", "40", "--rounds", "3",
         "--max-examples", "16", "--eval-clients", "50", "--no-progress"]


@pytest.mark.slow
def test_run_writes_metrics_and_summary(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", *SMALL, "--output", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    for r in rows:
        for key in ("round", "train_loss", "test_accuracy", "num_clients", "seconds"):
            assert key in r and r[key] is not None
        assert r["num_clients"] == 40
        assert 0.0 <= r["test_accuracy"] <= 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["client_updates"] == 120
    assert summary["config"]["num_clients"] == 300
    assert summary["test_accuracy"] == rows[-1]["test_accuracy"]
    printed = capsys.readouterr().out
    assert "final test accuracy" in printed


@pytest.mark.slow
def test_toml_config_and_flag_override(tmp_path):
    cfg_file = tmp_path / "exp.toml"
    cfg_file.write_text('[data]\ndata = "label_skew"\nnum_clients = 300\nmax_examples = 16\n'
                        '[algorithm]\nalgorithm = "fedavgm"\nserver_lr = 0.5\n'
                        '[rounds]\ncohort_size = 30\nrounds = 2\neval_clients = 20\n')
    out = tmp_path / "run"
    assert main(["run", "--config", str(cfg_file), "--rounds", "1", "--no-progress",
                 "--output", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["algorithm"] == "fedavgm"
    assert summary["config"]["server_lr"] == 0.5
    assert summary["rounds"] == 1  # the flag wins over the file


@pytest.mark.parametrize("argv,needle", [
    (["run", "--rounds", "0"], "rounds=0"),
    (["run", "--rounds", "many"], "rounds='many'"),
    (["run", "--algorithm", "fedfoo"], "algorithm='fedfoo'"),
    (["run", "--cohort-size", "20000"], "cohort_size=20000"),
    (["run", "--prox-mu", "0.1"], "prox_mu=0.1"),
    (["run", "--data", "npz"], "data_path"),
    (["run", "--bogus-flag", "1"], "unrecognized arguments"),
])
def test_errors_are_one_line_exit_2(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        sys.exit(main(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1


def test_unknown_toml_key(tmp_path, capsys):
    cfg_file = tmp_path / "bad.toml"
    cfg_file.write_text("num_client = 5\n")
    assert main(["run", "--config", str(cfg_file)]) == 2
    err = capsys.readouterr().err
    assert "num_client" in err and "num_clients" in err


def test_console_script_error_path_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "fedjax_sim.cli", "run", "--local-epochs",
                           "-1"], capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("fedjax-sim run: error: local_epochs=-1: must be >= 1")


def test_defaults_are_the_main_job():
    cfg = ExperimentConfig()
    assert cfg.num_clients >= 10_000 and cfg.cohort_size >= 1000
    assert cfg.data == "label_skew"
    assert make_config({"hidden": "32,16"}).hidden == (32, 16)
