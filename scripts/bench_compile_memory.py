"""Compile time, peak memory and steady rounds of the default and the lean round compile.

For one workload (``bench_throughput``'s population and FedAvg) and cohort:

* **memory and compile**, one fresh process per measurement (peak RSS is a per-process
  maximum), alternating default and lean: the resident memory after importing, after
  building the data, after compiling the round and after ``--rounds`` rounds, with the
  round's cold compile time (the persistent cache is off in the children);
* **steady rounds**, in this process: the same lowered round compiled both ways
  (``fs.round_compiler_options``) and timed in interleaved repeats, so the ratio is
  measured under one machine load; the params after one round are compared bit for bit.

Prints one JSON record. ``--workload main`` uses the main job's configuration (the
procedural label-skew population and its own cohort; ``--cohort`` does not apply).

Usage: python scripts/bench_compile_memory.py [--workload softmax|mlp|cnn|main]
       [--cohort 1000] [--processes 2] [--repeats 15] [--devices]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from _cpu_setup import configure_cpu, current_rss_mib, device_record, peak_rss_mib

if __name__ == "__main__":  # --devices acts before JAX starts its backends
    configure_cpu(sys.argv)

import jax
import numpy as np

import fedjax_sim as fs
from bench_throughput import EXAMPLE_SHAPES, make_population, make_workload_model

VARIANTS = ("default", "lean")


def build(workload: str, cohort: int, devices: int | None):
    """``(round, population, state)`` of the workload."""
    if workload == "main":
        exp = fs.assemble(fs.make_config({"rounds": 1, "num_devices": devices}))
        return exp.round, exp.data.population, exp.round.init(jax.random.key(0))
    model = make_workload_model(workload)
    data = make_population(cohort, 50, example_shape=EXAMPLE_SHAPES[workload])
    alg = fs.make_algorithm("fedavg", model, client_lr=0.05, local_epochs=1, batch_size=10)
    fr = fs.make_round(alg, fs.FixedSizeSampler(cohort, cohort), mesh=fs.mesh_for(devices))
    return fr, data, fr.init(jax.random.key(0))


def child(args) -> dict:
    """One fresh process: memory by phase and the cold compile of one variant."""
    fs.use_compile_cache(False)
    phases = {"imported": current_rss_mib()}
    fr, data, state = build(args.workload, args.cohort, args.num_devices)
    jax.block_until_ready(state)
    phases["data_and_state"] = current_rss_mib()
    t0 = time.perf_counter()
    step = fr.step.lower(state, data, jax.random.key(1)).compile(
        fs.round_compiler_options(args.child == "lean"))
    compile_s = time.perf_counter() - t0
    phases["compiled"] = current_rss_mib()
    for r in range(args.rounds):
        state, out = step(state, data, jax.random.key(r))
    jax.block_until_ready(out.metrics)
    phases["after_rounds"] = current_rss_mib()
    # getrusage's peak is sampled by the kernel and can trail /proc's current count by a
    # few hundred KiB; the peak is at least every value read.
    return {"variant": args.child, "compile_s": compile_s, "rss_mib": phases,
            "peak_rss_mib": max(peak_rss_mib(), *phases.values())}


def steady(args) -> dict:
    """Both compiles of the same lowered round, timed interleaved in this process."""
    fr, data, state = build(args.workload, args.cohort, args.num_devices)
    lowered = fr.step.lower(state, data, jax.random.key(1))
    steps = {v: lowered.compile(fs.round_compiler_options(v == "lean")) for v in VARIANTS}
    params = {v: jax.device_get(s(state, data, jax.random.key(1))[0].params)
              for v, s in steps.items()}
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params["default"]),
                                                  jax.tree.leaves(params["lean"])))
    times = {v: [] for v in VARIANTS}
    for r in range(args.repeats):
        for v, s in steps.items():
            t0 = time.perf_counter()
            jax.block_until_ready(s(state, data, jax.random.key(r + 2))[1].metrics)
            times[v].append(time.perf_counter() - t0)
    med = {v: statistics.median(t) for v, t in times.items()}
    return {"default_round_s": med["default"], "lean_round_s": med["lean"],
            "lean_vs_default_time": med["lean"] / med["default"],
            "params_bit_identical_after_one_round": bool(same)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", choices=sorted(EXAMPLE_SHAPES) + ["main"], default="softmax")
    p.add_argument("--cohort", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=5, help="rounds run after the compile")
    p.add_argument("--processes", type=int, default=2,
                   help="fresh processes per variant for memory and compile")
    p.add_argument("--repeats", type=int, default=15, help="interleaved steady rounds")
    p.add_argument("--devices", action="store_true",
                   help="one XLA device per core, the cohort sharded over them")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--num-devices", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    for name in ("cohort", "rounds", "processes", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name}={getattr(args, name)}: must be >= 1")
    args.num_devices = None if args.devices else 1
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return
    runs = {v: [] for v in VARIANTS}
    for _ in range(args.processes):
        for v in VARIANTS:
            cmd = [sys.executable, __file__, "--workload", args.workload, "--cohort",
                   str(args.cohort), "--rounds", str(args.rounds), "--child", v]
            if args.devices:
                cmd.append("--devices")
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode:
                sys.exit(f"error: the {v} child failed: {out.stderr.strip()[-2000:]}")
            runs[v].append(json.loads(out.stdout.strip().splitlines()[-1]))
    cohort = (fs.make_config({}).sampling.cohort_size if args.workload == "main"
              else args.cohort)
    record = {"workload": args.workload, "cohort": cohort, "rounds": args.rounds,
              **{f"{v}_compile_s": [r["compile_s"] for r in runs[v]] for v in VARIANTS},
              **{f"{v}_peak_rss_mib": [r["peak_rss_mib"] for r in runs[v]] for v in VARIANTS},
              **{f"{v}_rss_by_phase_mib": runs[v][0]["rss_mib"] for v in VARIANTS},
              **steady(args), "cores": fs.usable_cores(), "jax": jax.__version__,
              **device_record(), "compile_cache": None, "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
