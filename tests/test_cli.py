"""`fedjax-sim run`: success path writes the documented files; errors are one line."""

import json
import os
import subprocess
import sys

import pytest

from fedjax_sim.experiment.cli import main
from fedjax_sim.experiment.config import ExperimentConfig, make_config

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
    assert summary["config"]["data"]["num_clients"] == 300
    assert summary["test_accuracy"] == rows[-1]["test_accuracy"]
    printed = capsys.readouterr().out
    assert "final test accuracy" in printed


@pytest.mark.slow
def test_toml_config_and_flag_override(tmp_path):
    cfg_file = tmp_path / "exp.toml"
    cfg_file.write_text('seed = 3\n'
                        '[data]\nsource = "label_skew"\nnum_clients = 300\nmax_examples = 16\n'
                        'eval_clients = 20\n'
                        '[algorithm]\nname = "fedavgm"\nserver_lr = 0.5\n'
                        '[sampling]\ncohort_size = 30\nrounds = 2\n')
    out = tmp_path / "run"
    assert main(["run", "--config", str(cfg_file), "--rounds", "1", "--no-progress",
                 "--output", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["algorithm"]["name"] == "fedavgm"
    assert summary["config"]["algorithm"]["server_lr"] == 0.5
    assert summary["config"]["seed"] == 3
    assert summary["rounds"] == 1  # the flag wins over the file


def test_toml_tables_mean_their_section_and_flat_keys_keep_working(tmp_path):
    from fedjax_sim.experiment.config import load_config

    flat = tmp_path / "flat.toml"
    flat.write_text('data = "digits"\nnum_clients = 50\ncohort_size = 5\nalgorithm = "fedadam"\n'
                    'clip_norm = 0\nserver_lr = 0\n')
    cfg = load_config(str(flat))
    assert (cfg.data.source, cfg.data.num_clients, cfg.algorithm.name) == ("digits", 50,
                                                                           "fedadam")
    # Earlier versions' "0 means automatic" keeps its meaning for flat keys.
    assert cfg.server.clip_norm is None and cfg.algorithm.server_lr is None
    tables = tmp_path / "tables.toml"
    tables.write_text('[data]\nsource = "digits"\nnum_clients = 50\n[sampling]\ncohort_size = 5\n'
                      '[algorithm]\nalgorithm = "fedadam"\n')  # the flat name in its table
    assert load_config(str(tables)).algorithm.name == "fedadam"


@pytest.mark.parametrize("text,start,fragment", [
    ('[algorithm]\nnum_clients = 5\n', "num_clients=5", "belongs in [data]"),
    ('[rounds]\nrounds = 2\ncohort_size = 3\n', "config='[rounds]'", "[sampling]"),
    ('[server]\nclip_norm = 0\n', "clip_norm=0", "> 0"),
    ('[data.more]\nx = 1\n', "data.more='table'", "nest"),
    ('[data]\nnum_client = 5\n', "unknown config key 'data.num_client'", "num_clients"),
])
def test_toml_errors_say_where_a_key_lives(tmp_path, capsys, text, start, fragment):
    cfg_file = tmp_path / "bad.toml"
    cfg_file.write_text(text)
    assert main(["run", "--config", str(cfg_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"fedjax-sim run: error: {start}") and fragment in err


@pytest.mark.parametrize("argv,needle", [
    (["run", "--rounds", "0"], "rounds=0"),
    (["run", "--rounds", "many"], "rounds='many'"),
    (["run", "--algorithm", "fedfoo"], "algorithm='fedfoo'"),
    (["run", "--cohort-size", "20000"], "cohort_size=20000"),
    (["run", "--prox-mu", "0.1"], "prox_mu=0.1"),
    (["run", "--data", "npz"], "data_path"),
    (["run", "--bogus-flag", "1"], "unrecognized arguments"),
    (["run", "--num-client", "5"], "unrecognized arguments"),  # no abbreviations
    (["run", "--hidden", "8"], "hidden=(8,): only applies with model in mlp"),
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
    proc = subprocess.run([sys.executable, "-m", "fedjax_sim", "run", "--local-epochs",
                           "-1"], capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("fedjax-sim run: error: local_epochs=-1: must be >= 1")


def test_defaults_are_the_main_job():
    cfg = ExperimentConfig()
    assert cfg.data.num_clients >= 10_000 and cfg.sampling.cohort_size >= 1000
    assert cfg.data.source == "label_skew"
    assert make_config({"model": "mlp", "hidden": "32,16"}).model.hidden == (32, 16)
    assert make_config({"model.name": "mlp", "model.hidden": [8]}).model.hidden == (8,)


def test_help_shows_each_flags_allowed_values(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    # The description names the main job's population (it once said "FedProx Synthetic").
    assert "procedural label-skewed population of 10,000 clients" in text
    assert "non-IID FedProx Synthetic population" not in text
    assert "label_skew|synthetic" in text  # the data sources, from their registry
    assert "in (0, 1]" in text  # sampling_rate's range
    assert "default: automatic" in text
