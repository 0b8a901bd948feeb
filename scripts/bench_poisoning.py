"""Cost of a poisoned round vs an honest round in the vectorised engine: JSON lines.

The main job's setting: the procedural label-skew population (10,000 clients, softmax
regression, 610 parameters), a fixed-size cohort of 1,000, FedAvg with 2 local epochs of
batch 10. The adversary is 1% of the population (``malicious_by_permutation``), so about
1% of each cohort. Variants, all built from the library's public pieces:

* ``honest_mean``: FedAvg, example-weighted mean (the streamed chain);
* ``model_replacement_mean``: the same chain, attackers send a backdoored delta (feature
  trigger, target 0) boosted by ``n / eta``;
* ``second_pass_mean``: a control: a generic attack callable (not a ``StagedAttack``)
  that trains honestly again on a copy of its data, i.e. the price of the generic path's
  second local-training pass, with no attack logic at all;
* ``sign_flip_mean``: attackers send minus their honest delta;
* ``honest_median``: coordinate median (the cohort's updates are stacked);
* ``model_replacement_median``: model replacement against the median;
* ``alie_median``: A Little Is Enough (the colluding server stage first, then the median).

The library's attacks are ``StagedAttack``s: every client trains once, on poisoned data if
it is malicious (a per-client select on the data), and malicious outputs are rewritten.
A generic attack callable that trains on other data makes the whole cohort train twice
(under vmap a branch is a select); the control measures that. ALIE's clients train
honestly; the colluding stage first in the server chain forges their rows. Each variant is
compiled ahead of time (``lower().compile()``), warmed up once, then the variants' rounds
are interleaved so load changes hit all of them alike. Poisoned variants add the
``poisoning_diagnostics(is_malicious)`` observer to the round as ``fedjax-sim run`` does,
so they also pay for the per-round alignment metrics. The steady-state median round time
and its ratio to ``honest_mean`` (and to the honest round of the same defence) are
reported; compile time is reported apart.

Usage: python scripts/bench_poisoning.py [--population 10000] [--cohort 1000]
           [--fraction 0.01] [--rounds 20] [--output docs/bench_poisoning.jsonl]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import jax

import fedjax_sim as fs
from _cpu_setup import add_compile_cache_flag, compile_cache, device_record

P, S = fs.poisoning, fs.server

# variant -> (defence, attack)
VARIANTS = {
    "honest_mean": ("mean", "none"),
    "model_replacement_mean": ("mean", "model_replacement"),
    "second_pass_mean": ("mean", "second_pass"),
    "sign_flip_mean": ("mean", "sign_flip"),
    "honest_median": ("median", "none"),
    "model_replacement_median": ("median", "model_replacement"),
    "alie_median": ("median", "alie"),
}


def environment(cache: str | None) -> dict:
    import flax
    import numpy as np
    import optax
    return {**device_record(), "devices": len(jax.devices()), "compile_cache": cache,
            "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(),
            "jax_version": jax.__version__, "flax_version": flax.__version__,
            "optax_version": optax.__version__, "numpy_version": np.__version__,
            "python": platform.python_version(),
            "date": datetime.date.today().isoformat(),
            "git_commit": _git_commit(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def _git_commit() -> str | None:
    """HEAD of the checkout this script lives in (None outside git)."""
    import subprocess
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)),
                              check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def _block(tree):
    jax.tree.map(lambda x: x.block_until_ready(), tree)


def build_variant(name: str, *, pop, model, sampler, cohort: int, num_malicious: int):
    """The FederatedRound of one variant."""
    defence, attack = VARIANTS[name]
    reducer = S.weighted_mean() if defence == "mean" else S.coordinate_median()
    alg = fs.make_algorithm("fedavg", model, client_lr=0.05, local_epochs=2, batch_size=10,
                            aggregator=reducer)
    observers = []
    if attack != "none":
        is_mal = P.malicious_by_permutation(pop.num_clients, num_malicious, seed=0)
        if attack == "alie":  # honest clients; the colluding stage forges their rows
            alg = alg.with_aggregator(S.chain(P.omniscient_attack("alie", is_mal), reducer))
        else:
            if attack == "model_replacement":
                trig = P.feature_trigger((0, 1, 2), 3.0)
                bad = P.model_replacement(trig, 0, boost=float(cohort))  # n / eta, eta = 1
            elif attack == "second_pass":
                def bad(honest_update, message, data, key, state=()):
                    # A new data object: the wrapper cannot reuse the honest run.
                    return honest_update(message, data.replace(x=data.x), key, state)
            else:
                bad = P.sign_flip(1.0)
            alg = alg.with_client(P.adversarial_client(alg.client, bad, is_mal))
        # As the runner does: a poisoned round also logs the aggregate's alignment with
        # the honest clients' mean (a second streamed accumulator), so that cost is included.
        observers.append(P.poisoning_diagnostics(is_mal))
    return fs.make_round(alg, sampler, observers=observers), defence, attack


def bench(population: int, cohort: int, fraction: float, rounds: int,
          variants: list[str]) -> list[dict]:
    pop = fs.data.procedural_label_skew(population, alpha=0.3, seed=0, max_examples=64)
    model = fs.make_model("softmax", pop.example_shape, pop.num_classes)
    sampler = fs.FixedSizeSampler(population, cohort)
    num_malicious = P.malicious_count(population, malicious_fraction=fraction)
    steps, states, compiles, times, meta = {}, {}, {}, {}, {}
    for name in variants:
        fr, defence, attack = build_variant(name, pop=pop, model=model, sampler=sampler,
                                            cohort=cohort, num_malicious=num_malicious)
        state = fr.init(jax.random.key(1))
        t0 = time.perf_counter()
        steps[name] = fr.step.lower(state, pop, jax.random.key(2)).compile()
        compiles[name] = time.perf_counter() - t0
        state, out = steps[name](state, pop, jax.random.key(2))  # warm-up
        _block((state.params, out.metrics))
        states[name], times[name] = state, []
        meta[name] = {"defence": defence, "attack": attack, "chunk_size": fr.chunk_size,
                      "alignment_metrics": attack != "none",
                      "num_params": model.num_params(state.params)}
    for r in range(rounds):  # interleaved
        for name in variants:
            t0 = time.perf_counter()
            states[name], out = steps[name](states[name], pop, jax.random.key(3 + r))
            _block((states[name].params, out.metrics))
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    base = med.get("honest_mean")
    records = []
    for name in variants:
        defence = meta[name]["defence"]
        same = med.get(f"honest_{defence}")
        records.append({
            "kind": "poisoned_round", "variant": name, **meta[name],
            "population": population, "cohort": cohort, "malicious_fraction": fraction,
            "num_malicious": num_malicious if meta[name]["attack"] != "none" else 0,
            "model": "softmax 60->10", "local_epochs": 2, "batch_size": 10,
            "compile_s": round(compiles[name], 3), "round_s_median": round(med[name], 4),
            "round_s_min": round(min(times[name]), 4), "rounds_timed": rounds,
            "ratio_to_honest_mean": None if base is None else round(med[name] / base, 3),
            "ratio_to_honest_same_defence":
                None if same is None else round(med[name] / same, 3)})
    return records


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--population", type=int, default=10_000)
    p.add_argument("--cohort", type=int, default=1000)
    p.add_argument("--fraction", type=float, default=0.01)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--output", help="also write the records (JSON lines) to this file")
    add_compile_cache_flag(p)
    args = p.parse_args(argv)
    env = environment(compile_cache(args))
    records = bench(args.population, args.cohort, args.fraction, args.rounds, args.variants)
    env["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    records = [{**rec, **env} for rec in records]
    for rec in records:
        print(json.dumps(rec), flush=True)
    if args.output:
        with open(args.output, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
