"""DP-FedAvg overhead and robust-reducer cost: prints one JSON record per line.

(a) ``kind="round"``: one full jitted round of the main job (procedural label-skew
    population, softmax model, FedAvg local training, fixed-size cohort) with the
    server chain swapped: ``fedavg`` (example-weighted mean) vs ``dp_fedavg`` (clip each
    client, sum, Gaussian noise, divide by the cohort: streams chunk by chunk like the
    mean) vs ``dp_fedavg_adaptive`` (Andrew et al. 2021 adaptive clipping; ``streaming``
    in the record says whether the round reduced chunk by chunk or stacked the cohort's
    deltas). Rounds of the variants are interleaved and the median steady-state time is
    reported, with the ratio to FedAvg.
(b) ``kind="reducer"``: one jitted server-chain update on stacked random client
    updates shaped like a 2-layer MLP 60-32-10 (2,282 parameters) at each cohort size:
    mean, median, trimmed mean (10%), Krum, Multi-Krum, Bulyan (f = 1% of the cohort),
    geometric median (8 Weiszfeld iterations), centred clipping, and the DP-FedAvg chain.

Compile time (``lower().compile()``) is reported apart from the steady-state median.
Timing is noisy on shared machines: compare records of the same run only.

Usage: python scripts/bench_dp_and_reducers.py [--cohorts 1000 10000] [--repeats 3]
           [--large-repeats 2]
           [--round-cohort 1000] [--rounds 30] [--skip-round] [--skip-reducers]
           [--output docs/bench_dp_reducers.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import fedjax_sim as fs
from _cpu_setup import add_compile_cache_flag, compile_cache, device_record

S = fs.server

MLP_SHAPES = {"w1": (60, 32), "b1": (32,), "w2": (32, 10), "b2": (10,)}


def environment(cache: str | None) -> dict:
    return {**device_record(), "devices": len(jax.devices()), "compile_cache": cache,
            "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(),
            "jax_version": jax.__version__, "python": platform.python_version()}


def _block(tree):
    jax.tree.map(lambda x: x.block_until_ready(), tree)


def bench_round(cohort: int, rounds: int, num_clients: int) -> list[dict]:
    """FedAvg vs DP-FedAvg (fixed and adaptive clipping) round time on the main job."""
    pop = fs.data.procedural_label_skew(num_clients, alpha=0.3, seed=0, max_examples=64)
    model = fs.make_model("softmax", pop.example_shape, pop.num_classes)
    key = jax.random.key(0)
    chains = {
        "fedavg": S.weighted_mean(),
        "dp_fedavg": S.dp_fedavg_aggregator(0.5, 1.0, cohort, key=key),
        "dp_fedavg_adaptive": S.dp_fedavg_aggregator(0.5, 1.0, cohort, key=key,
                                                     adaptive=True),
    }
    sampler = fs.FixedSizeSampler(num_clients, cohort)
    steps, states, compiles, times, streaming, chunk = {}, {}, {}, {}, {}, None
    for name, aggregator in chains.items():
        alg = fs.make_algorithm("fedavg", model, client_lr=0.05, local_epochs=2,
                                batch_size=10,
                                weighting="uniform" if name != "fedavg" else "examples",
                                aggregator=aggregator)
        fr = fs.make_round(alg, sampler)
        chunk, streaming[name] = fr.chunk_size, fr.streaming
        state = fr.init(jax.random.key(1))
        t0 = time.perf_counter()
        steps[name] = fr.step.lower(state, pop, jax.random.key(2)).compile()
        compiles[name] = time.perf_counter() - t0
        state, out = steps[name](state, pop, jax.random.key(2))  # warm-up
        _block(out.metrics)
        states[name], times[name] = state, []
    for r in range(rounds):  # Interleaved, so load changes hit every variant alike.
        for name in chains:
            t0 = time.perf_counter()
            states[name], out = steps[name](states[name], pop, jax.random.key(3 + r))
            _block((states[name].params, out.metrics))
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["fedavg"])
    records = []
    for name in chains:
        med = statistics.median(times[name])
        records.append({
            "kind": "round", "variant": name, "cohort": cohort, "population": num_clients,
            "model": "softmax 60->10", "num_params": model.num_params(states[name].params),
            "local_epochs": 2, "batch_size": 10, "chunk_size": chunk,
            "streaming": streaming[name],
            "compile_s": round(compiles[name], 3), "round_s_median": round(med, 4),
            "round_s_min": round(min(times[name]), 4), "rounds_timed": rounds,
            "ratio_to_fedavg": round(med / base, 3),
            "ratio_to_fedavg_min": round(min(times[name]) / min(times["fedavg"]), 3)})
    return records


def random_cohort(cohort: int, seed: int = 0) -> S.CohortUpdates:
    rng = np.random.default_rng(seed)
    updates = {k: jnp.asarray(rng.normal(size=(cohort, *s)).astype(np.float32) * 0.01)
               for k, s in MLP_SHAPES.items()}
    return S.CohortUpdates(updates, jnp.ones((cohort,), jnp.float32),
                           jnp.ones((cohort,), bool))


def reducers(cohort: int) -> dict:
    """``name -> (stage or chain, its settings)``; the settings are the record's
    ``params``."""
    f = max(1, cohort // 100)
    return {
        "mean": (S.weighted_mean(), {}),
        "median": (S.coordinate_median(), {}),
        "trimmed_mean": (S.trimmed_mean(0.1), {"trim_fraction": 0.1}),
        "krum": (S.krum(f), {"num_byzantine": f}),
        "multi_krum": (S.multi_krum(f, cohort - f),
                       {"num_byzantine": f, "num_selected": cohort - f}),
        "bulyan": (S.bulyan(f), {"num_byzantine": f, "selection": "one_shot"}),
        "geometric_median": (S.geometric_median(8, 1e-6), {"num_iters": 8, "eps": 1e-6}),
        "centered_clipping": (S.centered_clipping(1.0, 1), {"tau": 1.0, "num_iters": 1}),
        "dp_fedavg": (S.dp_fedavg_aggregator(1.0, 1.0, cohort, key=jax.random.key(0)),
                      {"clip_norm": 1.0, "noise_multiplier": 1.0,
                       "expected_clients": cohort}),
    }


def bench_reducers(cohort: int, repeats: int):
    """Yields one record per reducer (as soon as it is measured)."""
    values = random_cohort(cohort)
    params = jax.tree.map(lambda u: u[0], values.updates)
    num_params = sum(int(np.prod(s)) for s in MLP_SHAPES.values())
    for name, (aggregator, settings) in reducers(cohort).items():
        state = aggregator.init(params)
        t0 = time.perf_counter()
        fn = jax.jit(aggregator.update).lower(values, state).compile()
        compile_s = time.perf_counter() - t0
        times = []  # AOT-compiled: the first call does no tracing, so no warm-up call
        for _ in range(repeats):
            t0 = time.perf_counter()
            _block(fn(values, state))
            times.append(time.perf_counter() - t0)
        yield {"kind": "reducer", "reducer": name, "cohort": cohort,
               "model": "mlp 60-32-10", "num_params": num_params,
               "params": settings, "stages": list(S.as_chain(aggregator).names),
               "compile_s": round(compile_s, 3),
               "steady_s_median": round(statistics.median(times), 4),
               "steady_s_min": round(min(times), 4), "repeats": repeats}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cohorts", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--large-repeats", type=int, default=2,
                   help="repeats for cohorts >= 5000 (Krum/Bulyan take ~30 s a call there)")
    p.add_argument("--round-cohort", type=int, default=1000)
    p.add_argument("--population", type=int, default=10_000)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--skip-round", action="store_true")
    p.add_argument("--skip-reducers", action="store_true")
    p.add_argument("--output", help="also write the records (JSON lines) to this file")
    add_compile_cache_flag(p)
    args = p.parse_args(argv)
    env = environment(compile_cache(args))
    records = []

    def emit(rec):
        rec = {**rec, **env}
        records.append(rec)
        print(json.dumps(rec), flush=True)

    if not args.skip_round:
        for rec in bench_round(args.round_cohort, args.rounds, args.population):
            emit(rec)
    if not args.skip_reducers:
        for c in args.cohorts:
            for rec in bench_reducers(c, args.repeats if c < 5000 else args.large_repeats):
                emit(rec)
    if args.output:
        with open(args.output, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in records)


if __name__ == "__main__":
    main()
