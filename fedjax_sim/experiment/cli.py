"""The ``fedjax-sim`` command line: ``run``, ``privacy`` and ``attack``.

Every flag of every subcommand comes from one schema (:mod:`fedjax_sim.experiment.schema`):
a declared field gives the flag, its help (with the allowed values or range) and the
validation of its value. ``fedjax-sim run`` runs an experiment from flags and/or a TOML
file (flags win); with no arguments it runs the main job. Errors print one line naming
the field and the value and exit with status 2, without a traceback; abbreviated flags
are refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from fedjax_sim._validation import ConfigError
from fedjax_sim.experiment import attack_cli, privacy_cli
from fedjax_sim.experiment.config import FIELDS, SECTIONS, load_config
from fedjax_sim.experiment.flags import ArgumentParser, add_field_flags, given


def _add_run_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "run", help="run a federated training experiment",
        description="Run a federated training experiment. With no flags: FedAvg on a "
                    "procedural label-skewed population of 10,000 clients (a Dirichlet(0.3) "
                    "label mix per client), 1,000 per round, 60 rounds.")
    p.add_argument("--config", help="TOML file: tables are sections ([data], [server], ...)")
    p.add_argument("--output", help="directory for metrics.jsonl and summary.json")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    for section in ("", *SECTIONS):
        specs = [s for s in FIELDS.values() if s.section == section]
        group = p.add_argument_group(f"[{section}]" if section else "run",
                                     "config keys; flags override --config")
        add_field_flags(group, specs)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from fedjax_sim.experiment.runner import TrainingDiverged, run_experiment

    cfg = load_config(args.config, given(args, FIELDS.values()))
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
    parser = ArgumentParser(prog="fedjax-sim",
                            description="A JAX-vectorised federated learning simulator.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND",
                                       parser_class=ArgumentParser)
    _add_run_parser(subparsers)
    privacy_cli.add_parser(subparsers)
    attack_cli.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedjax-sim`` console script; returns the exit status.

    Invoked as a program (``argv=None``), it first splits the CPU into one device per
    core (:func:`fedjax_sim._host.use_every_cpu_core`); called in-process with ``argv`` it
    leaves JAX as the caller configured it.
    """
    if argv is None:
        from fedjax_sim._host import use_every_cpu_core
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
