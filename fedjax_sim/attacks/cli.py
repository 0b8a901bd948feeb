"""The ``attack`` subcommand: run one privacy attack on digits, write metrics and an image grid.

Examples::

  fedjax-sim attack inversion --attack ig --batch-size 1 --num-victims 8 --output out/
  fedjax-sim attack inversion --attack closed_form --batch-size 8 --noise-multiplier 0.1 \\
      --clip-norm 0.1 --output out/
  fedjax-sim attack imprint --bins 256 --batch-size 64 --clients-per-aggregate 4 --output out/
  fedjax-sim attack malicious-client --bins 512 --cohort-size 16 --output out/

Each writes ``metrics.json`` and ``reconstructions.png`` (originals above reconstructions)
into ``--output`` (when given) and prints one JSON line of the headline metrics. A bad
configuration prints one ``fedjax-sim attack: error: ...`` line and returns 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

from fedjax_sim._validation import ConfigError

HEADLINE = ("attack", "psnr", "ssim", "mse", "label_accuracy", "exact_fraction",
            "predicted_rate", "expected_rate")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="seed of data, model and attack")
    p.add_argument("--output", default=None, help="directory for metrics.json and the PNG")


def _defences(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clip-norm", type=float, default=None, help="per-client L2 clip norm")
    p.add_argument("--noise-multiplier", type=float, default=0.0,
                   help="Gaussian noise std in units of --clip-norm")
    p.add_argument("--learning-rate", type=float, default=0.1, help="victims' local SGD lr")
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--local-batch-size", type=int, default=None,
                   help="local mini-batch (default: whole client batch, FedSGD)")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``attack inversion|imprint|malicious-client`` to argparse ``subparsers``.

    Every leaf parser carries ``func=run``.
    """
    p = subparsers.add_parser(
        "attack", help="privacy attacks on federated updates (digits)",
        description="What an honest server, a malicious server and a malicious client "
                    "reconstruct from federated updates, on scikit-learn digits.")
    kinds = p.add_subparsers(dest="attack_kind", metavar="ATTACK")
    kinds.required = True

    inv = kinds.add_parser("inversion", help="honest server: DLG / Inverting Gradients / "
                                             "closed form")
    inv.add_argument("--attack", choices=("ig", "dlg", "closed_form"), default="ig")
    inv.add_argument("--model", choices=("softmax", "mlp"), default="mlp")
    inv.add_argument("--hidden", type=int, default=64, help="MLP hidden width")
    inv.add_argument("--batch-size", type=int, default=1, help="examples per victim")
    inv.add_argument("--num-victims", type=int, default=8)
    inv.add_argument("--steps", type=int, default=None, help="optimisation steps")
    inv.add_argument("--restarts", type=int, default=None)
    inv.add_argument("--secure-aggregation", action="store_true",
                     help="the attacker sees only the sum over the victims")
    _defences(inv)
    _common(inv)
    inv.set_defaults(func=run)

    imp = kinds.add_parser("imprint", help="malicious server: Robbing the Fed imprint block")
    imp.add_argument("--bins", type=int, default=64)
    imp.add_argument("--batch-size", type=int, default=64, help="examples per client")
    imp.add_argument("--num-victims", type=int, default=4)
    imp.add_argument("--clients-per-aggregate", type=int, default=1,
                     help=">1: secure aggregation over this many clients")
    imp.add_argument("--variant", choices=("dense", "sparse"), default="dense")
    imp.add_argument("--direction", choices=("random", "mean"), default="random")
    imp.add_argument("--edges-from", choices=("known", "public", "gaussian"), default="known")
    _defences(imp)
    _common(imp)
    imp.set_defaults(func=run)

    mal = kinds.add_parser("malicious-client",
                           help="malicious client: model replacement installs an imprint")
    mal.add_argument("--bins", type=int, default=512)
    mal.add_argument("--cohort-size", type=int, default=16, help="clients per round")
    mal.add_argument("--batch-size", type=int, default=4, help="examples per honest client")
    mal.add_argument("--trials", type=int, default=3)
    mal.add_argument("--learning-rate", type=float, default=0.1)
    mal.add_argument("--precision", choices=("float64", "float32"), default="float64")
    _common(mal)
    mal.set_defaults(func=run)
    p.set_defaults(func=run)
    return p


def _compute(args: argparse.Namespace) -> dict[str, Any]:
    from fedjax_sim.attacks import lab

    if args.attack_kind == "inversion":
        return lab.run_inversion(
            attack=args.attack, model_name=args.model, hidden=args.hidden,
            batch_size=args.batch_size, num_victims=args.num_victims,
            learning_rate=args.learning_rate, local_epochs=args.local_epochs,
            local_batch_size=args.local_batch_size, clip_norm=args.clip_norm,
            noise_multiplier=args.noise_multiplier,
            secure_aggregation=args.secure_aggregation, steps=args.steps,
            restarts=args.restarts, seed=args.seed)
    if args.attack_kind == "imprint":
        return lab.run_imprint(
            num_bins=args.bins, batch_size=args.batch_size, num_victims=args.num_victims,
            clients_per_aggregate=args.clients_per_aggregate, variant=args.variant,
            direction=args.direction, edges_from=args.edges_from,
            learning_rate=args.learning_rate, local_epochs=args.local_epochs,
            local_batch_size=args.local_batch_size, clip_norm=args.clip_norm,
            noise_multiplier=args.noise_multiplier, seed=args.seed)
    return lab.run_malicious_client(
        num_bins=args.bins, cohort_size=args.cohort_size, batch_size=args.batch_size,
        trials=args.trials, learning_rate=args.learning_rate, precision=args.precision,
        seed=args.seed)


def jsonable(value: Any) -> Any:
    """``value`` with NaN/inf floats replaced by None (strict JSON), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def write_outputs(result: dict[str, Any], output: str, title: str) -> dict[str, str]:
    """Writes ``metrics.json`` (numbers only) and ``reconstructions.png`` into ``output``."""
    import matplotlib

    matplotlib.use("Agg")
    from fedjax_sim.attacks.plots import save_reconstruction_grid

    os.makedirs(output, exist_ok=True)
    metrics = jsonable({k: v for k, v in result.items()
                        if k not in ("originals", "reconstructions")})
    metrics_path = os.path.join(output, "metrics.json")
    with open(metrics_path, "w") as f:
        json.dump(metrics, f, indent=2, sort_keys=True)
    png = save_reconstruction_grid(os.path.join(output, "reconstructions.png"),
                                   [(title, result["originals"], result["reconstructions"])],
                                   title=title)
    return {"metrics": metrics_path, "png": png}


def run(args: argparse.Namespace) -> int:
    """Runs the ``attack`` subcommand; returns the exit code (0 ok, 2 bad configuration)."""
    if getattr(args, "attack_kind", None) is None:
        print("fedjax-sim attack: error: choose inversion, imprint or malicious-client",
              file=sys.stderr)
        return 2
    try:
        result = _compute(args)
    except ConfigError as e:
        print(f"fedjax-sim attack: error: {e}", file=sys.stderr)
        return 2
    headline = {k: result[k] for k in HEADLINE if k in result}
    if args.output:
        title = args.attack_kind if args.attack_kind != "inversion" else \
            f"inversion ({result['attack']}, batch {result['batch_size']})"
        headline["files"] = write_outputs(result, args.output, title)
    print(json.dumps(jsonable(headline), sort_keys=True))
    return 0


__all__ = ["add_parser", "jsonable", "run", "write_outputs"]
