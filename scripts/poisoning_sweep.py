"""Poisoning sweep: attacker fraction x attack x defence -> table (CSV + JSON) and plot (PNG).

Each cell is one ``run_experiment`` with ``attack``, ``malicious_fraction`` and a defence
(a server aggregator, optionally with norm clipping). Fraction 0 is the honest baseline: it
is run once per defence and its row is repeated under every attack, so the table has
exactly one row per (defence, attack, fraction) requested. Small defaults (digits, 50
clients, all sampled every round, a few rounds) finish in a few minutes on a laptop CPU.

Writes ``poisoning_sweep.csv`` and ``poisoning_sweep.json`` (``{"meta": ..., "rows": [...]}``,
the same rows as the CSV; ``backdoor_success`` is null/empty where the attack plants no
backdoor or the cell is honest) and ``poisoning_sweep.png`` (one panel per attack) into
``--output``.

Usage::

    python scripts/poisoning_sweep.py --output sweep_out \\
        --fractions 0 0.02 0.1 --attacks model_replacement alie sign_flip \\
        --defences mean median clip trimmed_mean --rounds 5
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import sys

import jax

import fedjax_sim as fs

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
if SCRIPTS not in sys.path:  # _cpu_setup, also when a test loads this file by its path
    sys.path.insert(0, SCRIPTS)

from _cpu_setup import add_compile_cache_flag, compile_cache, device_record  # noqa: E402

DEFENCES = {
    "mean": {},
    "median": {"aggregator": "median"},
    "trimmed_mean": {"aggregator": "trimmed_mean", "trim_fraction": 0.2},
    "clip": {"clip_norm": 3.0},
    "centered_clipping": {"aggregator": "centered_clipping", "centered_clipping_tau": 1.0},
    "geometric_median": {"aggregator": "geometric_median"},
}


def cell_config(base: dict, attack: str, fraction: float, defence: str) -> dict:
    """The config overrides of one cell."""
    cfg = dict(base, **DEFENCES[defence])
    if fraction > 0:
        cfg.update(attack=attack, malicious_fraction=fraction)
    return cfg


FIELDS = ("defence", "attack", "fraction", "num_malicious", "test_accuracy",
          "backdoor_success")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", "--out", dest="output", default="poisoning_sweep",
                   help="directory for the CSV, JSON and PNG (created if missing)")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.02, 0.1],
                   help="malicious fractions of the population (0: honest baseline)")
    p.add_argument("--attacks", nargs="+", default=["model_replacement", "alie", "sign_flip"],
                   choices=[a for a in fs.poisoning.ATTACK_NAMES if a != "none"])
    p.add_argument("--defences", nargs="+", default=["mean", "median", "clip"],
                   choices=sorted(DEFENCES))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--num-clients", type=int, default=50)
    p.add_argument("--cohort-size", type=int, default=0,
                   help="clients per round (0: all of them, every round)")
    p.add_argument("--local-epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    add_compile_cache_flag(p)
    args = p.parse_args(argv)
    if any(not 0.0 <= f < 1.0 for f in args.fractions):
        p.error(f"--fractions {args.fractions}: each must be in [0, 1)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cache = compile_cache(args)  # before the first compile
    cohort = args.cohort_size or args.num_clients
    base = {"data": "digits", "partition": "iid", "num_clients": args.num_clients,
            "cohort_size": cohort, "rounds": args.rounds, "client_lr": 0.3,
            "local_epochs": args.local_epochs, "eval_every": args.rounds, "seed": args.seed}
    rows, honest = [], {}
    for defence in args.defences:
        for attack in args.attacks:
            for fraction in args.fractions:
                key = (defence, fraction == 0)
                if fraction == 0 and key in honest:  # one honest baseline per defence
                    summary = honest[key]
                else:
                    summary = fs.run_experiment(fs.make_config(cell_config(
                        base, attack, fraction, defence)), progress=False)
                    if fraction == 0:
                        honest[key] = summary
                rows.append(dict(zip(FIELDS, (
                    defence, attack, fraction, summary.get("num_malicious", 0),
                    summary["test_accuracy"], summary.get("backdoor_success")))))
                print(json.dumps(rows[-1]), flush=True)

    meta = {"base_config": base, "defences": {d: DEFENCES[d] for d in args.defences},
            "fractions": args.fractions, "attacks": args.attacks,
            "jax_version": jax.__version__, **device_record(), "compile_cache": cache,
            "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "python": platform.python_version(), "date": datetime.date.today().isoformat()}
    write_outputs(rows, meta, args.output)
    if not args.no_plot:
        plot(rows, args.attacks, args.defences,
             os.path.join(args.output, "poisoning_sweep.png"))
    return 0


def write_outputs(rows: list[dict], meta: dict, out_dir: str) -> None:
    """``poisoning_sweep.json`` (meta + rows) and ``poisoning_sweep.csv`` (the rows)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "poisoning_sweep.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    with open(os.path.join(out_dir, "poisoning_sweep.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(FIELDS))
        writer.writeheader()
        writer.writerows(rows)


def plot(rows, attacks, defences, path) -> None:
    """One panel per attack: test accuracy (solid) and backdoor success (dashed) vs fraction.

    Backdoor success is drawn only where it was measured (backdoor attacks, fraction > 0).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(attacks), figsize=(4 * len(attacks), 3.6), squeeze=False)
    handles = {}
    for ax, attack in zip(axes[0], attacks):
        for i, defence in enumerate(defences):
            cell = sorted((r for r in rows if r["attack"] == attack and r["defence"] == defence),
                          key=lambda r: r["fraction"])
            (line,) = ax.plot([r["fraction"] for r in cell], [r["test_accuracy"] for r in cell],
                              "o-", color=f"C{i}")
            handles.setdefault(f"{defence}: accuracy", line)
            bd = [r for r in cell if r["backdoor_success"] is not None]
            if bd:
                (line,) = ax.plot([r["fraction"] for r in bd],
                                  [r["backdoor_success"] for r in bd], "x--", color=f"C{i}")
                handles.setdefault(f"{defence}: backdoor success", line)
        ax.set_title(attack)
        ax.set_xlabel("malicious fraction")
        ax.set_ylim(-0.02, 1.02)
    axes[0][0].set_ylabel("rate")
    fig.legend(list(handles.values()), list(handles), loc="lower center",
               ncol=min(len(handles), 4), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.06 * ((len(handles) + 3) // 4), 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)

if __name__ == "__main__":
    raise SystemExit(main())
