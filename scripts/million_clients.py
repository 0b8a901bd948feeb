"""One pass of FedAvg client updates over 1,000,000 procedural clients.

Every client's 50 examples are generated inside jit from (population key, client id), so
the population costs no memory; a cyclic sampler walks the whole population in disjoint
cohorts of ``--cohort`` clients, each round is the ordinary jitted FedAvg round (softmax
regression, 1 local epoch, batch 10), and the weighted mean is reduced chunk by chunk.

Every core by default: on CPU the host is split into one XLA device per usable core
(``fs.use_every_cpu_core``; ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` takes
precedence) and each round's cohort is sharded over every device; ``--devices K`` uses the
first K devices, ``--devices 1`` one unsplit device. A cohort that is not a multiple of
the device count is padded up to one with empty slots (``cohort_capacity``), which train
nothing and are not counted. On a GPU or TPU the devices are the accelerators.

Prints one JSON object: total seconds, compile seconds (apart), client updates per
second, the devices used and the process's peak resident memory, next to the memory the
population's data would take if it were materialised; the backend and device kind, and
the persistent compilation cache in use (``compile_cache``, null under
``--no-compile-cache``: the compile time is a cold compile only then, or with an empty
cache).

Usage: python scripts/million_clients.py [--clients 1000000] [--cohort 10000]
           [--devices 0] [--no-compile-cache]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax

import fedjax_sim as fs
from _cpu_setup import add_compile_cache_flag, compile_cache, device_record, peak_rss_mib


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=1_000_000)
    p.add_argument("--cohort", type=int, default=10_000)
    p.add_argument("--examples", type=int, default=50)
    p.add_argument("--chunk-size", type=int, default=0, help="0 = default_chunk_size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--devices", type=int, default=0,
                   help="devices to shard each cohort over; 0 = all (on CPU, one per usable "
                        "core); 1 = one device, the CPU left unsplit")
    add_compile_cache_flag(p)
    args = p.parse_args(argv)
    if args.clients % args.cohort:
        p.error(f"--cohort={args.cohort} must divide --clients={args.clients}")
    if args.devices < 0:
        p.error(f"--devices={args.devices}: must be >= 0")
    if args.devices != 1:  # before JAX starts its backends
        fs.use_every_cpu_core()
    cache = compile_cache(args)  # before the first compile
    try:
        mesh = fs.mesh_for(args.devices or None)
    except fs.ConfigError as e:
        p.error(f"--devices: {e}")

    pop = fs.data.procedural_label_skew(args.clients, alpha=0.3, seed=args.seed,
                                        max_examples=args.examples,
                                        min_examples=args.examples)
    model = fs.make_model("softmax", pop.example_shape, pop.num_classes)
    alg = fs.make_algorithm("fedavg", model, client_lr=0.05, local_epochs=1, batch_size=10)
    sampler = fs.CyclicSampler(args.clients, args.cohort, seed=args.seed)
    fr = fs.make_round(alg, sampler, chunk_size=args.chunk_size or None, mesh=mesh)
    state = fr.init(jax.random.key(args.seed))
    rss_before = peak_rss_mib()

    t0 = time.perf_counter()
    step = fr.step.lower(state, pop, jax.random.key(0)).compile()
    compile_s = time.perf_counter() - t0

    rounds = args.clients // args.cohort
    updates = 0
    t0 = time.perf_counter()
    for r in range(rounds):
        state, out = step(state, pop, jax.random.fold_in(jax.random.key(args.seed), r))
        # Sampled clients only (padding slots are masked); blocks: one round in flight.
        updates += int(out.metrics["num_clients"])
    jax.block_until_ready(state.params)
    total_s = time.perf_counter() - t0
    materialised_mib = args.clients * args.examples * (pop.dim + 2) * 4 / 2**20
    print(json.dumps({
        "clients": args.clients, "cohort": args.cohort, "rounds": rounds,
        "examples_per_client": args.examples, "client_updates": updates,
        "devices": 1 if mesh is None else mesh.size, "cohort_capacity": fr.cohort_capacity,
        "chunk_size": fr.chunk_size, "compile_seconds": compile_s,
        "total_seconds": total_s, "client_updates_per_s": updates / total_s,
        "peak_rss_mib": peak_rss_mib(), "rss_before_compile_mib": rss_before,
        "materialised_population_would_take_mib": materialised_mib,
        **device_record(), "compile_cache": cache, "cores": fs.usable_cores(),
        "jax": jax.__version__, "cpu": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d")}))


if __name__ == "__main__":
    main()
