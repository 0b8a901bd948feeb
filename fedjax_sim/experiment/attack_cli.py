"""The ``attack`` subcommand: run one privacy attack on digits, write metrics and an image grid.

Examples::

  fedjax-sim attack inversion --attack ig --batch-size 1 --num-victims 8 --output out/
  fedjax-sim attack inversion --attack closed_form --batch-size 8 --noise-multiplier 0.1 \\
      --clip-norm 0.1 --output out/
  fedjax-sim attack imprint --bins 256 --batch-size 64 --clients-per-aggregate 4 --output out/
  fedjax-sim attack imprint --edges-from public --public-size 64 --output out/
  fedjax-sim attack malicious-client --bins 512 --cohort-size 16 --output out/
  fedjax-sim attack malicious-client --norm-bound 100 --output out/

Every attack runs on rounds of the simulator, and its defences are stages of the round's
chain (``fedjax_sim.attacks.lab``).

Each writes ``metrics.json`` and ``reconstructions.png`` (originals above reconstructions)
into ``--output`` (when given) and prints one JSON line of the headline metrics. A bad
configuration prints one ``fedjax-sim attack: error: ...`` line and returns 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from typing import Any

from fedjax_sim._validation import ConfigError
from fedjax_sim.experiment.flags import add_compile_cache_flag, add_field_flags
from fedjax_sim.experiment.schema import option, section_fields

HEADLINE = ("attack", "psnr", "ssim", "mse", "label_accuracy", "exact_fraction",
            "installed_fraction", "predicted_rate", "expected_rate")
PUBLIC_SIZE_HELP = ("public examples that set the bin edges; automatic: the whole public "
                    "split (359)")


@dataclasses.dataclass(frozen=True)
class Defences:
    """The victims' local training and the defences between them and the attacker."""

    learning_rate: float = option(0.1, "victims' local SGD learning rate", low=0.0,
                                  low_open=True, high=1e6)
    local_epochs: int = option(1, "victims' local passes", low=1, high=10**4)
    local_batch_size: int | None = option(None, "victims' local mini-batch; automatic: the "
                                          "whole client batch (FedSGD)", low=1, high=2**20)
    clip_norm: float | None = option(None, "per-client L2 clip norm; automatic: none",
                                     low=0.0, low_open=True, high=1e30)
    noise_multiplier: float = option(0.0, "Gaussian noise std in units of clip_norm, added by "
                                     "each client (under secure aggregation: shares of the "
                                     "sum)", low=0.0, high=1e6)


@dataclasses.dataclass(frozen=True)
class Inversion:
    """``attack inversion``: an honest-but-curious server inverts updates."""

    attack: str = option("ig", "the attack", choices=("ig", "dlg", "closed_form"))
    model_name: str = option("mlp", "the victims' model", choices=("softmax", "mlp"),
                             flag="model")
    hidden: int = option(64, "MLP hidden width", low=1, high=2**16)
    batch_size: int = option(1, "examples per victim", low=1, high=2**16)
    num_victims: int = option(8, "victims attacked (vmapped)", low=1, high=2**16)
    steps: int | None = option(None, "optimisation steps; automatic: the attack's default",
                               low=1, high=10**6)
    restarts: int | None = option(None, "random restarts; automatic: the attack's default",
                                  low=1, high=10**3)
    secure_aggregation: bool = option(False, "the attacker sees only the victims' sum")
    tv_weight: float | None = option(None, "Inverting Gradients' total-variation weight; "
                                     "automatic: the attack's default (1e-3)", low=0.0,
                                     high=1e6)


