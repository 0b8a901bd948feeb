"""What a run leaves behind: a dead model is never reported as a result, output is strict
JSON, the output folder is checked before anything is built, the final model is saved
and loads back, and summary.json records where the result came from."""

import json
import logging
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_sim as fs
from fedjax_sim._validation import ConfigError
from fedjax_sim.experiment import runner
from fedjax_sim.experiment.cli import _FoldedWarnings, main
from fedjax_sim.experiment.outputs import dumps, strict_json
from fedjax_sim.experiment.reporters import HealthReporter, TrainingDiverged

SMALL = ["--num-clients", "300", "--cohort-size", "30", "--max-examples", "16",
         "--eval-clients", "30", "--no-progress"]


def _strict_load(text):
    def refuse(token):
        raise AssertionError(f"non-JSON token {token}")
    return json.loads(text, parse_constant=refuse)


def _rows(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [_strict_load(line) for line in f]


def _one_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]


def test_rounds_that_aggregate_nobody_fail_the_run_and_keep_the_rows(tmp_path, capsys):
    out = str(tmp_path / "run")
    # A norm filter no update passes: every round aggregates no client.
    rc = main(["run", *SMALL, "--rounds", "6", "--norm-bound", "1e-9",
               "--max-empty-rounds", "2", "--output", out])
    assert rc == 1
    line = _one_line(capsys)
    assert "no client was aggregated in 2 consecutive rounds" in line
    assert "max_empty_rounds=2" in line
    rows = _rows(out)
    assert [r["round"] for r in rows] == [1, 2]  # the failing round's row is kept
    for r in rows:
        assert r["num_aggregated"] == 0 and r["num_clients"] == 30
        # No client was aggregated: no training metrics, not 0.0.
        assert r["train_loss"] is None and r["train_accuracy"] is None
        assert r["update_norm"] is None
        assert r["test_loss"] is not None  # the (unchanged) global model was evaluated
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["status"] == "failed" and "max_empty_rounds=2" in summary["error"]
    assert summary["rounds_run"] == 2 and summary["final"]["train_loss"] is None
    assert not os.path.exists(os.path.join(out, "model"))  # no model from a dead run


class _Run:
    """The little of a run the health check reads."""

    class experiment:
        class cfg:
            class algorithm:
                client_lr = 0.1

            class output:
                max_empty_rounds = 3


def _state(value):
    return type("State", (), {"params": {"w": jnp.full((2,), value, jnp.float32)}})()


@pytest.mark.parametrize("value, loss, needle", [
    (np.inf, 1.0, "global params are not finite"),
    (np.nan, 1.0, "global params are not finite"),
    (1.0, np.inf, "held-out loss of the global model is inf"),
    (1.0, np.nan, "held-out loss of the global model is nan"),
])
def test_a_dead_global_model_fails_the_run(value, loss, needle):
    health = HealthReporter()
    row = {"num_aggregated": 5, "num_clients": 5, "num_nonfinite": 0, "test_loss": 1.0}
    health.round(_Run, 0, _state(1.0), {}, row)  # alive
    with pytest.raises(TrainingDiverged, match=needle):
        health.round(_Run, 1, _state(value), {}, dict(row, test_loss=loss))


def test_empty_rounds_count_only_consecutively():
    health = HealthReporter()
    empty = {"num_aggregated": 0, "num_clients": 4, "num_nonfinite": 4, "test_loss": None}
    full = dict(empty, num_aggregated=4, num_nonfinite=0)
    for r, row in enumerate([empty, empty, full, empty, empty]):
        health.round(_Run, r, _state(1.0), {}, row)
    with pytest.raises(TrainingDiverged, match=r"rounds 4-6: .* 4 of 4 sampled clients "
                                               r"sent non-finite updates"):
        health.round(_Run, 5, _state(1.0), {}, empty)
    # A resumed run rebuilds the streak from the rows its checkpoint covers.
    resumed = HealthReporter()
    resumed.resume(_Run, [full, empty, empty])
    with pytest.raises(TrainingDiverged):
        resumed.round(_Run, 3, _state(1.0), {}, empty)


def test_output_is_strict_json():
    row = {"round": 3, "update_norm": math.inf, "train_loss": float("nan"),
           "test_loss": np.float32(np.inf), "ok": 1.5,
           "privacy": {"epsilon": -math.inf, "delta": 1e-5}, "list": [1.0, math.nan]}
    clean = strict_json(row)
    assert clean["update_norm"] is None and clean["train_loss"] is None
    assert clean["test_loss"] is None and clean["privacy"]["epsilon"] is None
    assert clean["ok"] == 1.5 and clean["privacy"]["delta"] == 1e-5
    assert clean["list"] == [1.0, None]
    assert clean["nonfinite"] == ["update_norm", "train_loss", "test_loss",
                                  "privacy.epsilon", "list[1]"]
    assert _strict_load(dumps(row)) == clean
    assert strict_json({"a": 1.0}) == {"a": 1.0}  # no flag field when all are finite


