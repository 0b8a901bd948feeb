"""Client-update throughput: the engine vs a per-client Python loop vs centralised training.

For each workload (softmax regression and an MLP by default; `--workloads cnn` adds the
small CNN on 8x8 images) and cohort size, in one process:

* ``engine``: one full jitted round (sampling, gathering, local training of every
  client, weighted mean, server step) over a population of exactly ``cohort`` clients;
* ``loop``: the same one-client update, jitted once, called in a Python loop over the
  clients, the deltas summed by a jitted accumulator (what a simulator without
  vectorisation does);
* ``central_equiv``: the same examples and the same number of SGD steps trained as one
  centralised model: each step takes the union of the cohort's local batches
  (``cohort * batch_size`` examples), a scan of ``steps`` steps.

Each client holds ``examples`` examples and runs one local epoch of batch ``batch_size``,
so every method does the same forward/backward FLOPs. Prints one JSON record per line;
compile times are reported apart from steady-state medians.

Usage: python scripts/bench_throughput.py [--cohorts 100 1000 10000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

from _cpu_setup import add_compile_cache_flag, compile_cache, configure_cpu, device_record

if __name__ == "__main__":  # --cores / --devices act before JAX starts its backends
    configure_cpu(sys.argv)

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fedjax_sim as fs

DIM, CLASSES = 60, 10


def _timed(fn, repeats):
    """Median wall time of ``fn()`` (which must block) over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


EXAMPLE_SHAPES = {"softmax": (DIM,), "mlp": (DIM,), "cnn": (8, 8, 1)}
"""Example shape of each workload: 60 features, or 8x8 one-channel images (digits-sized)."""


def make_workload_model(workload):
    """The workload's model: softmax regression, a 200-200 MLP, or the small CNN."""
    return fs.make_model(workload, EXAMPLE_SHAPES[workload], CLASSES, hidden=(200, 200))


def make_population(cohort, examples, seed=0, example_shape=(DIM,)):
    """``cohort`` clients of ``examples`` Gaussian examples, labelled by a random linear map."""
    rng = np.random.default_rng(seed)
    dim = int(np.prod(example_shape))
    w = rng.normal(size=(dim, CLASSES))
    x = rng.normal(size=(cohort, examples, dim)).astype(np.float32)
    y = (x @ w).argmax(-1)
    x = x.reshape((cohort, examples) + tuple(example_shape))
    return fs.data.make_federated_data(x, y, np.full(cohort, examples), num_classes=CLASSES)


def centralised_equivalent(model, data, steps, batch_size, lr=0.05):
    """``(central, xb, yb)``: ``central(params, xb, yb)`` trains one model for ``steps`` SGD
    steps, step t on the union of every client's t-th local batch (``xb``, ``yb`` laid out
    step-major in advance, ``[steps, clients * batch_size, ...]``)."""
    clients, shape = data.x.shape[0], data.x.shape[2:]
    rows = steps * batch_size
    xb = jnp.asarray(np.asarray(data.x)[:, :rows].reshape(
        (clients, steps, batch_size) + shape).swapaxes(0, 1).reshape(
        (steps, clients * batch_size) + shape))
    yb = jnp.asarray(np.asarray(data.y)[:, :rows].reshape(
        clients, steps, batch_size).transpose(1, 0, 2).reshape(steps, clients * batch_size))
    opt = optax.sgd(lr)

    @jax.jit
    def central(params, xb, yb):
        def one(carry, batch):
            p, s = carry
            g = jax.grad(lambda q: model.per_example_loss(q, *batch).mean())(p)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        (p, _), _ = jax.lax.scan(one, (params, opt.init(params)), (xb, yb))
        return p

    return central, xb, yb


