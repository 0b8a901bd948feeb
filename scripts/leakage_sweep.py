"""What each defence buys against the honest-but-curious server, measured inside the run.

Every setting is one ``fedjax-sim run`` on scikit-learn's digits (8x8 images, offline)
with the in-run attacker on (``[leakage] observe_rounds``): no defence, clipping,
DP-FedAvg at three noise levels (with canaries: the one-shot estimate and the one-run
lower bound next to the accountant's epsilon), secure aggregation, and larger client
batches (fewer clients holding more examples each). Each row crosses leakage (label
recovery, the closed form's and Inverting Gradients' recovered fraction above 30 dB and
PSNR, averaged over the observed rounds), final accuracy, the accountant's epsilon and the
canary estimate. Output: one JSON document on stdout (and ``--csv FILE``), one plot
(``--plot FILE``).

The cost of observing is measured in the same process, interleaved (A B A B): the same
run with and without the attacker, the steady round time (the capture observer's share
inside the jitted round) and the wall time per observed round (the attacks on the host).

``--active`` measures the active attackers inside the run instead (``"active"`` rows):
the malicious server's imprint in every round of a FedSGD run (``imprint_rounds``; the
cohort's examples read off the aggregate) against no defence, clipping, DP-FedAvg, secure
aggregation and several local steps, each with the recovered fraction beside the closed
form ``(1 - 1/k)^(n-1)``; and the malicious client (``malicious_client_round``) over
several seeds against no defence, a norm bound and DP-FedAvg, with how often it installed.

    python scripts/leakage_sweep.py --plot leakage_sweep.png --csv leakage_sweep.csv
    python scripts/leakage_sweep.py --active > active.json
    python scripts/leakage_sweep.py --small          # a quick look
"""

from __future__ import annotations

import sys

from _cpu_setup import add_compile_cache_flag, compile_cache, configure_cpu, device_record

configure_cpu(sys.argv)  # before JAX starts: --cores N pins, --devices splits the CPU

import argparse
import csv
import json
import platform
import statistics
import tempfile
import time

import fedjax_sim as fs

LEAK_KEYS = ("leak_label_accuracy", "leak_idlg_accuracy", "leak_closed_form_recovered",
             "leak_closed_form_psnr", "leak_ig_recovered", "leak_ig_psnr")


