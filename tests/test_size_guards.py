"""Sizes that cannot fit in memory are refused before anything is allocated.

``fedjax-sim run`` refuses them in one stderr line naming the field and the estimated
bytes, exit status 2. Each case is far beyond any machine (or shrinks the device with a
monkeypatch), and the estimates of the default job and of small runs stay small.
"""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from fedjax_sim.data.io import MAX_NUM_CLASSES
from fedjax_sim.experiment.cli import main
from fedjax_sim.experiment.config import make_config
from fedjax_sim.experiment.models import MAX_WIDTH, check_model_fits


def refused(capsys, *argv):
    """Runs ``fedjax-sim run argv`` in-process; returns (its one stderr line, bytes)."""
    capsys.readouterr()
    rc = main(["run", "--no-progress", "--rounds", "1", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("fedjax-sim run: error: "), err
    need = re.search(r"needs >= .* \((\d+) bytes\), over the", err[0])
    return err[0], int(need.group(1)) if need else None


@pytest.mark.parametrize("argv, field, at_least", [
    # An MLP of two 10^9-wide layers: 10^18 params.
    (["--model", "mlp", "--hidden", "1000000000,1000000000"], "hidden=(", 4 * 10**18),
    # 10^5 held-out clients of 2^20 examples of 60 features, materialised once.
    (["--num-clients", "100000", "--eval-clients", "100000", "--max-examples", "1048576"],
     "max_examples=1048576", 10**5 * 2**20 * 240),
    (["--num-clients", "1000000000", "--eval-clients", "1000000000"],
     "eval_clients=1000000000", 10**9 * 64 * 240),
    (["--data", "synthetic_materialized", "--num-clients", "100000000",
      "--max-examples", "1000000"], "max_examples=1000000", 10**14 * 240),
    # 10^6 clients of a 10^6-param MLP trained at once.
    (["--model", "mlp", "--hidden", "1000,1000", "--num-clients", "1000000",
      "--cohort-size", "1000000", "--chunk-size", "1000000"], "chunk_size=1000000",
     10**6 * 10**6 * 8),
])
def test_absurd_sizes_are_refused_naming_the_field_and_bytes(capsys, argv, field, at_least):
    line, need = refused(capsys, *argv)
    assert field in line
    assert need >= at_least


def test_the_cohort_counts_too(capsys, monkeypatch):
    monkeypatch.setattr("fedjax_sim._host.device_memory_bytes", lambda *a: 10**9)
    line, need = refused(capsys, "--num-clients", "2000000000", "--cohort-size", "2000000000")
    assert "cohort_size=2000000000" in line and "over the 1 GB of one device" in line
    assert need >= 2 * 10**9 * 16
    line, _ = refused(capsys, "--num-clients", "2000000000", "--sampling", "poisson",
                      "--sampling-rate", "1")
    assert "sampling_rate=1.0" in line


def test_mlp_widths_are_bounded(capsys):
    line, _ = refused(capsys, "--model", "mlp", "--hidden", str(MAX_WIDTH + 1))
    assert f"hidden={MAX_WIDTH + 1}: must be <= {MAX_WIDTH}" in line


def test_a_huge_model_is_refused_before_any_file_is_read(tmp_path, capsys, monkeypatch):
    path = tmp_path / "f.npz"
    np.savez(path, x=np.zeros((2, 3, 2), np.float32), y=np.array([[0, 1, 0]] * 2),
             counts=np.array([3, 3]))
    monkeypatch.setattr("fedjax_sim.data.io.load_npz",
                        lambda *a, **k: pytest.fail("the file was read"))
    line, need = refused(capsys, "--data", "npz", "--data-path", str(path), "--num-clients",
                         "2", "--cohort-size", "2", "--model", "mlp", "--hidden",
                         "1000000000,1000000000")
    assert "hidden=(" in line and "the smallest data" in line and need >= 4 * 10**18


def test_many_classes_from_a_file_are_refused_before_the_model_is_built(
        tmp_path, capsys, monkeypatch):
    # The largest label allowed, 2^24 - 1, with 10^4 features: a 1.7e11-param softmax.
    y = np.array([[0, MAX_NUM_CLASSES - 1], [1, 0]])
    np.savez(tmp_path / "f.npz", x=np.zeros((2, 2, 10_000), np.float32), y=y,
             counts=np.array([2, 2]))
    monkeypatch.setattr("fedjax_sim.experiment.assemble.privacy_plan",  # next step
                        lambda *a: pytest.fail("the model was built"))
    line, need = refused(capsys, "--data", "npz", "--data-path", str(tmp_path / "f.npz"),
                         "--num-clients", "2", "--cohort-size", "2")
    assert "model='softmax'" in line and f"{MAX_NUM_CLASSES} classes" in line
    assert need >= 4 * 10_000 * MAX_NUM_CLASSES * 2


def test_the_default_job_and_small_runs_are_not_refused():
    cfg = make_config({})  # the main job: every check ran
    assert check_model_fits(cfg, (60,), 10, max_examples=64) < 50 * 2**20
    mlp = make_config({"model": "mlp", "hidden": (200, 200), "chunk_size": 64})
    assert check_model_fits(mlp, (60,), 10, max_examples=64) < 200 * 2**20
    cnn = make_config({"data": "digits", "model": "cnn", "num_clients": 100,
                       "cohort_size": 10})
    assert check_model_fits(cnn, (28, 28, 1), 62, max_examples=500) < 200 * 2**20


def test_the_console_script_prints_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "fedjax_sim", "run", "--model", "mlp",
                           "--hidden", "1000000000,1000000000"], capture_output=True,
                          text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("fedjax-sim run: error: hidden=(1000000000, 1000000000)")
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