@pytest.mark.slow
def test_success_saves_the_model_and_the_provenance(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["run", *SMALL, "--rounds", "2", "--seed", "7", "--output", out]) == 0
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["status"] == "completed" and summary["error"] is None
    prov = summary["provenance"]
    for package in ("fedjax-sim", "jax", "jaxlib", "flax", "optax", "numpy",
                    "dp-accounting"):
        assert prov["versions"][package], package
    assert prov["versions"]["jax"] == jax.__version__
    assert prov["python"] == ".".join(map(str, sys.version_info[:3]))
    assert prov["seed"] == 7 and prov["devices"]["kinds"] == ["cpu"]
    assert prov["command_line"] == sys.argv  # in-process: the caller's command line
    assert prov["git_commit"] is None or len(prov["git_commit"].split("+")[0]) == 40

    # The documented one-liner loads the final model; it reproduces the final accuracy.
    params = fs.load_params(out)
    exp = fs.assemble(fs.make_config({"num_clients": 300, "cohort_size": 30,
                                      "max_examples": 16, "eval_clients": 30, "seed": 7}))
    assert jax.tree.structure(params) == jax.tree.structure(
        exp.model.init(jax.random.key(0)))
    m = fs.evaluate_clients(exp.model, params, exp.data.test_clients, chunk_size=8)
    assert float(m["accuracy_example_weighted"]) == pytest.approx(
        summary["test_accuracy"], rel=1e-6)
    with pytest.raises(ConfigError, match="holds no saved model"):
        fs.load_params(str(tmp_path))


def test_output_folder_is_checked_before_anything_is_built(tmp_path, capsys, monkeypatch):
    def never(cfg):
        raise AssertionError("data built before the output folder was checked")
    monkeypatch.setattr(runner, "assemble", never)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "metrics.jsonl").write_text("{}\n")
    (taken / "notes.txt").write_text("mine\n")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [
        (["--output", str(taken)], "is not empty: pass --resume"),
        (["--output", str(a_file)], "exists and is not a directory"),
        (["--output", str(a_file / "sub")], "is not writable"),
        (["--resume", str(taken)], "holds no checkpoint to resume from"),
        (["--output", str(taken), "--resume", str(taken), "--overwrite"],
         "not with resume"),
        (["--checkpoint-every", "2"], "needs an output folder"),
        (["--overwrite"], "needs an output folder"),
    ]
    for flags, needle in cases:
        assert main(["run", *SMALL, "--rounds", "1", *flags]) == 2, flags
        assert needle in _one_line(capsys), flags
    # --overwrite removes the earlier run's files and nothing else, then builds the run.
    with pytest.raises(AssertionError, match="data built"):
        main(["run", *SMALL, "--rounds", "1", "--output", str(taken), "--overwrite"])
    assert sorted(os.listdir(taken)) == ["notes.txt"]


def test_cli_hygiene(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"fedjax-sim {fs.__version__} (jax ")
    with pytest.raises(SystemExit) as e:
        main(["run", "--checkpoint-ever", "2"])  # no abbreviated flags
    assert e.value.code == 2


def test_third_party_warnings_fold_into_one_line(capsys):
    folded = _FoldedWarnings()
    with folded:
        for alpha in (1.1, 1.2, 1.3):
            logging.getLogger("absl").warning("order %s failed to converge", alpha)
        logging.getLogger("absl").error("a real error stays")
    folded.report()
    err = capsys.readouterr().err.strip().splitlines()
    notes = [line for line in err if line.startswith("note:")]
    assert notes == ["note: 3 third-party warning(s) folded into this line; the first: "
                     "absl: order 1.1 failed to converge"]


@pytest.mark.parametrize("make, needle", [
    (lambda p: p.mkdir(), "is a directory, not a TOML file"),
    (lambda p: p.write_bytes(b"rounds = 3\n\xff\xfe\x81\n"), "invalid TOML"),
    (lambda p: p.write_text("rounds = \n"), "invalid TOML"),
    (lambda p: None, "no such file"),
])
def test_config_files_that_are_not_toml(tmp_path, capsys, make, needle):
    path = tmp_path / "exp.toml"
    make(path)
    assert main(["run", "--config", str(path)]) == 2
    line = _one_line(capsys)
    assert line.startswith(f"fedjax-sim run: error: config='{path}': ") and needle in line
