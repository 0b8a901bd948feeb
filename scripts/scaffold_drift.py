"""FedAvg vs SCAFFOLD under client drift: rounds to reach FedAvg's final training loss.

Setting: a procedural label-skewed population (:func:`fedjax_sim.data.label_skew.
procedural_label_skew`, Dirichlet ``alpha`` small, so each client sees one or two of the
ten classes), softmax regression, several local epochs of plain SGD with a moderate
learning rate: the regime where FedAvg's clients drift towards their own optima
(Karimireddy et al., "SCAFFOLD", ICML 2020). Both algorithms get the same
population, the same initial params, the same sampler and the same round keys, so they
see the same cohorts and the same local shuffles; only SCAFFOLD's control variates differ.

The training loss compared is a global one: after every round the full training
objective (the mean loss over clients, ``uniform`` client weighting, as both algorithms
optimise; or the example-weighted mean with ``--weighting examples``) is evaluated on a
fixed set of ``--eval-clients`` clients' training data. The script reports both curves,
FedAvg's final loss and the first round at which SCAFFOLD reaches it, with the hardware,
versions, date, and compile time apart from the steady-state round time.

Result (``docs/scaffold_drift.json``; defaults: N = 2000 clients, 100 per round,
alpha = 0.05, 5 local epochs of batch 10 at client lr 0.1, 100 rounds, uniform weights):
FedAvg's final loss (0.717) is first reached by FedAvg at round 84 and by SCAFFOLD at
round 40. Seeds 1 and 2 give 100 vs 45 and 91 vs 41. Participation matters: with
N = 5000 (2% per round, so each ``c_i`` is refreshed less often) the gain shrinks to
88 vs 59 rounds.

Prints one JSON object on stdout (nothing else). Usage::

    python scripts/scaffold_drift.py [--seed 0] [--output docs/scaffold_drift.json]
    python scripts/scaffold_drift.py --quick        # tiny, mostly compile: smoke tests
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fedjax_sim as fs
from _cpu_setup import add_compile_cache_flag, compile_cache, device_record

QUICK = {"clients": 200, "cohort": 10, "rounds": 4, "eval_clients": 50, "local_epochs": 2}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=2000, help="population size N")
    p.add_argument("--cohort", type=int, default=100, help="clients sampled per round")
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--alpha", type=float, default=0.05, help="Dirichlet label skew")
    p.add_argument("--local-epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--client-lr", type=float, default=0.1)
    p.add_argument("--server-lr", type=float, default=1.0)
    p.add_argument("--weighting", choices=("uniform", "examples"), default="uniform")
    p.add_argument("--eval-clients", type=int, default=1000,
                   help="fixed clients whose training data define the global loss")
    p.add_argument("--chunk-size", type=int, default=0, help="0 = the engine's default")
    p.add_argument("--seed", type=int, default=0, help="population, init and round keys")
    p.add_argument("--quick", action="store_true", help="tiny run (compile-dominated): " +
                   ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    p.add_argument("--output", help="also write the JSON here")
    add_compile_cache_flag(p)
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    if args.eval_clients > args.clients:
        p.error(f"--eval-clients={args.eval_clients} exceeds --clients={args.clients}")
    return args


def first_round_reaching(losses: list[float], target: float) -> int | None:
    """The 1-based round after which ``losses`` first is <= ``target`` (None: never)."""
    hits = np.flatnonzero(np.asarray(losses) <= target)
    return int(hits[0]) + 1 if hits.size else None


def run(name, alg, args, population, eval_data, model, loss_field):
    """Trains ``alg`` for ``args.rounds`` rounds; the global loss after each round."""
    sampler = fs.FixedSizeSampler(args.clients, args.cohort)
    fr = fs.make_round(alg, sampler, chunk_size=args.chunk_size or None)
    state = fr.init(jax.random.key(args.seed))
    round_key = lambda r: jax.random.fold_in(jax.random.key(args.seed + 1), r)
    t0 = time.perf_counter()
    step = fr.step.lower(state, population, round_key(0)).compile()
    compile_s = time.perf_counter() - t0

    def global_loss(params):
        return fs.evaluate_clients(model, params, eval_data)[loss_field]

    losses, client_losses, round_s = [], [], 0.0
    initial = global_loss(state.params)
    for r in range(args.rounds):
        t0 = time.perf_counter()
        state, out = step(state, population, round_key(r))
        jax.block_until_ready(state)
        round_s += time.perf_counter() - t0
        losses.append(global_loss(state.params))
        client_losses.append(float(out.metrics["train_loss"]))
    return {"algorithm": name, "compile_s": compile_s,
            "steady_round_s": round_s / args.rounds, "chunk_size": fr.chunk_size,
            "initial_loss": initial, "train_loss": losses,
            "cohort_local_train_loss": client_losses}


def main(argv=None):
    args = parse_args(argv)
    cache = compile_cache(args)  # before the first compile
    started = time.perf_counter()
    population = fs.data.procedural_label_skew(args.clients, alpha=args.alpha, seed=args.seed)
    model = fs.make_model("softmax", population.example_shape, population.num_classes)
    eval_ids = np.random.default_rng(args.seed).choice(args.clients, args.eval_clients,
                                                       replace=False)
    eval_data = jax.jit(population.cohort_data)(jnp.asarray(np.sort(eval_ids), jnp.int32))
    loss_field = ("loss_client_averaged" if args.weighting == "uniform"
                  else "loss_example_weighted")
    common = {"client_lr": args.client_lr, "local_epochs": args.local_epochs,
              "batch_size": args.batch_size, "server_lr": args.server_lr,
              "weighting": args.weighting}
    algorithms = {
        "fedavg": fs.make_algorithm("fedavg", model, **common),
        "scaffold": fs.algorithms.scaffold.scaffold(model, **common),
    }
    runs = {name: run(name, alg, args, population, eval_data, model, loss_field)
            for name, alg in algorithms.items()}
    target = runs["fedavg"]["train_loss"][-1]
    reach = {name: first_round_reaching(r["train_loss"], target) for name, r in runs.items()}
    result = {
        "experiment": "scaffold_drift",
        "question": "rounds SCAFFOLD needs to reach FedAvg's final global training loss",
        "settings": {
            "population": "procedural_label_skew", "clients": args.clients,
            "alpha": args.alpha, "dim": population.dim,
            "num_classes": population.num_classes,
            "max_examples": population.max_examples,
            "min_examples": population.min_examples, "model": "softmax",
            "cohort": args.cohort, "sampler": "FixedSizeSampler", "rounds": args.rounds,
            "local_epochs": args.local_epochs, "batch_size": args.batch_size,
            "client_lr": args.client_lr, "server_lr": args.server_lr,
            "weighting": args.weighting, "client_optimizer": "sgd",
            "eval_clients": args.eval_clients, "loss": loss_field, "seed": args.seed,
            "quick": args.quick},
        "fedavg_final_loss": target,
        "scaffold_final_loss": runs["scaffold"]["train_loss"][-1],
        "fedavg_rounds_to_target": reach["fedavg"],
        "scaffold_rounds_to_target": reach["scaffold"],
        "round_speedup": (reach["fedavg"] / reach["scaffold"]) if reach["scaffold"] else None,
        "runs": runs,
        "bayes_accuracy_estimate": population.bayes_accuracy(20_000),
        "total_s": time.perf_counter() - started,
        "hardware": {**device_record(), "devices": [str(d) for d in jax.devices()],
                     "compile_cache": cache,
                     "cpu": platform.processor() or platform.machine(),
                     "cpu_count": os.cpu_count(),
                     "load_average_1min_at_end": os.getloadavg()[0]},
        "versions": {"python": platform.python_version(), "jax": jax.__version__,
                     "optax": optax.__version__, "fedjax_sim": fs.__version__},
        "date": time.strftime("%Y-%m-%d"),
    }
    text = json.dumps(result)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
