"""The ``fedjax-sim`` command line: ``run``, ``privacy``, ``attack`` and ``report``.

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
import logging
import sys
import warnings
from typing import Sequence

from fedjax_sim._validation import ConfigError
from fedjax_sim.experiment import attack_cli, privacy_cli, report
from fedjax_sim.experiment.config import FIELDS, SECTIONS, load_config
from fedjax_sim.experiment.flags import (ArgumentParser, add_compile_cache_flag, add_field_flags,
                                         given)


def _add_run_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "run", help="run a federated training experiment",
        description="Run a federated training experiment. With no flags: FedAvg on a "
                    "procedural label-skewed population of 10,000 clients (a Dirichlet(0.3) "
                    "label mix per client), 1,000 per round, 60 rounds.")
    p.add_argument("--config", help="TOML file: tables are sections ([data], [server], ...)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_compile_cache_flag(p)
    for section in ("", *SECTIONS):
        specs = [s for s in FIELDS.values() if s.section == section and s.key != "resume"]
        group = p.add_argument_group(f"[{section}]" if section else "run",
                                     "config keys; flags override --config")
        add_field_flags(group, specs)
        if section == "output":  # ``--resume DIR``: the folder and the switch in one flag
            group.add_argument("--resume", metavar="DIR", dest="resume_dir",
                               help="continue the run in DIR (its output folder) from "
                                    "its newest checkpoint; the configuration must match "
                                    "the checkpoint's (TOML: output.resume = true)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from fedjax_sim.experiment.runner import TrainingDiverged, run_experiment

    overrides = given(args, FIELDS.values())
    if args.resume_dir is not None:
        if overrides.get("output", args.resume_dir) != args.resume_dir:
            raise ConfigError(f"resume={args.resume_dir!r}: --output "
                              f"{overrides['output']!r} names another folder")
        overrides.update(output=args.resume_dir, resume=True)
    cfg = load_config(args.config, overrides)
    try:
        summary = run_experiment(cfg, progress=not args.no_progress)
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


def _version(package: str = "fedjax-sim") -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="fedjax-sim",
                            description="A JAX-vectorised federated learning simulator.")
    parser.add_argument("--version", action="version",
                        version=f"fedjax-sim {_version()} (jax {_version('jax')})")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND",
                                       parser_class=ArgumentParser)
    _add_run_parser(subparsers)
    privacy_cli.add_parser(subparsers)
    attack_cli.add_parser(subparsers)
    report.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedjax-sim`` console script; returns the exit status.

    Invoked as a program (``argv=None``), it first splits the CPU into one device per
    core (:func:`fedjax_sim._host.use_every_cpu_core`) and turns on the persistent
    compilation cache unless ``--no-compile-cache`` or ``FEDJAX_SIM_COMPILE_CACHE=0``
    says otherwise (:mod:`fedjax_sim.compile_cache`); called in-process with ``argv`` it
    leaves JAX as the caller configured it (``--no-compile-cache`` still turns the cache
    off).
    """
    if argv is None:
        from fedjax_sim._host import use_every_cpu_core
        use_every_cpu_core()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    off = getattr(args, "no_compile_cache", False)
    if argv is None or off:
        from fedjax_sim.compile_cache import use_compile_cache
        use_compile_cache(not off)
    folded = _FoldedWarnings()
    try:
        with folded:
            return args.func(args)
    except ConfigError as e:
        print(f"fedjax-sim {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        folded.report()


class _FoldedWarnings(logging.Filter):
    """Third-party warnings (absl logging, e.g. dp-accounting's RDP orders that did not
    converge, and Python warnings raised outside fedjax_sim) folded into one line on
    stderr at the end of the command, with the count and the first message."""

    def __init__(self):
        super().__init__()
        self.count, self.first = 0, None
        self._catch = warnings.catch_warnings()

    def _seen(self, source: str, message: str) -> None:
        self.count += 1
        if self.first is None:
            self.first = f"{source}: {message.splitlines()[0] if message else ''}"

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or record.levelno >= logging.ERROR:
            return True
        self._seen(record.name, record.getMessage())
        return False

    def __enter__(self):
        self._catch.__enter__()
        previous = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if "fedjax_sim" in filename:
                previous(message, category, filename, lineno, file, line)
            else:
                self._seen(category.__name__, str(message))
        warnings.showwarning = show
        logging.getLogger("absl").addFilter(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("absl").removeFilter(self)
        self._catch.__exit__(*exc)
        return False

    def report(self) -> None:
        if self.count:
            print(f"note: {self.count} third-party warning(s) folded into this line; "
                  f"the first: {self.first}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
