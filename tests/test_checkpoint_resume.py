"""Checkpoint and resume: a run killed with SIGKILL and resumed from its output folder ends
exactly where the uninterrupted run ends (final params, metrics rows and epsilon, bit for
bit on CPU), also when the kill lands in the middle of a checkpoint save (of the resumed
run: resuming twice is covered too).

The runs are SCAFFOLD (server and per-client control variates) under Poisson sampling
with DP-FedAvg (noise keys in the aggregator state, the privacy ledger), so every piece of
state a checkpoint must hold is exercised. Each run is a separate ``fedjax-sim``
process, as a user would start it.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

import fedjax_sim as fs
from fedjax_sim.experiment.cli import main

from conftest import FAST_COMPILE, xla_flags

ROUNDS = 40
ARGS = ["run", "--no-progress", "--data", "synthetic", "--num-clients", "300",
        "--max-examples", "16", "--eval-clients", "20", "--algorithm", "scaffold",
        "--local-epochs", "1", "--sampling", "poisson", "--sampling-rate", "0.1",
        "--aggregator", "dp_fedavg", "--clip-norm", "0.5", "--noise-multiplier", "1.0",
        "--rounds", str(ROUNDS), "--checkpoint-every", "3"]
TIMING = ("seconds", "client_updates_per_s")
ENV = dict(os.environ, XLA_FLAGS=xla_flags(FAST_COMPILE))  # every run compiles alike

# Runs the CLI with orbax's array writer patched to SIGKILL the process on its
# KILL_AT-th call, after the state's arrays are written into the checkpoint's temporary
# folder and before orbax commits (renames) it.
DIE_DURING_SAVE = textwrap.dedent("""
    import os, signal, sys
    from orbax.checkpoint._src.handlers import standard_checkpoint_handler as sch

    KILL_AT = int(sys.argv.pop(1))
    original = sch.StandardCheckpointHandler.async_save
    calls = []

    async def save_then_die(self, *args, **kwargs):
        futures = await original(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == KILL_AT:
            for future in futures or ():
                future.result()
            os.kill(os.getpid(), signal.SIGKILL)
        return futures

    sch.StandardCheckpointHandler.async_save = save_then_die
    from fedjax_sim.experiment.cli import main
    sys.exit(main())
""")


def _cli(*extra):
    return [sys.executable, "-m", "fedjax_sim", *ARGS, *extra]


def _rows(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _untimed(rows):
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def _assert_same_run(done, reference):
    a, b = _rows(done), _rows(reference)
    assert len(a) == len(b) == ROUNDS
    assert _untimed(a) == _untimed(b)  # every metric, and epsilon, in every round
    sa = json.load(open(os.path.join(done, "summary.json")))
    sb = json.load(open(os.path.join(reference, "summary.json")))
    assert sa["status"] == sb["status"] == "completed"
    assert sa["epsilon"] == sb["epsilon"] and sa["epsilon"] is not None
    assert sa["client_updates"] == sb["client_updates"]
    pa, pb = fs.load_params(done), fs.load_params(reference)
    assert jax.tree.structure(pa) == jax.tree.structure(pb)
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run."""
    folder = str(tmp_path_factory.mktemp("reference") / "run")
    proc = subprocess.run(_cli("--output", folder), capture_output=True, text=True,
                          timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return folder


def _resume(folder):
    proc = subprocess.run(_cli("--resume", folder), capture_output=True, text=True,
                          timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.mark.slow
def test_killed_mid_run_and_during_a_save_then_resumed_is_bit_identical(reference, tmp_path,
                                                                         capsys):
    folder = str(tmp_path / "run")
    # 1. SIGKILL by PID in the middle of the run, once 8 rows are written (the checkpoints
    #    of rounds 3 and 6 are complete; the rows after the newest one must be cut back).
    proc = subprocess.Popen(_cli("--output", folder), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=ENV)
    metrics = os.path.join(folder, "metrics.jsonl")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 8:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert 8 <= len(_rows(folder)) < ROUNDS
    assert not os.path.exists(os.path.join(folder, "summary.json"))

    # 2. Resumed, and killed again inside its 2nd save: after the state's arrays are
    #    written into orbax's temporary folder, before the save is committed.
    proc = subprocess.run([sys.executable, "-c", DIE_DURING_SAVE, "2", *ARGS, "--resume",
                           folder], capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    checkpoints = os.listdir(os.path.join(folder, "checkpoints"))
    assert any("tmp" in name for name in checkpoints), checkpoints  # the torn save
    torn = len(_rows(folder))  # the rows up to the torn save's round
    assert torn % 3 == 0 and 12 <= torn < ROUNDS

    # 3. Resumed from the save before the torn one, to the end.
    _resume(folder)
    _assert_same_run(folder, reference)
    summary = json.load(open(os.path.join(folder, "summary.json")))
    assert summary["resumed_from"] == torn - 3
    assert not any("tmp" in name for name in os.listdir(os.path.join(folder, "checkpoints")))

    # A different configuration is refused, naming each differing field.
    rc = main([*ARGS[:-4], "--rounds", str(ROUNDS + 1), "--checkpoint-every", "3",
               "--noise-multiplier", "1.5", "--resume", folder])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "sampling.rounds (40 in the checkpoint, 41 now)" in err[0]
    assert "server.noise_multiplier (1.0 in the checkpoint, 1.5 now)" in err[0]