def bench(workload, cohort, *, examples, batch_size, chunk_size, repeats, loop_clients,
          mesh=None):
    model = make_workload_model(workload)
    data = make_population(cohort, examples, example_shape=EXAMPLE_SHAPES[workload])
    alg = fs.make_algorithm("fedavg", model, client_lr=0.05, local_epochs=1,
                            batch_size=batch_size)
    steps = -(-examples // batch_size)
    record = {"workload": workload, "cohort": cohort, "examples_per_client": examples,
              "batch_size": batch_size, "local_steps": steps, "chunk_size": chunk_size}

    # Engine: a whole round.
    fr = fs.make_round(alg, fs.FixedSizeSampler(cohort, cohort), chunk_size=chunk_size,
                       mesh=mesh)
    record["chunk_size"] = fr.chunk_size
    record["engine_devices"] = 1 if mesh is None else mesh.size
    state = fr.init(jax.random.key(0))
    t0 = time.perf_counter()
    step = fr.step.lower(state, data, jax.random.key(1)).compile()
    record["engine_compile_s"] = time.perf_counter() - t0
    holder = {"state": state, "r": 0}

    def engine_round():
        holder["r"] += 1
        holder["state"], out = step(holder["state"], data, jax.random.key(holder["r"]))
        jax.block_until_ready((holder["state"].params, out.metrics))

    engine_round()

    # Loop: the same one-client program, one jitted call per client.
    update = jax.jit(alg.client.update)
    add = jax.jit(lambda acc, d, w: jax.tree.map(lambda a, b: a + w * b, acc, d))
    params = state.params
    n_loop = min(cohort, loop_clients)
    mask = np.asarray(data.mask())
    clients = [fs.ClientData(x=data.x[k], y=data.y[k], mask=jnp.asarray(mask[k]),
                             client_id=jnp.int32(k)) for k in range(n_loop)]
    keys = jax.random.split(jax.random.key(2), n_loop)
    t0 = time.perf_counter()
    jax.block_until_ready(update(params, clients[0], keys[0], ()).upload)
    record["loop_compile_s"] = time.perf_counter() - t0

    def loop_round():
        acc = jax.tree.map(jnp.zeros_like, params)
        total = 0.0
        for k in range(n_loop):
            out = update(params, clients[k], keys[k], ())
            acc = add(acc, out.upload, out.weight)
            total += examples
        jax.block_until_ready(acc)

    loop_round()
    t_loop = _timed(loop_round, max(1, repeats // 2)) * cohort / n_loop
    record["loop_round_s"] = t_loop
    record["loop_clients_timed"] = n_loop
    record["loop_updates_per_s"] = cohort / t_loop

    # Centralised equivalent: same examples, same number of steps, one model.
    central, xb, yb = centralised_equivalent(model, data, steps, batch_size)

    t0 = time.perf_counter()
    jax.block_until_ready(central(params, xb, yb))
    record["central_compile_s"] = time.perf_counter() - t0
    # Engine and central alternate, so drifts in machine load hit both alike.
    t_engine, t_central = [], []
    for _ in range(repeats):
        t_engine.append(_timed(engine_round, 1))
        t_central.append(_timed(lambda: jax.block_until_ready(central(params, xb, yb)), 1))
    t_engine, t_central = statistics.median(t_engine), statistics.median(t_central)
    record["engine_round_s"] = t_engine
    record["engine_updates_per_s"] = cohort / t_engine
    record["central_round_s"] = t_central
    record["central_equiv_updates_per_s"] = cohort / t_central
    record["engine_vs_loop"] = t_loop / t_engine
    record["engine_vs_central_time"] = t_engine / t_central
    return record


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", nargs="+", default=["softmax", "mlp"],
                   choices=sorted(EXAMPLE_SHAPES))
    p.add_argument("--cohorts", nargs="+", type=int, default=[100, 1000, 10000])
    p.add_argument("--examples", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--chunk-size", type=int, default=0,
                   help="clients vectorised together; 0 = default_chunk_size")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--devices", type=int, default=1,
                   help="shard the engine's cohort over this many local devices; 0 = all "
                        "(on CPU, passing --devices makes one host device per core unless "
                        "XLA_FLAGS sets --xla_force_host_platform_device_count)")
    p.add_argument("--cores", type=int, default=0,
                   help="pin the process (engine, loop and central alike) to its first N "
                        "cores before JAX starts; 0 = every allowed core")
    p.add_argument("--loop-clients", type=int, default=1000,
                   help="clients actually timed in the loop (extrapolated linearly)")
    add_compile_cache_flag(p)
    args = p.parse_args()
    cache = compile_cache(args)  # before the first compile
    env = {"jax": jax.__version__, **device_record(),
           "device": str(jax.devices()[0].device_kind), "cpu": platform.processor() or
           platform.machine(), "date": time.strftime("%Y-%m-%d"),
           "cores": fs.usable_cores(), "compile_cache": cache}
    try:
        mesh = fs.mesh_for(args.devices)
    except fs.ConfigError as e:
        p.error(f"--devices: {e}")
    env["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    for workload in args.workloads:
        for cohort in args.cohorts:
            rec = bench(workload, cohort, examples=args.examples, batch_size=args.batch_size,
                        chunk_size=args.chunk_size or None, repeats=args.repeats,
                        loop_clients=args.loop_clients, mesh=mesh)
            print(json.dumps(rec | env), flush=True)


if __name__ == "__main__":
    main()
