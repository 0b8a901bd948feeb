"""Where the engine's time goes: the engine round vs bare vectorised SGD vs central.

For one workload and cohort, in one process, with interleaved repeats:

* ``engine``: one full jitted FedAvg round (sampling, gathering, per-epoch shuffling,
  masked local training with metrics, finite checks, weighted mean, server step);
* ``bare``: the plain way to vectorise the same work: every client runs the same SGD
  steps on its own copy of the params, on data laid out in advance (no sampling,
  gathering, shuffling, masks, metrics or finite checks), a ``vmap`` in chunks sharded
  over the same devices, and the deltas are summed;
* ``central``: the centralised equivalent of ``bench_throughput.py`` (one model, each
  step on the union of the cohort's local batches).

``bare / central`` is what per-client params cost on this backend when nothing else is
done; ``engine / bare`` is what the simulator's features add, less what its layout work
(chunk sizes, the Dense weight-gradient layout) saves. Prints one JSON record.

Usage: python scripts/bench_engine_breakdown.py [--workload softmax|mlp] [--cohort 1000]
       [--devices 0]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from _cpu_setup import add_compile_cache_flag, compile_cache, configure_cpu, device_record

if __name__ == "__main__":  # --cores / --devices act before JAX starts its backends
    configure_cpu(sys.argv)

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

import fedjax_sim as fs
from bench_throughput import (EXAMPLE_SHAPES, centralised_equivalent, make_population,
                              make_workload_model)

LR = 0.05


def make_bare(model, chunk, mesh):
    """Summed deltas of plain per-client SGD over step-major ``[C, steps, batch, ...]`` data."""

    def one_client(params, xs, ys):
        def step(p, batch):
            g = jax.grad(lambda q: model.per_example_loss(q, *batch).mean())(p)
            return jax.tree.map(lambda a, b: a - LR * b, p, g), None

        final, _ = jax.lax.scan(step, params, (xs, ys))
        return jax.tree.map(jnp.subtract, final, params)

    def local(params, x, y):
        c = x.shape[0]
        n = min(chunk, c)
        # The barrier keeps XLA from fusing the weight-gradient dot into the sum over
        # clients, a fusion that runs several times slower on XLA:CPU.
        out = jax.lax.map(lambda a: jax.tree.map(
            lambda d: jax.lax.optimization_barrier(d).sum(0),
            jax.vmap(lambda xs, ys: one_client(params, xs, ys))(*a)),
            (x.reshape((c // n, n) + x.shape[1:]), y.reshape((c // n, n) + y.shape[1:])))
        return jax.tree.map(lambda a: a.sum(0), out)

    if mesh is None:
        return jax.jit(local)
    axis = mesh.axis_names[0]  # the round's clients axis (fs.client_mesh)
    spec = PartitionSpec(axis)

    def sharded(params, x, y):
        return jax.shard_map(
            lambda p, a, b: jax.tree.map(lambda t: jax.lax.psum(t, axis), local(p, a, b)),
            mesh=mesh, in_specs=(PartitionSpec(), spec, spec), out_specs=PartitionSpec(),
            check_vma=False)(params, x, y)

    return jax.jit(sharded)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", choices=sorted(EXAMPLE_SHAPES), default="softmax")
    p.add_argument("--cohort", type=int, default=1000)
    p.add_argument("--examples", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--devices", type=int, default=1,
                   help="devices to shard clients over; 0 = all (on CPU, one per core)")
    p.add_argument("--cores", type=int, default=0,
                   help="pin the process to its first N cores before JAX starts; 0 = all")
    add_compile_cache_flag(p)
    args = p.parse_args()
    cache = compile_cache(args)  # before the first compile
    c, n, b = args.cohort, args.examples, args.batch_size
    if n % b:
        p.error(f"--examples={n} must be a multiple of --batch-size={b}")
    steps = n // b
    try:
        mesh = fs.mesh_for(args.devices)
    except fs.ConfigError as e:
        p.error(f"--devices: {e}")
    num_devices = 1 if mesh is None else mesh.size
    if c % num_devices:
        p.error(f"--cohort={c} must be a multiple of the {num_devices} devices")

    model = make_workload_model(args.workload)
    shape = EXAMPLE_SHAPES[args.workload]
    data = make_population(c, n, example_shape=shape)
    alg = fs.make_algorithm("fedavg", model, client_lr=LR, local_epochs=1, batch_size=b)
    fr = fs.make_round(alg, fs.FixedSizeSampler(c, c), mesh=mesh)
    state = fr.init(jax.random.key(0))
    t0 = time.perf_counter()
    engine_step = fr.step.lower(state, data, jax.random.key(1)).compile()
    engine_compile = time.perf_counter() - t0
    params = state.params

    # The bare chunk: the largest divisor of the per-device cohort up to the engine's.
    per_device = c // num_devices
    chunk = max(d for d in range(1, fr.chunk_size + 1) if per_device % d == 0)
    bare = make_bare(model, chunk, mesh)
    x = np.asarray(data.x)[:, :n].reshape((c, steps, b) + shape)
    y = np.asarray(data.y)[:, :n].reshape(c, steps, b)
    if mesh is not None:
        shard = NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))
        x, y = jax.device_put(x, shard), jax.device_put(y, shard)
    else:
        x, y = jnp.asarray(x), jnp.asarray(y)

    central, xb, yb = centralised_equivalent(model, data, steps, b, lr=LR)

    holder = {"r": 1}

    def run_engine():
        holder["r"] += 1
        _, out = engine_step(state, data, jax.random.key(holder["r"]))
        jax.block_until_ready(out.metrics)

    runs = {"engine": run_engine,
            "bare": lambda: jax.block_until_ready(bare(params, x, y)),
            "central": lambda: jax.block_until_ready(central(params, xb, yb))}
    for fn in runs.values():
        fn()
    times = {k: [] for k in runs}
    for _ in range(args.repeats):
        for k, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    record = {"workload": args.workload, "cohort": c, "examples_per_client": n,
              "batch_size": b, "local_steps": steps, "devices": num_devices,
              "engine_chunk": fr.chunk_size, "bare_chunk": chunk,
              "engine_compile_s": engine_compile,
              **{f"{k}_round_s": v for k, v in med.items()},
              **{f"{k}_updates_per_s": c / v for k, v in med.items()},
              "engine_vs_central_time": med["engine"] / med["central"],
              "bare_vs_central_time": med["bare"] / med["central"],
              "engine_vs_bare_time": med["engine"] / med["bare"],
              "cores": fs.usable_cores(),
              "jax": jax.__version__, **device_record(), "compile_cache": cache,
              "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
