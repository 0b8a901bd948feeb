"""The accelerator figures of BENCHMARKS.md in one command, within a time budget.

When a GPU or TPU machine is lent (for minutes, not hours), this is what runs on it. Each
step is one of the benchmark scripts in its own process (its own backend and compile),
most important first, so a budget that runs out loses the least:

1. ``million_softmax_c100k``: one pass over 10^6 procedural clients, cohort 10^5
   (``million_clients.py``; the issue's target: under 0.5 s excluding compile on an
   H100-class GPU);
2. ``throughput_softmax``, ``throughput_mlp``, ``throughput_cnn``: client updates per
   second of the engine, the per-client loop and the centralised equivalent at cohorts
   10^3, 10^4 and 10^5 (``bench_throughput.py``);
3. ``million_softmax_c10k``: the same pass with the CPU runs' cohort of 10^4.

Every record a step prints is appended to ``OUT/records.jsonl`` with the step's name; a
step's stderr goes to ``OUT/STEP.log``. A step still running when the budget ends is
stopped, and the steps after it are listed as skipped. The summary (one JSON object on
stdout and in ``OUT/summary.json``) says which steps finished, failed or were skipped.

``--quick`` runs every step at toy sizes (seconds on a CPU): a check of the plumbing,
not a measurement.

Usage: python scripts/accelerator_figures.py --out DIR [--budget-s 480] [--quick]
           [--only STEP ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

COHORTS = ["--cohorts", "1000", "10000", "100000", "--repeats", "5", "--loop-clients", "200"]
STEPS = {  # name: (script, what the step is, its sizes)
    "million_softmax_c100k": ("million_clients.py", [], ["--cohort", "100000"]),
    "throughput_softmax": ("bench_throughput.py", ["--workloads", "softmax"], COHORTS),
    "throughput_mlp": ("bench_throughput.py", ["--workloads", "mlp"], COHORTS),
    "throughput_cnn": ("bench_throughput.py", ["--workloads", "cnn"], COHORTS),
    "million_softmax_c10k": ("million_clients.py", [], ["--cohort", "10000"]),
}
QUICK = {  # toy sizes, per script
    "million_clients.py": ["--clients", "64", "--cohort", "16", "--examples", "10"],
    "bench_throughput.py": ["--cohorts", "8", "--repeats", "1", "--loop-clients", "2",
                            "--examples", "10"],
}


def step_command(name: str, quick: bool) -> list[str]:
    """The command line of step ``name`` (toy sizes under ``quick``)."""
    script, what, sizes = STEPS[name]
    return [sys.executable, os.path.join(HERE, script), *what,
            *(QUICK[script] if quick else sizes)]


def run_step(name: str, command: list[str], out: str, timeout: float) -> dict:
    """Runs one step; appends its JSON records to ``out/records.jsonl``."""
    t0 = time.perf_counter()
    with open(os.path.join(out, f"{name}.log"), "w") as log:
        try:
            proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=log, text=True,
                                  timeout=timeout, check=False)
        except subprocess.TimeoutExpired as e:
            stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""
            status, rc = "stopped at the budget", None
        else:
            stdout, status, rc = proc.stdout, "done" if proc.returncode == 0 else "failed", \
                proc.returncode
    records = []
    for line in stdout.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append({"step": name, **record})
    with open(os.path.join(out, "records.jsonl"), "a") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return {"step": name, "status": status, "returncode": rc, "records": len(records),
            "seconds": round(time.perf_counter() - t0, 1), "command": command[1:]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for records.jsonl, logs, summary")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="wall-clock seconds for all steps together")
    p.add_argument("--quick", action="store_true", help="toy sizes: checks the plumbing")
    p.add_argument("--only", nargs="+", choices=sorted(STEPS), default=None,
                   help="run these steps only (in the standard order)")
    args = p.parse_args(argv)
    if not args.budget_s > 0:
        p.error(f"--budget-s={args.budget_s}: must be > 0")
    os.makedirs(args.out, exist_ok=True)
    if os.path.exists(os.path.join(args.out, "records.jsonl")):
        p.error(f"--out={args.out}: already holds records.jsonl (choose an empty folder)")
    chosen = [s for s in STEPS if args.only is None or s in args.only]
    deadline = time.perf_counter() + args.budget_s
    steps = []
    for name in chosen:
        left = deadline - time.perf_counter()
        if left <= 1:
            steps.append({"step": name, "status": "skipped: budget spent"})
            continue
        steps.append(run_step(name, step_command(name, args.quick), args.out, left))
    summary = {"budget_s": args.budget_s, "quick": args.quick, "steps": steps,
               "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