@dataclasses.dataclass(frozen=True)
class Imprint:
    """``attack imprint``: a malicious server's imprint block (Robbing the Fed)."""

    num_bins: int = option(64, "imprint bins", low=2, high=2**16, flag="bins")
    batch_size: int = option(64, "examples per client", low=1, high=2**16)
    num_victims: int = option(4, "victims attacked", low=1, high=2**16)
    clients_per_aggregate: int = option(1, ">1: secure aggregation over this many clients",
                                        low=1, high=2**16)
    variant: str = option("dense", "imprint variant", choices=("dense", "sparse"))
    direction: str = option("random", "measurement direction", choices=("random", "mean"))
    edges_from: str = option("known", "where the bin edges come from",
                             choices=("known", "public", "gaussian"))
    public_size: int | None = option(None, PUBLIC_SIZE_HELP, low=2, high=2**20)


@dataclasses.dataclass(frozen=True)
class MaliciousClient:
    """``attack malicious-client``: model replacement installs an imprint."""

    num_bins: int = option(512, "imprint bins", low=2, high=2**16, flag="bins")
    cohort_size: int = option(16, "clients per round", low=2, high=2**16)
    batch_size: int = option(4, "examples per honest client", low=1, high=2**16)
    trials: int = option(3, "independent trials", low=1, high=10**4)
    learning_rate: float = option(0.1, "the round's learning rate", low=0.0,
                                  low_open=True, high=1e6)
    precision: str = option("float64", "arithmetic of the global model and the read-off",
                            choices=("float64", "float32"))
    public_size: int | None = option(None, PUBLIC_SIZE_HELP, low=2, high=2**20)


@dataclasses.dataclass(frozen=True)
class ServerDefences:
    """The server's defences against a malicious client: stages of its aggregation chain."""

    clip_norm: float | None = option(None, "the server clips every upload to this L2 norm; "
                                     "automatic: none", low=0.0, low_open=True, high=1e30)
    norm_bound: float | None = option(None, "the server drops uploads above this L2 norm; "
                                      "automatic: none", low=0.0, low_open=True, high=1e30)
    noise_multiplier: float = option(0.0, "DP-FedAvg: Gaussian noise on the sum, std in "
                                     "units of clip_norm", low=0.0, high=1e6)


KINDS = {"inversion": (Inversion, Defences), "imprint": (Imprint, Defences),
         "malicious-client": (MaliciousClient, ServerDefences)}
HELP = {"inversion": "honest server: DLG / Inverting Gradients / closed form",
        "imprint": "malicious server: Robbing the Fed imprint block",
        "malicious-client": "malicious client: model replacement installs an imprint"}


def _specs(kind: str):
    return [s for cls in KINDS[kind] for s in section_fields(cls, kind)]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``attack inversion|imprint|malicious-client`` to argparse ``subparsers``.

    Every leaf parser carries ``func=run``; its flags come from the declarations above
    (and the run's ``seed``).
    """
    from fedjax_sim.experiment.config import FIELDS

    p = subparsers.add_parser(
        "attack", help="privacy attacks on federated updates (digits)",
        description="What an honest server, a malicious server and a malicious client "
                    "reconstruct from federated updates, on scikit-learn digits.")
    kinds = p.add_subparsers(dest="attack_kind", metavar="ATTACK",
                             parser_class=type(p))
    kinds.required = True
    for kind in KINDS:
        leaf = kinds.add_parser(kind, help=HELP[kind], description=HELP[kind])
        add_field_flags(leaf, _specs(kind) + [FIELDS["seed"]])
        leaf.add_argument("--output", default=None,
                          help="directory for metrics.json and the PNG")
        add_compile_cache_flag(leaf)
        leaf.set_defaults(func=run)
    p.set_defaults(func=run)
    return p


def _compute(args: argparse.Namespace) -> dict[str, Any]:
    from fedjax_sim.attacks import lab
    from fedjax_sim.experiment.config import FIELDS

    specs = _specs(args.attack_kind) + [FIELDS["seed"]]
    values = {s.name: s.coerce(s.default if getattr(args, s.key) is None
                               else getattr(args, s.key)) for s in specs}
    run_fn = {"inversion": lab.run_inversion, "imprint": lab.run_imprint,
              "malicious-client": lab.run_malicious_client}[args.attack_kind]
    return run_fn(**values)


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
