"""Secure aggregation and distributed DP: what they cost in accuracy, epsilon and time.

One JSON object per line on stdout, one experiment per mode (BENCHMARKS.md records them):

* ``dme``: distributed mean estimation (Kairouz et al. 2021, Sec. 6): ``n`` vectors of
  dimension ``d`` drawn uniformly on the sphere of radius ``c``, one release at
  ``(epsilon, 1e-5)``, no sampling. The secure mean (rotation, conditional rounding,
  distributed discrete Gaussian shares, ``b``-bit modular sum, decoding) against the
  central continuous Gaussian mean at the same epsilon, whose MSE is
  ``d (z_c c)^2 / n^2``. The scale assumes the sum's norm ``sqrt(n) c`` (independent
  vectors); a bit width that cannot hold ``n`` rounding errors is reported as null.
* ``dropout``: epsilon of a distributed-DP run (the main job's sampling, ``rounds``
  rounds) against the dropout rate, beside ``epsilon_0 / sqrt(1 - d)``.
* ``accuracy``: final test accuracy versus bits at a fixed target epsilon on the main
  job's population (Poisson sampling, DDG), beside central DP-FedAvg at the same epsilon
  and plain FedAvg.
* ``cost``: the time of a secure round against a plain round at cohort 1,000 (softmax
  and the MLP with one hidden layer of 256), interleaved in one process: plain FedAvg
  with the same clipping and unit weights, the secure sum in the default mode, and full
  masking with ``k = 16`` neighbours; compile time apart.

    python scripts/bench_secagg.py dme
    python scripts/bench_secagg.py cost --repeats 5
    python scripts/bench_secagg.py accuracy --rounds 30
    python scripts/bench_secagg.py plot --inputs docs/bench_secagg_*.jsonl
"""

from __future__ import annotations

import sys

from _cpu_setup import add_compile_cache_flag, compile_cache, configure_cpu, device_record

configure_cpu(sys.argv)  # before JAX starts: --cores N pins, --devices splits the CPU

import argparse
import json
import math
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import fedjax_sim as fs

DELTA = 1e-5
CACHE: dict[str, str | None] = {"dir": None}  # set by main(): the compile cache in use


