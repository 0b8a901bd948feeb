"""The ``fedjax-sim`` command line.

``fedjax-sim run`` runs an experiment from flags and/or a TOML file (flags win); with no
arguments it runs the main job (see ``ExperimentConfig``). Every config field is a flag:
``--num-clients 20000``, ``--hidden 128,64``, ``--synthetic-iid true``.

Errors in flags or config values print one line naming the field and value and exit
with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from fedjax_sim._validation import ConfigError
from fedjax_sim.config import FIELDS, field_kind, load_toml, make_config


class _ArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"fedjax-sim {self.prog.split()[-1]}: error: {message}\n")


def _add_run_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "run", help="run a federated training experiment",
        description="Run a federated training experiment. With no flags: FedAvg on a "
                    "procedural non-IID FedProx Synthetic population of 10,000 clients, "
                    "1,000 per round.")
    p.add_argument("--config", help="TOML file with config keys (flat or in tables)")
    p.add_argument("--output", help="directory for metrics.jsonl and summary.json")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    group = p.add_argument_group("experiment (config keys; flags override --config)")
    for name, field in FIELDS.items():
        kind = field_kind(name)
        default = field.default
        shown = ",".join(map(str, default)) if kind is tuple else default
        group.add_argument("--" + name.replace("_", "-"), dest=name, default=None,
                           metavar=kind.__name__.upper() if kind is not tuple else "LIST",
                           help=f"(default: {shown})")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from fedjax_sim.runner import TrainingDiverged, run_experiment

    values = load_toml(args.config) if args.config else {}
    values.update({k: getattr(args, k) for k in FIELDS if getattr(args, k) is not None})
    cfg = make_config(values)
    try:
        summary = run_experiment(cfg, output_dir=args.output, progress=not args.no_progress)
    except TrainingDiverged as e:
        print(f"fedjax-sim run: error: {e}", file=sys.stderr)
        return 1
    acc = summary["test_accuracy"]
    print(f"final test accuracy: {acc:.4f} after {summary['rounds']} rounds "
          f"({summary['client_updates']} client updates, "
          f"{summary['client_updates_per_s']:.0f} updates/s, "
          f"compile {summary['compile_seconds']:.1f} s)")
    if summary.get("bayes_accuracy") is not None:
        print(f"(Bayes-optimal accuracy of this population: {summary['bayes_accuracy']:.4f})")
    eps = summary.get("epsilon")
    print("client-level DP: " + ("none (epsilon = inf)" if eps is None else
                                 f"epsilon = {eps:.3g} at delta = {summary['delta']:.3g}"))
    print(json.dumps({k: summary.get(k) for k in ("test_accuracy", "epsilon", "rounds",
                                                  "client_updates", "train_seconds",
                                                  "compile_seconds")}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="fedjax-sim",
                             description="A JAX-vectorised federated learning simulator.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND",
                                       parser_class=_ArgumentParser)
    _add_run_parser(subparsers)
    try:
        from fedjax_sim.privacy import cli as privacy_cli
    except ImportError:
        privacy_cli = None
    if privacy_cli is not None:
        privacy_cli.add_parser(subparsers)
    try:
        from fedjax_sim.attacks import cli as attacks_cli
        attacks_cli.add_parser(subparsers)
    except ImportError:
        pass
    return parser


def use_every_cpu_core() -> None:
    """Splits the host CPU into one XLA device per core, unless the user chose a count.

    With one device, XLA:CPU splits each chunk's small batched matmuls over the cores;
    on a 2-core VM that made the MLP round 1.6x slower than one pinned core
    (BENCHMARKS.md). With one device per core, the cohort is sharded over all of them
    (``num_devices = 0``) and each core trains its own slice of clients. Takes effect
    only before JAX starts its backends; set
    ``XLA_FLAGS=--xla_force_host_platform_device_count=1`` to keep one device.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" in flags:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    if cores > 1:
        os.environ["XLA_FLAGS"] = (
            f"{flags} --xla_force_host_platform_device_count={cores}".strip())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedjax-sim`` console script; returns the exit status.

    Invoked as a program (``argv=None``), it first splits the CPU into one device per
    core (:func:`use_every_cpu_core`); called in-process with ``argv`` it leaves JAX as
    the caller configured it.
    """
    if argv is None:
        use_every_cpu_core()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"fedjax-sim {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
