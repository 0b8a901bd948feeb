"""Interleaved A/B of this checkout against an earlier commit, in one process.

The earlier commit's package is exported with ``git archive`` into a temporary folder and
imported under another name (``fedjax_sim_base``: every ``fedjax_sim`` in its sources is
rewritten), so both versions run in the same process, on the same JAX and the same
cores. Runs of the same experiment alternate, A B A B ..., so drifting machine load hits
both alike. Each run reports its final test accuracy, compile time and per-round seconds;
the JSON on stdout has the medians of the steady-state round times and their ratio.

    python scripts/bench_ab.py --base HEAD~3 --repeats 3
    python scripts/bench_ab.py --base HEAD~3 --set model=mlp --set hidden=256

An experiment is given as flat config keys (``--set key=value``), understood by both
versions' ``make_config`` (the defaults are the main job).
"""

from __future__ import annotations

import sys

from _cpu_setup import add_compile_cache_flag, compile_cache, configure_cpu, device_record

configure_cpu(sys.argv)  # before JAX starts: --cores N pins, --devices splits the CPU

import argparse
import importlib
import json
import os
import pathlib
import platform
import re
import statistics
import subprocess
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def export_base(ref: str, into: pathlib.Path) -> str:
    """Exports ``ref``'s package as ``fedjax_sim_base`` under ``into``; returns the commit."""
    commit = subprocess.run(["git", "rev-parse", ref], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.strip()
    archive = subprocess.run(["git", "archive", commit, "fedjax_sim"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    (into / "fedjax_sim").rename(into / "fedjax_sim_base")
    for path in (into / "fedjax_sim_base").rglob("*.py"):
        text = path.read_text()
        path.write_text(re.sub(r"\bfedjax_sim\b", "fedjax_sim_base", text))
    return commit


def entry_points(package: str):
    """``(make_config, run_experiment)`` of a version: its package face, or the modules
    of versions before the experiment layer existed."""
    pkg = importlib.import_module(package)
    try:
        return pkg.make_config, pkg.run_experiment
    except AttributeError:
        config = importlib.import_module(f"{package}.config")
        runner = importlib.import_module(f"{package}.runner")
        return config.make_config, runner.run_experiment


def one_run(make_config, run_experiment, overrides: dict) -> dict:
    seconds = []
    summary = run_experiment(make_config(dict(overrides)), progress=False,
                             on_round=lambda row: seconds.append(row["seconds"]))
    return {"test_accuracy": summary["test_accuracy"],
            "compile_seconds": summary["compile_seconds"],
            "steady_round_seconds": statistics.median(seconds[1:] or seconds)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="HEAD", help="the earlier commit (git ref)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each version")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a flat config key of the experiment (repeatable)")
    p.add_argument("--cores", default="0", help="(read by _cpu_setup) pin to N cores")
    p.add_argument("--devices", action="store_true", help="(read by _cpu_setup)")
    add_compile_cache_flag(p)
    args = p.parse_args(argv)
    # For the process: both versions' programs (the base's under its own name) use it.
    cache = compile_cache(args)
    overrides = dict(item.split("=", 1) for item in args.set)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="fedjax_ab_"))
    commit = export_base(args.base, tmp)
    sys.path.insert(0, str(tmp))
    sys.path.insert(0, str(ROOT))
    versions = {"base": entry_points("fedjax_sim_base"), "head": entry_points("fedjax_sim")}
    runs = {name: [] for name in versions}
    for _ in range(args.repeats):
        for name, (make_config, run_experiment) in versions.items():
            runs[name].append(one_run(make_config, run_experiment, overrides))
    import jax

    med = {name: statistics.median(r["steady_round_seconds"] for r in rs)
           for name, rs in runs.items()}
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "fedjax_sim"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip())
    print(json.dumps({
        "experiment": overrides or "the main job", "base_commit": commit,
        "head_commit": head + (" + uncommitted changes" if dirty else ""),
        "runs": runs, "median_steady_round_seconds": med,
        "head_over_base": med["head"] / med["base"],
        "accuracy_equal": [a["test_accuracy"] == b["test_accuracy"]
                           for a, b in zip(runs["base"], runs["head"])],
        "devices": [str(d) for d in jax.devices()], **device_record(),
        "compile_cache": cache,
        "jax": jax.__version__, "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