def _env() -> dict:
    return {**device_record(), "devices": len(jax.devices()), "compile_cache": CACHE["dir"],
            "jax": jax.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d")}


def _sphere(key, n: int, d: int, radius: float) -> jax.Array:
    x = jax.random.normal(key, (n, d), jnp.float32)
    return x / jnp.linalg.norm(x, axis=1, keepdims=True) * radius


def _dme_errors(cfg, n: int, d: int, c: float, trials: int, *, key) -> list[float]:
    """Squared errors of the secure mean of ``trials`` fresh cohorts on the sphere."""
    chain = fs.server.chain(fs.secagg.secure_sum(cfg, key=key))
    state = chain.init({"x": jnp.zeros((d,), jnp.float32)})
    ids = jnp.arange(n, dtype=jnp.int32)

    @jax.jit
    def trial(key, state):
        x = _sphere(key, n, d, c)
        cohort = fs.server.CohortUpdates({"x": x}, jnp.ones((n,), jnp.float32),
                                         jnp.ones((n,), bool), ids)
        roster = chain.setup(ids, cohort.mask, state)
        agg, state, _ = chain.reduce(cohort, state, roster)
        err = agg["x"] / n - jnp.mean(x, axis=0)
        return jnp.sum(err * err), state

    errs = []
    for t in range(trials):
        e, state = trial(jax.random.key(1000 + t), state)
        errs.append(float(e))
    return errs


def dme(args) -> None:
    d, c, mech = args.dim, args.norm, args.mechanism
    p = 1 << (d - 1).bit_length()
    one_shot = fs.privacy.SamplingSpec.poisson(1.0)
    for n in args.clients:
        for eps in args.epsilons:
            z_central = fs.privacy.calibrate_noise_multiplier(eps, DELTA, 1, one_shot)
            central_mse = d * (z_central * c) ** 2 / n ** 2
            for bits in args.bits:
                row = {"mode": "dme", "clients": n, "dim": d, "norm": c, "epsilon": eps,
                       "bits": bits, "mechanism": mech, "central_z": z_central,
                       "central_mse": central_mse}
                if 2 ** (bits - 1) - 1 <= n:
                    print(json.dumps({**row, "secure_mse": None, "mse_ratio": None,
                                      "why": f"{bits} bits cannot hold {n} rounding errors"}))
                    continue

                def settings(z, n=n, bits=bits):
                    return fs.secagg.SecureAggregation(
                        bits=bits, clip_norm=c, dim=d, capacity=n, expected_clients=float(n),
                        noise=mech, noise_multiplier=z, sum_norm=math.sqrt(n) * c)

                try:
                    z = fs.privacy.calibrate_distributed(
                        eps, DELTA, 1, mech, clip_norm=c, bits=bits, dim=p,
                        expected_clients=float(n), sampling=one_shot,
                        scale=lambda z: settings(z).scale)
                    cfg = settings(z)
                    cfg.scale  # noqa: B018 (raises if the shares cannot be sampled)
                except fs.ConfigError as e:
                    print(json.dumps({**row, "secure_mse": None, "mse_ratio": None,
                                      "why": str(e)}))
                    continue
                errs = _dme_errors(cfg, n, d, c, args.trials, key=jax.random.key(bits))
                mse = float(np.mean(errs))
                print(json.dumps({**row, "z": z, "scale": cfg.scale,
                                  "local_std": cfg.local_std, "secure_mse": mse,
                                  "mse_ratio": mse / central_mse, "trials": args.trials,
                                  **_env()}), flush=True)


def dropout(args) -> None:
    cfg = fs.make_config({})
    m = cfg.sampling.cohort_size
    q = m / cfg.data.num_clients
    spec = fs.privacy.SamplingSpec.poisson(q)
    for bits in args.bits:
        base = None
        for d in args.rates:
            noise = fs.privacy.DistributedNoise(args.mechanism, args.noise_multiplier,
                                                1.0, bits, 1024, float(m))
            acc = noise.ledger(spec, delta=DELTA)
            acc.record_round(args.rounds, survivors=fs.privacy.expected_survivors(m, d))
            eps = acc.epsilon()
            base = eps if d == 0 else base
            print(json.dumps({"mode": "dropout", "bits": bits, "mechanism": args.mechanism,
                              "noise_multiplier": args.noise_multiplier, "rate": q,
                              "rounds": args.rounds, "dropout": d, "epsilon": eps,
                              "epsilon0_over_sqrt": base / math.sqrt(1 - d),
                              "ratio": eps / (base / math.sqrt(1 - d)), **_env()}),
                  flush=True)


def accuracy(args) -> None:
    m = 1000
    base = {"sampling": "poisson", "sampling_rate": m / 10_000, "rounds": args.rounds,
            "clip_norm": args.clip_norm, "eval_every": args.rounds}
    runs = [("plain", {"rounds": args.rounds, "eval_every": args.rounds}),
            ("central_dp", {**base, "aggregator": "dp_fedavg",
                            "target_epsilon": args.epsilon})]
    runs += [(f"ddg_{b}bits", {**base, "aggregator": "dp_fedavg", "secure_aggregation": True,
                               "mechanism": "ddg", "bits": b, "target_epsilon": args.epsilon})
             for b in args.bits]
    for name, overrides in runs:
        try:
            summary = fs.run_experiment(fs.make_config(overrides), progress=False)
        except fs.ConfigError as e:
            print(json.dumps({"mode": "accuracy", "run": name, "error": str(e)}), flush=True)
            continue
        privacy = summary.get("privacy", {})
        print(json.dumps({"mode": "accuracy", "run": name, "config": overrides,
                          "test_accuracy": summary["test_accuracy"],
                          "epsilon": summary.get("epsilon"),
                          "noise_multiplier": summary.get("noise_multiplier"),
                          "statement": privacy.get("statement"),
                          "bytes_up_per_client": summary["communication"]["upload_per_client"],
                          "compile_seconds": summary["compile_seconds"],
                          "train_seconds": summary["train_seconds"], **_env()}), flush=True)


def _timed_round(exp):
    state = exp.round.init(jax.random.key(0))
    pop = exp.data.population
    t0 = time.perf_counter()
    step = exp.round.step.lower(state, pop, jax.random.key(1)).compile()
    compile_s = time.perf_counter() - t0
    state, _ = step(state, pop, jax.random.key(1))
    jax.block_until_ready(state)
    holder = {"state": state, "r": 2}

    def run(rounds: int) -> float:
        t0 = time.perf_counter()
        for _ in range(rounds):
            holder["state"], out = step(holder["state"], pop, jax.random.key(holder["r"]))
            holder["r"] += 1
        jax.block_until_ready(holder["state"])
        return (time.perf_counter() - t0) / rounds

    return compile_s, run


def cost(args) -> None:
    for model in args.models:
        common = {"model": model, "cohort_size": args.cohort, "clip_norm": 1.0,
                  "weighting": "uniform", "num_clients": args.num_clients}
        if model == "mlp":
            common["hidden"] = "256"
        variants = {"plain": {**common},
                    "secure": {**common, "secure_aggregation": True},
                    f"full_masking_k{args.neighbours}": {
                        **common, "secure_aggregation": True, "full_masking": True,
                        "neighbours": args.neighbours}}
        timers, compiles = {}, {}
        for name, overrides in variants.items():
            exp = fs.assemble(fs.make_config(overrides))
            compiles[name], timers[name] = _timed_round(exp)
        times = {name: [] for name in variants}
        for _ in range(args.repeats):  # interleaved: A B C A B C ...
            for name, run in timers.items():
                times[name].append(run(args.rounds))
        median = {k: statistics.median(v) for k, v in times.items()}
        print(json.dumps({"mode": "cost", "model": model, "cohort": args.cohort,
                          "round_seconds": median, "compile_seconds": compiles,
                          "ratio_to_plain": {k: v / median["plain"] for k, v in median.items()},
                          "repeats": args.repeats, "rounds_per_repeat": args.rounds,
                          "times": times, **_env()}), flush=True)


def plot(args) -> None:
    """Three panels from the JSON lines of the other modes (``--inputs`` files)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for path in args.inputs for line in open(path) if line.strip()]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for n in sorted({r["clients"] for r in rows if r["mode"] == "dme"}):
        for eps in sorted({r["epsilon"] for r in rows if r["mode"] == "dme"}):
            pts = sorted((r["bits"], r["mse_ratio"]) for r in rows if r["mode"] == "dme"
                         and r["clients"] == n and r["epsilon"] == eps and r["mse_ratio"])
            if pts:
                axes[0].plot(*zip(*pts), marker="o", label=f"n={n}, eps={eps:g}")
    axes[0].axhline(1.0, color="grey", lw=0.8)
    axes[0].set(xlabel="bits", ylabel="MSE secure DDG / central Gaussian",
                title="Distributed mean estimation (d=250)")
    axes[0].legend()
    acc = [r for r in rows if r["mode"] == "accuracy" and "test_accuracy" in r]
    ddg = sorted((r["config"]["bits"], r["test_accuracy"]) for r in acc
                 if r["run"].startswith("ddg"))
    if ddg:
        axes[1].plot(*zip(*ddg), marker="o", label="secure + DDG")
    for r in acc:
        if not r["run"].startswith("ddg"):
            axes[1].axhline(r["test_accuracy"], ls="--", lw=0.8,
                            color="C1" if r["run"] == "central_dp" else "C2",
                            label=r["run"].replace("_", " "))
    axes[1].set(xlabel="bits", ylabel="test accuracy", title="Main job, fixed epsilon")
    axes[1].legend()
    for bits in sorted({r["bits"] for r in rows if r["mode"] == "dropout"}):
        pts = sorted((r["dropout"], r["epsilon"]) for r in rows
                     if r["mode"] == "dropout" and r["bits"] == bits)
        axes[2].plot(*zip(*pts), marker="o", label=f"{bits} bits")
        ref = sorted((r["dropout"], r["epsilon0_over_sqrt"]) for r in rows
                     if r["mode"] == "dropout" and r["bits"] == bits)
    if rows and any(r["mode"] == "dropout" for r in rows):
        axes[2].plot(*zip(*ref), ls="--", color="grey", label="eps0 / sqrt(1 - d)")
    axes[2].set(xlabel="dropout rate", ylabel="epsilon", title="Epsilon versus dropout")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(args.output, dpi=110)
    print(json.dumps({"mode": "plot", "output": args.output, "rows": len(rows)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("mode", choices=("dme", "dropout", "accuracy", "cost", "plot"))
    parser.add_argument("--inputs", nargs="+", default=[], help="plot: JSON-lines files")
    parser.add_argument("--output", default="docs/secagg.png", help="plot: the image")
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--dim", type=int, default=250)
    parser.add_argument("--norm", type=float, default=10.0)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[2.0, 6.0])
    parser.add_argument("--bits", type=int, nargs="+", default=None)
    parser.add_argument("--mechanism", choices=("ddg", "skellam"), default="ddg")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--rates", type=float, nargs="+",
                        default=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    parser.add_argument("--noise-multiplier", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--epsilon", type=float, default=5.0)
    parser.add_argument("--clip-norm", type=float, default=1.0)
    parser.add_argument("--models", nargs="+", default=["softmax", "mlp"])
    parser.add_argument("--neighbours", type=int, default=16)
    parser.add_argument("--cohort", type=int, default=1000, help="cost: clients a round")
    parser.add_argument("--num-clients", type=int, default=10_000, help="cost: population")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cores", type=int, default=None)
    parser.add_argument("--devices", type=int, default=None)
    add_compile_cache_flag(parser)
    args = parser.parse_args()
    CACHE["dir"] = compile_cache(args)  # after configure_cpu, before any compile
    defaults = {"dme": ([8, 10, 12, 16, 20], 1), "dropout": ([20, 32], 100),
                "accuracy": ([12, 14, 16, 20], 30), "cost": ([20], 3),
                "plot": ([], 1)}[args.mode]
    args.bits = args.bits or defaults[0]
    args.rounds = args.rounds or defaults[1]
    {"dme": dme, "dropout": dropout, "accuracy": accuracy, "cost": cost,
     "plot": plot}[args.mode](args)


if __name__ == "__main__":
    main()
