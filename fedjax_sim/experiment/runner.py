"""The host loop of ``fedjax-sim run``: configuration in, metrics.jsonl and summary.json out.

:func:`run_experiment` assembles the experiment (:mod:`fedjax_sim.experiment.assemble`),
compiles the round once ahead of time (compile time is reported apart from steady-state
time), then steps it and hands each round to the reporters
(:mod:`fedjax_sim.experiment.reporters`): training metrics, evaluation (with the
backdoor's success for backdoor attacks), the attack, the privacy ledger (``epsilon``
after every round; JSON ``null``, infinite, without DP noise), clip diagnostics, JSON
lines, the progress bar and the caller's callback. Nothing here runs inside the round.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable

import jax

from fedjax_sim.experiment.assemble import Experiment, assemble
from fedjax_sim.experiment.config import ExperimentConfig
from fedjax_sim.experiment.reporters import (AttackReporter, CallbackReporter, ClipReporter,
                                             EvaluationReporter, JsonLinesReporter,
                                             PrivacyReporter, ProgressReporter, Reporter,
                                             TrainingDiverged, TrainingReporter,
                                             backdoor_reporter_extra)


@dataclasses.dataclass
class Run:
    """What the reporters may read about the run in progress."""

    experiment: Experiment
    compile_seconds: float = 0.0
    round_seconds: list[float] = dataclasses.field(default_factory=list)


def default_reporters(run: Run, *, output_dir: str | None, progress: bool,
                      on_round: Callable[[dict], None] | None) -> list[Reporter]:
    """The reporters of a ``fedjax-sim run``, in the order they fill a row."""
    reporters: list[Reporter] = [TrainingReporter(),
                                 EvaluationReporter(run, backdoor_reporter_extra(run))]
    if run.experiment.cfg.attack.kind != "none":
        reporters.append(AttackReporter())
    reporters += [PrivacyReporter(run), ClipReporter(), JsonLinesReporter(output_dir),
                  ProgressReporter(run, progress)]
    if on_round is not None:
        reporters.append(CallbackReporter(on_round))
    return reporters


def run_experiment(cfg: ExperimentConfig, *, output_dir: str | None = None,
                   progress: bool = True,
                   on_round: Callable[[dict[str, Any]], None] | None = None
                   ) -> dict[str, Any]:
    """Runs the experiment ``cfg`` and returns its summary.

    Args:
      cfg: the validated configuration.
      output_dir: if set, ``metrics.jsonl`` (one object per round) and ``summary.json``
        are written there.
      progress: show a tqdm progress bar on stderr.
      on_round: optional callback receiving each round's metrics row.

    Returns:
      The summary (also written to ``summary.json``): final metrics, timings, config.

    Raises:
      ConfigError: for inconsistent settings discovered while building the data.
      TrainingDiverged: if the global params become non-finite.
    """
    t_start = time.perf_counter()
    exp = assemble(cfg)
    for note in exp.plan.notes:
        print(note, file=sys.stderr)
    if not exp.round.streaming:
        print(f"note: the server chain does not stream ({exp.round.why_stacked}): each "
              "round holds the cohort's uploads at once", file=sys.stderr)
    init_key, rounds_key = jax.random.split(exp.key)
    state = exp.round.init(init_key)
    pop = exp.data.population
    t0 = time.perf_counter()
    step = exp.round.step.lower(state, pop, jax.random.fold_in(rounds_key, 0)).compile()
    run = Run(exp, compile_seconds=time.perf_counter() - t0)

    reporters = default_reporters(run, output_dir=output_dir, progress=progress,
                                  on_round=on_round)
    row: dict[str, Any] = {}
    try:
        for r in range(cfg.sampling.rounds):
            t0 = time.perf_counter()
            state, out = step(state, pop, jax.random.fold_in(rounds_key, r))
            metrics = jax.device_get(out.metrics)
            run.round_seconds.append(time.perf_counter() - t0)
            row = {}
            for reporter in reporters:
                reporter.round(run, r, state, metrics, row)
        summary: dict[str, Any] = {
            "final": {k: row.get(k) for k in ("round", "train_loss", "test_loss",
                                              "test_accuracy")},
            "rounds": cfg.sampling.rounds, "compile_seconds": run.compile_seconds}
        for reporter in reporters:
            reporter.finish(run, state, summary)
    finally:
        for reporter in reporters:
            reporter.close()
    summary.update({
        "total_seconds": time.perf_counter() - t_start,
        "population": pop.num_clients,
        "cohort_capacity": exp.round.cohort_capacity,
        "chunk_size": exp.round.chunk_size,
        "streaming": exp.round.streaming,
        "why_stacked": exp.round.why_stacked,
        "server_chain": list(exp.algorithm.server.aggregator.names),
        "num_params": exp.num_params,
        "backend": jax.default_backend(),
        "devices": len(jax.devices()) if cfg.engine.num_devices is None
        else cfg.engine.num_devices,
        "jax_version": jax.__version__,
        "config": cfg.to_dict(),
    })
    if output_dir:
        with open(os.path.join(output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    if exp.ledger is not None:
        print(f"privacy: {summary['privacy']['statement']}", file=sys.stderr)
    return summary


__all__ = ["Run", "TrainingDiverged", "default_reporters", "run_experiment"]
