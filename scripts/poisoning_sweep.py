"""Poisoning sweep: attacker fraction x attack x defence -> table (CSV + JSON) and plot (PNG).

Each cell is one ``run_experiment`` with ``attack``, ``malicious_fraction`` and a defence
(a server aggregator, optionally with norm clipping). Fraction 0 is the honest baseline.
Small defaults (digits, 50 clients, all sampled every round, a few rounds) finish in a few
minutes on a laptop CPU.

Usage::

    python scripts/poisoning_sweep.py --out sweep_out \\
        --fractions 0 0.02 0.1 --attacks model_replacement alie sign_flip \\
        --defences mean median clip trimmed_mean --rounds 5
"""

from __future__ import annotations

import argparse
import csv
import json
import os

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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="poisoning_sweep")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.02, 0.1])
    p.add_argument("--attacks", nargs="+", default=["model_replacement", "alie", "sign_flip"])
    p.add_argument("--defences", nargs="+", default=["mean", "median", "clip"],
                   choices=sorted(DEFENCES))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--num-clients", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from fedjax_sim.config import make_config
    from fedjax_sim.runner import run_experiment

    base = {"data": "digits", "partition": "iid", "num_clients": args.num_clients,
            "cohort_size": args.num_clients, "rounds": args.rounds, "client_lr": 0.3,
            "local_epochs": 3, "eval_every": args.rounds, "seed": args.seed}
    rows, honest = [], {}
    for defence in args.defences:
        for attack in args.attacks:
            for fraction in args.fractions:
                key = (defence, fraction == 0)
                if fraction == 0 and key in honest:  # one honest baseline per defence
                    summary = honest[key]
                else:
                    summary = run_experiment(make_config(cell_config(
                        base, attack, fraction, defence)), progress=False)
                    if fraction == 0:
                        honest[key] = summary
                rows.append({"defence": defence, "attack": attack, "fraction": fraction,
                             "num_malicious": summary.get("num_malicious", 0),
                             "test_accuracy": summary["test_accuracy"],
                             "backdoor_success": summary.get("backdoor_success")})
                print(json.dumps(rows[-1]), flush=True)

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "poisoning_sweep.json"), "w") as f:
        json.dump(rows, f, indent=2)
    with open(os.path.join(args.out, "poisoning_sweep.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.attacks, args.defences, os.path.join(args.out, "poisoning_sweep.png"))
    return 0


def plot(rows, attacks, defences, path) -> None:
    """One panel per attack: test accuracy (solid) and backdoor success (dashed) vs fraction."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(attacks), figsize=(4 * len(attacks), 3.2), squeeze=False)
    for ax, attack in zip(axes[0], attacks):
        for i, defence in enumerate(defences):
            cell = sorted((r for r in rows if r["attack"] == attack and r["defence"] == defence),
                          key=lambda r: r["fraction"])
            xs = [r["fraction"] for r in cell]
            ax.plot(xs, [r["test_accuracy"] for r in cell], "o-", color=f"C{i}",
                    label=f"{defence} acc")
            if any(r["backdoor_success"] is not None for r in cell):
                ax.plot(xs, [r["backdoor_success"] or 0.0 for r in cell], "x--",
                        color=f"C{i}", label=f"{defence} backdoor")
        ax.set_title(attack)
        ax.set_xlabel("malicious fraction")
        ax.set_ylim(-0.02, 1.02)
    axes[0][0].set_ylabel("rate")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
