"""What checkpoints cost: a run with ``--checkpoint-every N`` against the same run without.

In one process, on the same experiment (flat config keys, ``--set key=value``; the
defaults are the main job), after one warm-up run (it builds the data, which later runs
take from the cache), runs alternate A B A B ...: A writes metrics.jsonl, summary.json
and the final model; B also saves a checkpoint every ``--every`` rounds. Each run reports
its host-loop time (everything after compiling: rounds, evaluation, output, saves) and
its final accuracy, which must agree (checkpoints never change the run). Then one save
and one restore of the experiment's state after 3 rounds are timed on their own, with
the checkpoint's size on disk.

    python scripts/bench_checkpoint.py --repeats 3 --every 10
    python scripts/bench_checkpoint.py --set algorithm=scaffold --set num_clients=100000
"""

from __future__ import annotations

import sys

from _cpu_setup import add_compile_cache_flag, compile_cache, configure_cpu, device_record

configure_cpu(sys.argv)  # before JAX starts: --cores N pins, --devices splits the CPU

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import jax

import fedjax_sim as fs


def _overrides(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"bench_checkpoint.py: error: --set {pair!r}: expected KEY=VALUE")
        out[key] = value
    return out


def _folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path)
               for f in files)


def one_run(overrides: dict, every: int, folder: str) -> dict:
    cfg = fs.make_config({**overrides, "output": folder, "checkpoint_every": every})
    summary = fs.run_experiment(cfg, progress=False)
    return {"loop_seconds": summary["total_seconds"] - summary["compile_seconds"],
            "train_seconds": summary["train_seconds"],
            "compile_seconds": summary["compile_seconds"],
            "test_accuracy": summary["test_accuracy"]}


def time_save_restore(overrides: dict, folder: str) -> dict:
    """One checkpoint save and restore of the experiment's state after 3 rounds (so that
    client state is not all zeros, which would compress to nothing), on their own."""
    exp = fs.assemble(fs.make_config(overrides))
    state = exp.round.init(jax.random.key(0))
    for r in range(3):
        state, _ = exp.round.step(state, exp.data.population, jax.random.key(r))
    jax.block_until_ready(state)
    checkpoints = fs.RunCheckpoints(folder)
    t0 = time.perf_counter()
    checkpoints.save(1, state, {"rounds": 1})
    save_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    restored, _ = checkpoints.restore(state)
    jax.block_until_ready(restored)
    restore_s = time.perf_counter() - t0
    checkpoints.close()
    return {"save_s": save_s, "restore_s": restore_s,
            "checkpoint_bytes": _folder_bytes(folder),
            "state_bytes": sum(x.nbytes for x in jax.tree.leaves(state)
                               if hasattr(x, "nbytes"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--every", type=int, default=10, help="rounds between checkpoints")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cores", type=int, default=None)
    parser.add_argument("--devices", type=int, default=None)
    add_compile_cache_flag(parser)
    args = parser.parse_args()
    cache = compile_cache(args)  # after configure_cpu, before the first compile
    overrides = _overrides(args.set)
    rounds = fs.make_config(overrides).sampling.rounds
    runs: dict[str, list[dict]] = {"plain": [], "checkpointed": []}
    with tempfile.TemporaryDirectory() as tmp:
        one_run(overrides, 0, os.path.join(tmp, "warmup"))
        for i in range(args.repeats):
            for name, every in (("plain", 0), ("checkpointed", args.every)):
                runs[name].append(one_run(overrides, every, os.path.join(tmp, f"{name}{i}")))
        alone = time_save_restore(overrides, os.path.join(tmp, "alone"))
    accuracies = {r["test_accuracy"] for rs in runs.values() for r in rs}
    median = {name: statistics.median(r["loop_seconds"] for r in rs)
              for name, rs in runs.items()}
    print(json.dumps({
        "experiment": overrides, "rounds": rounds, "every": args.every,
        "saves_per_run": (rounds - 1) // args.every, "repeats": args.repeats,
        "plain_loop_s": median["plain"], "checkpointed_loop_s": median["checkpointed"],
        "checkpointed_vs_plain_time": median["checkpointed"] / median["plain"],
        "accuracy_identical": len(accuracies) == 1, "test_accuracy": sorted(accuracies),
        **alone, "runs": runs,
        "devices": len(jax.devices()), **device_record(), "compile_cache": cache,
        "jax": jax.__version__, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }))


if __name__ == "__main__":
    main()