def settings(small: bool) -> list[tuple[str, dict]]:
    """``(label, flat config overrides)`` of every setting."""
    clip = {"clip_norm": 0.5}
    dp = {"aggregator": "dp_fedavg", **clip, "canaries": 40 if small else 200}
    out = [("no defence", {}), ("clipping (C=0.5)", clip)]
    for z in ((1.0,) if small else (0.5, 1.0, 2.0)):
        out.append((f"DP-FedAvg z={z:g}", dict(dp, noise_multiplier=z)))
    out.append(("secure aggregation", dict(clip, secure_aggregation=True)))
    for per_client in ((4,) if small else (4, 16)):
        out.append((f"{per_client} examples per client",
                    {"num_clients": 1400 // per_client}))
    return out


def base_config(args) -> dict:
    rounds = args.rounds
    return {"data": "digits", "partition": "iid", "num_clients": 1400, "model": "mlp",
            "hidden": (64,), "algorithm": "fedavg", "local_epochs": 1, "batch_size": 8,
            "client_lr": 0.5, "cohort_size": args.cohort, "rounds": rounds,
            "observe_rounds": tuple(sorted({1, rounds})), "victims": args.victims,
            "inversion_steps": args.inversion_steps, "seed": args.seed}


def run_setting(label: str, overrides: dict, args) -> dict:
    cfg = fs.make_config(dict(base_config(args), **overrides))
    with tempfile.TemporaryDirectory() as out:
        summary = fs.run_experiment(cfg, output_dir=out, progress=False)
    means = summary["leakage"]["mean"]
    row = {"setting": label, "test_accuracy": summary["test_accuracy"],
           "epsilon": summary.get("epsilon"),
           "epsilon_estimate": summary.get("epsilon_estimate"),
           "epsilon_lower_bound": summary.get("epsilon_lower_bound"),
           "server_sees": summary["leakage"]["sees"]}
    row.update({k: means.get(k) for k in LEAK_KEYS})
    return row


def observing_cost(args) -> dict:
    """The same run with and without the attacker (every round observed), interleaved."""
    base = dict(base_config(args), leak_attacks="labels,closed_form,ig")
    plain = {k: v for k, v in base.items() if k not in (
        "observe_rounds", "victims", "inversion_steps", "leak_attacks")}
    watched = dict(base, observe_rounds=tuple(range(1, args.rounds + 1)))
    runs: dict[str, list] = {"unobserved": [], "observed": []}
    for _ in range(args.repeats):
        for name, overrides in (("unobserved", plain), ("observed", watched)):
            seconds: list[float] = []
            t0 = time.perf_counter()
            summary = fs.run_experiment(fs.make_config(overrides), progress=False,
                                        on_round=lambda row: seconds.append(row["seconds"]))
            wall = time.perf_counter() - t0 - summary["compile_seconds"]
            runs[name].append({"steady_round_seconds": statistics.median(seconds[1:]),
                               "wall_seconds_after_compile": wall,
                               "test_accuracy": summary["test_accuracy"]})
    med = {n: statistics.median(r["steady_round_seconds"] for r in rs)
           for n, rs in runs.items()}
    wall = {n: statistics.median(r["wall_seconds_after_compile"] for r in rs)
            for n, rs in runs.items()}
    return {"runs": runs, "median_steady_round_seconds": med,
            "round_observed_over_unobserved": med["observed"] / med["unobserved"],
            "attack_seconds_per_observed_round":
                (wall["observed"] - wall["unobserved"]) / args.rounds,
            "same_accuracy": [a["test_accuracy"] == b["test_accuracy"] for a, b in
                              zip(runs["unobserved"], runs["observed"])]}


ACTIVE_KEYS = ("recovered", "expected", "psnr", "ssim", "examples")


def active_settings(small: bool) -> list[tuple[str, str, dict]]:
    """``(attacker, label, overrides)`` of the active-attacker rows."""
    clip = {"clip_norm": 0.5}
    defences = [("no defence", {}), ("clipping (C=0.5)", clip),
                ("DP-FedAvg z=1", dict(clip, aggregator="dp_fedavg", noise_multiplier=1.0)),
                ("secure aggregation", dict(clip, secure_aggregation=True)),
                ("FedAvg, 4 examples per client, batch 2",
                 {"algorithm": "fedavg", "num_clients": 350, "batch_size": 2,
                  "client_lr": 0.5})]
    out = []
    for bins in ((64,) if small else (64, 256)):
        for label, overrides in (defences[:2] if small else defences):
            out.append(("server", f"{label}, k={bins}", dict(overrides, imprint_bins=bins)))
    for label, overrides in (defences[:1] if small else defences[:3]):
        if "clip_norm" in overrides and "aggregator" not in overrides:
            label, overrides = "norm bound 10", {"norm_bound": 10.0}
        out.append(("client", label, overrides))
    return out


def active_rows(args) -> list[dict]:
    """Each setting's mean over its attacked rounds (the server: every round of a run;
    the client: one install per seed)."""
    base = {"data": "digits", "partition": "iid", "num_clients": 1400, "model": "mlp",
            "hidden": (256, 64), "algorithm": "fedsgd", "cohort_size": args.cohort}
    seeds = range(args.seed, args.seed + (1 if args.small else 5))
    rows = []
    for attacker, label, overrides in active_settings(args.small):
        found = []
        for seed in ([args.seed] if attacker == "server" else seeds):
            if attacker == "server":
                extra = {"rounds": args.active_rounds,
                         "imprint_rounds": tuple(range(1, args.active_rounds + 1))}
            else:
                extra = {"rounds": 3, "malicious_client_round": 2, "malicious_bins": 64,
                         "weighting": "uniform"}
            cfg = fs.make_config(dict(base, seed=seed, **overrides, **extra))
            with tempfile.TemporaryDirectory() as out:
                summary = fs.run_experiment(cfg, output_dir=out, progress=False)
            found += summary["malicious"][attacker]["rounds"]
        prefix = "leak_imprint_" if attacker == "server" else "leak_mclient_"
        row = {"attacker": attacker, "setting": label, "attacked_rounds": len(found)}
        for key in ACTIVE_KEYS:
            values = [r[prefix + key] for r in found if r.get(prefix + key) is not None]
            row[key] = statistics.fmean(values) if values else None
        if attacker == "client":
            row["installed"] = statistics.fmean(float(r["leak_mclient_installed"])
                                                for r in found)
        rows.append(row)
    return rows


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [r["setting"] for r in rows]
    y = range(len(rows))
    for key, name in (("leak_ig_recovered", "IG"), ("leak_closed_form_recovered",
                                                    "closed form"),
                      ("leak_label_accuracy", "labels")):
        left.plot([r[key] if r[key] is not None else float("nan") for r in rows], y, "o",
                  label=name)
    left.set_yticks(list(y), labels)
    left.set_xlabel("recovered by the server (fraction; labels: accuracy)")
    left.invert_yaxis()
    left.legend(fontsize=8)
    acc = [r["test_accuracy"] for r in rows]
    right.barh(list(y), acc, color="#6a9")
    for i, r in enumerate(rows):
        eps = r["epsilon"]
        note = "eps=inf" if eps is None else f"eps={eps:.3g}"
        if r["epsilon_estimate"] is not None:
            note += f", est={r['epsilon_estimate']:.2g}, lb={r['epsilon_lower_bound']:.2g}"
        right.text(0.01, i, note, va="center", fontsize=8)
    right.set_yticks(list(y), [])
    right.invert_yaxis()
    right.set_xlabel("final test accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="fewer settings and rounds")
    p.add_argument("--rounds", type=int, default=None, help="rounds per run "
                   "(default 20; --small: 3)")
    p.add_argument("--cohort", type=int, default=50, help="clients per round")
    p.add_argument("--victims", type=int, default=4, help="victims per observed round")
    p.add_argument("--inversion-steps", type=int, default=None,
                   help="Inverting Gradients steps (default 300; --small: 40)")
    p.add_argument("--repeats", type=int, default=None,
                   help="A/B pairs of the observing cost (default 3; --small: 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--active", action="store_true", help="measure the malicious server "
                   "and the malicious client in the run instead")
    p.add_argument("--active-rounds", type=int, default=None,
                   help="spy rounds per malicious-server run (default 10; --small: 2)")
    p.add_argument("--csv", help="also write the rows as CSV")
    p.add_argument("--plot", help="write the plot (PNG)")
    p.add_argument("--cores", default="0", help="(read by _cpu_setup) pin to N cores")
    p.add_argument("--devices", action="store_true", help="(read by _cpu_setup)")
    add_compile_cache_flag(p)
    args = p.parse_args(argv)
    args.rounds = args.rounds or (3 if args.small else 20)
    args.inversion_steps = args.inversion_steps or (40 if args.small else 300)
    args.repeats = args.repeats or (1 if args.small else 3)
    args.active_rounds = args.active_rounds or (2 if args.small else 10)
    for name in ("rounds", "cohort", "victims", "inversion_steps", "repeats",
                 "active_rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)}: must be >= 1")
    cache = compile_cache(args)
    import jax

    record = {**device_record(), "compile_cache": cache, "jax": jax.__version__,
              "fedjax_sim": fs.__version__, "python": platform.python_version(),
              "cpu": platform.processor() or platform.machine(),
              "date": time.strftime("%Y-%m-%d")}
    if args.active:
        print(json.dumps({"active": active_rows(args), "cohort": args.cohort, **record},
                         indent=1))
        return 0
    rows = [run_setting(label, overrides, args) for label, overrides in settings(args.small)]
    cost = observing_cost(args)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    if args.plot:
        plot(rows, args.plot)
    print(json.dumps({"rows": rows, "observing_cost": cost,
                      "config": base_config(args), **record}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
