"""The benchmark scripts run end to end at tiny sizes and print consistent JSON.

No timing is asserted: only that each script runs, prints the documented fields, and that
its derived figures agree with its own raw ones (rates are cohort / seconds, ratios are
quotients of the printed times).
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from conftest import FAST_COMPILE, xla_flags

SCRIPTS = pathlib.Path(__file__).resolve().parents[1] / "scripts"


def _run(script, *args, devices=None):
    flags = [] if devices is None else [f"--xla_force_host_platform_device_count={devices}"]
    env = dict(os.environ, XLA_FLAGS=xla_flags(FAST_COMPILE, *flags))
    proc = subprocess.run([sys.executable, str(SCRIPTS / script), *args], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _close(a, b):
    return a == pytest.approx(b, rel=1e-9)


def _check_device_and_cache(r):
    """The fields every benchmark record carries: the device it ran on and the compile
    cache (under the suite: its per-run directory, which subprocesses inherit)."""
    assert r["backend"] == "cpu" and r["device_count"] >= 1 and r["device_kind"]
    assert r["compile_cache"] == os.environ["JAX_COMPILATION_CACHE_DIR"]


@pytest.mark.slow
def test_bench_throughput_records_agree_with_their_times():
    records = _run("bench_throughput.py", "--cohorts", "8", "--repeats", "1",
                   "--loop-clients", "3", "--chunk-size", "4", "--cores", "1",
                   "--workloads", "softmax", "cnn")  # the mlp's path is the softmax's
    assert [(r["workload"], r["cohort"]) for r in records] == [("softmax", 8), ("cnn", 8)]
    for r in records:
        _check_device_and_cache(r)
        assert r["cores"] == 1
        for field in ("engine_updates_per_s", "loop_updates_per_s",
                      "central_equiv_updates_per_s", "engine_compile_s"):
            assert r[field] > 0, field
        assert r["chunk_size"] == 4 and r["local_steps"] == 5
        assert _close(r["engine_updates_per_s"], 8 / r["engine_round_s"])
        assert _close(r["engine_vs_central_time"], r["engine_round_s"] / r["central_round_s"])
        assert _close(r["engine_vs_loop"], r["loop_round_s"] / r["engine_round_s"])


@pytest.mark.slow
def test_engine_breakdown_runs_sharded_and_its_ratios_agree():
    (r,) = _run("bench_engine_breakdown.py", "--cohort", "8", "--repeats", "1",
                "--devices", "0", devices=2)
    assert r["devices"] == 2 and r["workload"] == "softmax"
    _check_device_and_cache(r)
    assert r["device_count"] == 2
    assert 4 % r["bare_chunk"] == 0  # divides the per-device cohort
    for k in ("engine", "bare", "central"):
        assert _close(r[f"{k}_updates_per_s"], 8 / r[f"{k}_round_s"])
    assert _close(r["engine_vs_bare_time"], r["engine_round_s"] / r["bare_round_s"])
    assert _close(r["bare_vs_central_time"], r["bare_round_s"] / r["central_round_s"])


def test_engine_breakdown_rejects_a_cohort_the_devices_cannot_split():
    proc = subprocess.run([sys.executable, str(SCRIPTS / "bench_engine_breakdown.py"),
                           "--cohort", "7", "--devices", "0"],
                          env=dict(os.environ,
                                   XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=2")),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "--cohort=7" in proc.stderr and "Traceback" not in proc.stderr


def _python(code, *args, env):
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.split()


def test_cpu_setup_imports_fedjax_sim_before_jax_starts_its_backends():
    # _cpu_setup imports fedjax_sim; XLA flags set after that must still take effect.
    env = dict(os.environ, XLA_FLAGS=xla_flags())
    late_flags = ("import os, sys; sys.path.insert(0, sys.argv[1]); import _cpu_setup; "
                  "os.environ['XLA_FLAGS'] += ' --xla_force_host_platform_device_count=3'; "
                  "import jax; print(jax.device_count())")
    assert _python(late_flags, str(SCRIPTS), env=env) == ["3"]
    # --devices: one XLA host device per core the process may use.
    devices = ("import os, sys; sys.path.insert(0, sys.argv[1]); import _cpu_setup; "
               "_cpu_setup.configure_cpu(['--devices']); import jax; "
               "print(jax.device_count(), len(os.sched_getaffinity(0)))")
    count, cores = _python(devices, str(SCRIPTS), env=env)
    assert count == cores


def test_bench_throughput_rejects_more_cores_than_it_may_use():
    proc = subprocess.run([sys.executable, str(SCRIPTS / "bench_throughput.py"),
                           "--cores", str(os.cpu_count() + 1)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "--cores=" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_million_clients_counts_every_update_once():
    # By default every usable core is a device and the cohort is sharded over all of them;
    # 125 clients on an even number of devices leaves padding slots, which count nothing.
    # Its program is compiled by no other test, so the cache is off at no cost.
    (r,) = _run("million_clients.py", "--clients", "2000", "--cohort", "125",
                "--no-compile-cache")
    assert (r["clients"], r["rounds"], r["client_updates"]) == (2000, 16, 2000)
    cores = len(os.sched_getaffinity(0))
    assert r["devices"] == r["device_count"] == r["cores"] == cores
    assert r["cohort_capacity"] == -(-125 // cores) * cores
    assert _close(r["client_updates_per_s"], r["client_updates"] / r["total_seconds"])
    assert r["peak_rss_mib"] > 0 and r["compile_seconds"] > 0
    assert r["backend"] == "cpu" and r["compile_cache"] is None


@pytest.mark.slow
def test_bench_checkpoint_runs_agree_and_its_ratio_is_its_times():
    (r,) = _run("bench_checkpoint.py", "--repeats", "1", "--every", "2",
                "--set", "num_clients=200", "--set", "cohort_size=20", "--set", "rounds=5",
                "--set", "eval_clients=20", "--set", "max_examples=16")
    assert r["rounds"] == 5 and r["saves_per_run"] == 2
    _check_device_and_cache(r)
    assert r["accuracy_identical"]  # checkpoints never change the run
    assert _close(r["checkpointed_vs_plain_time"], r["checkpointed_loop_s"] / r["plain_loop_s"])
    assert r["save_s"] > 0 and r["restore_s"] > 0 and r["checkpoint_bytes"] > 0


@pytest.mark.slow
def test_bench_secagg_modes_print_consistent_figures():
    rows = _run("bench_secagg.py", "dropout", "--bits", "32", "--rounds", "5", "--rates",
                "0", "0.5")
    assert [r["dropout"] for r in rows] == [0.0, 0.5]
    for r in rows:
        _check_device_and_cache(r)
    assert rows[1]["epsilon"] > rows[0]["epsilon"]  # dropped shares: less noise
    assert _close(rows[1]["ratio"], rows[1]["epsilon"] / rows[1]["epsilon0_over_sqrt"])
    dme = _run("bench_secagg.py", "dme", "--clients", "20", "--dim", "30", "--epsilons", "4",
               "--bits", "4", "16", "--trials", "2")
    assert dme[0]["secure_mse"] is None and "cannot hold 20" in dme[0]["why"]
    assert _close(dme[1]["mse_ratio"], dme[1]["secure_mse"] / dme[1]["central_mse"])
    _check_device_and_cache(dme[1])
    assert _close(dme[1]["central_mse"], 30 * (dme[1]["central_z"] * 10.0) ** 2 / 20 ** 2)


@pytest.mark.slow
def test_bench_compile_memory_records_agree_with_their_phases():
    (r,) = _run("bench_compile_memory.py", "--cohort", "8", "--processes", "1",
                "--repeats", "1", "--rounds", "1")
    assert r["workload"] == "softmax" and r["cohort"] == 8
    assert r["backend"] == "cpu" and r["device_count"] == 1
    assert r["compile_cache"] is None  # the children compile cold
    for v in ("default", "lean"):
        assert len(r[f"{v}_compile_s"]) == 1 and r[f"{v}_compile_s"][0] > 0
        phases = r[f"{v}_rss_by_phase_mib"]
        assert list(phases) == ["imported", "data_and_state", "compiled", "after_rounds"]
        assert r[f"{v}_peak_rss_mib"][0] >= max(phases.values()) > 0
    assert _close(r["lean_vs_default_time"], r["lean_round_s"] / r["default_round_s"])
    assert isinstance(r["params_bit_identical_after_one_round"], bool)


@pytest.mark.slow
def test_accelerator_figures_collects_each_steps_records_within_its_budget(tmp_path):
    out = tmp_path / "figures"
    (summary,) = _run("accelerator_figures.py", "--out", str(out), "--quick", "--only",
                      "million_softmax_c10k")
    (step,) = summary["steps"]
    assert step["status"] == "done" and step["records"] == 1
    (record,) = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert record["step"] == "million_softmax_c10k" and record["client_updates"] == 64
    assert _close(record["client_updates_per_s"], 64 / record["total_seconds"])
    _check_device_and_cache(record)
    assert json.loads((out / "summary.json").read_text()) == summary

    # A budget that ends during the first step stops it and skips the rest.
    (summary,) = _run("accelerator_figures.py", "--out", str(tmp_path / "short"), "--quick",
                      "--budget-s", "2", "--only", "throughput_softmax",
                      "million_softmax_c10k")
    assert [s["status"] for s in summary["steps"]] == ["stopped at the budget",
                                                       "skipped: budget spent"]
    # An existing records file is never appended to.
    proc = subprocess.run([sys.executable, str(SCRIPTS / "accelerator_figures.py"), "--out",
                           str(out), "--quick"], capture_output=True, text=True)
    assert proc.returncode == 2 and "records.jsonl" in proc.stderr.splitlines()[-1]
