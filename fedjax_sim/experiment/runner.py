"""The host loop of ``fedjax-sim run``: configuration in, metrics.jsonl and summary.json out.

:func:`run_experiment` checks the output folder (before anything is built), assembles
the experiment (:mod:`fedjax_sim.experiment.assemble`), compiles the round once ahead of
time (compile time is reported apart from steady-state time), then steps it and hands
each round to the reporters (:mod:`fedjax_sim.experiment.reporters`): training metrics,
evaluation (with the backdoor's success for backdoor attacks), the attack, the privacy
ledger (``epsilon`` after every round; JSON ``null``, infinite, without DP noise), clip
diagnostics, the communication ledger (bytes up and down), JSON lines, the health check,
checkpoints, the progress bar and the caller's callback. Nothing here runs inside the round.

With an output folder, a run

* writes ``metrics.jsonl`` (strict JSON, flushed every round) and ``summary.json``
  (results, timings, the configuration and the provenance: versions, commit, command
  line, devices, seed);
* saves a checkpoint every ``output.checkpoint_every`` rounds and, with
  ``output.resume``, continues from the newest one exactly as if it had never stopped
  (same params, rows and epsilon, bit for bit on one machine);
* saves the final model in ``DIR/model`` when it succeeds:
  ``fedjax_sim.load_params(DIR)`` loads it back;
* writes ``DIR/report.html`` (:mod:`fedjax_sim.experiment.report`), also for a failed
  run: one self-contained page with the curves, privacy, leakage and configuration.

A run whose model dies (non-finite params or held-out loss, or ``max_empty_rounds``
rounds aggregating nobody) raises :class:`TrainingDiverged` after writing the rows so
far and a summary whose ``status`` is ``"failed"``; no model is saved.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Callable

import jax

from fedjax_sim._validation import fail
from fedjax_sim.compile_options import one_off_jit, round_compiler_options
from fedjax_sim.experiment.assemble import Experiment, assemble, run_keys
from fedjax_sim.experiment.checkpoint import RunCheckpoints, config_differences, save_params
from fedjax_sim.experiment.audit import AuditReporter
from fedjax_sim.experiment.config import ExperimentConfig
from fedjax_sim.experiment.leakage import LeakageReporter, observed_rounds
from fedjax_sim.experiment.malicious import MaliciousReporter
from fedjax_sim.experiment.outputs import (CHECKPOINTS, METRICS, SUMMARY, dumps,
                                           prepare_output, truncate_rows)
from fedjax_sim.experiment.provenance import provenance
from fedjax_sim.experiment.report import write_report
from fedjax_sim.experiment.reporters import (AttackReporter, CallbackReporter,
                                             CheckpointReporter, ClipReporter, CommsReporter,
                                             EvaluationReporter, HealthReporter,
                                             JsonLinesReporter, PrivacyReporter,
                                             ProgressReporter, Reporter,
                                             ServerViewReporter, TrainingDiverged,
                                             TrainingReporter, backdoor_reporter_extra)


@dataclasses.dataclass
class Run:
    """What the reporters may read about the run in progress: the experiment, timings,
    and the last round's full :class:`~fedjax_sim.rounds.RoundOutput` (device arrays)
    with the params that round broadcast."""

    experiment: Experiment
    compile_seconds: float = 0.0
    round_seconds: list[float] = dataclasses.field(default_factory=list)
    output: Any = None
    params_before: Any = None


def default_reporters(run: Run, *, output_dir: str | None, progress: bool,
                      on_round: Callable[[dict], None] | None,
                      checkpoints: RunCheckpoints | None = None,
                      append: bool = False) -> list[Reporter]:
    """The reporters of a ``fedjax-sim run``, in the order they fill a row: the row is
    written (and handed to ``on_round``) before the health check may fail the run, and
    checkpointed only after it passed."""
    cfg = run.experiment.cfg
    reporters: list[Reporter] = [TrainingReporter(),
                                 EvaluationReporter(run, backdoor_reporter_extra(run))]
    if cfg.attack.kind != "none":
        reporters.append(AttackReporter())
    reporters.append(PrivacyReporter(run))
    if run.experiment.canaries is not None:
        reporters.append(AuditReporter(run))
    reporters += [ClipReporter(), CommsReporter(run), ServerViewReporter(run)]
    if observed_rounds(cfg):
        reporters.append(LeakageReporter(run, output_dir))
    if run.experiment.malicious is not None:
        reporters.append(MaliciousReporter(run, output_dir))
    reporters.append(JsonLinesReporter(output_dir, append=append))
    if on_round is not None:
        reporters.append(CallbackReporter(on_round))
    reporters.append(HealthReporter())
    if checkpoints is not None and cfg.output.checkpoint_every:
        reporters.append(CheckpointReporter(checkpoints, cfg.output.checkpoint_every,
                                            cfg.to_dict()))
    reporters.append(ProgressReporter(run, progress))
    return reporters


def _open_checkpoints(cfg: ExperimentConfig, out: str | None) -> RunCheckpoints | None:
    """The run's checkpoints; on resume, the saved configuration is checked against
    ``cfg`` first (cheap: before any data is built)."""
    if out is None or not (cfg.output.checkpoint_every or cfg.output.resume):
        return None
    checkpoints = RunCheckpoints(os.path.join(out, CHECKPOINTS))
    if cfg.output.resume:
        saved = checkpoints.read_meta()["config"]
        differences = config_differences(saved, cfg.to_dict())
        if differences:
            fail("resume", out, "was run with a different configuration: "
                 + "; ".join(differences))
    return checkpoints


def _write_summary(out: str | None, summary: dict[str, Any]) -> None:
    if out:
        path = os.path.join(out, SUMMARY)
        with open(path + ".tmp", "w") as f:
            f.write(dumps(summary, indent=2))
        os.replace(path + ".tmp", path)


def run_experiment(cfg: ExperimentConfig, *, output_dir: str | None = None,
                   progress: bool = True,
                   on_round: Callable[[dict[str, Any]], None] | None = None
                   ) -> dict[str, Any]:
    """Runs the experiment ``cfg`` and returns its summary.

    Args:
      cfg: the validated configuration.
      output_dir: the output folder (overrides ``cfg.output.dir``): ``metrics.jsonl``
        (one object per round), ``summary.json``, checkpoints and the final model.
      progress: show a tqdm progress bar on stderr.
      on_round: optional callback receiving each round's metrics row.

    Returns:
      The summary (also written to ``summary.json``): final metrics, timings, config,
      provenance.

    Raises:
      ConfigError: for a bad output folder (checked first), a checkpoint made with another
        configuration, or inconsistent settings discovered while building the data.
      TrainingDiverged: if the model dies (module docstring); rows and summary are kept.
    """
    t_start = time.perf_counter()
    if output_dir is not None:
        cfg = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, dir=output_dir))
    out = cfg.output.dir
    prepare_output(out, resume=cfg.output.resume, overwrite=cfg.output.overwrite)
    checkpoints = _open_checkpoints(cfg, out)
    exp = assemble(cfg)
    for note in exp.plan.notes:
        print(note, file=sys.stderr)
    if not exp.round.streaming:
        print(f"note: the server chain does not stream ({exp.round.why_stacked}): each "
              "round holds the cohort's uploads at once", file=sys.stderr)
    init_key, rounds_key = run_keys(exp.key)
    # One program for the model's initial params instead of flax's op-by-op init (which
    # compiles each initializer on its own at -O3): the same bits, a second less.
    state = exp.round.init(init_key, one_off_jit(exp.algorithm.server.init_params)(init_key))
    rows: list[dict[str, Any]] = []
    if cfg.output.resume:
        state, meta = checkpoints.restore(state)
        rows = truncate_rows(os.path.join(out, METRICS), meta["rounds"])
    pop = exp.data.population
    t0 = time.perf_counter()
    step = exp.round.step.lower(state, pop, jax.random.fold_in(rounds_key, 0)).compile(
        round_compiler_options(cfg.engine.lean_compile))
    run = Run(exp, compile_seconds=time.perf_counter() - t0,
              round_seconds=[float(row["seconds"]) for row in rows])

    reporters = default_reporters(run, output_dir=out, progress=progress, on_round=on_round,
                                  checkpoints=checkpoints, append=bool(rows))
    for reporter in reporters:
        reporter.resume(run, rows)
    row: dict[str, Any] = dict(rows[-1]) if rows else {}
    failure: TrainingDiverged | None = None
    try:
        for r in range(len(rows), cfg.sampling.rounds):
            t0 = time.perf_counter()
            run.params_before = state.params
            state, run.output = step(state, pop, jax.random.fold_in(rounds_key, r))
            metrics = jax.device_get(run.output.metrics)
            run.round_seconds.append(time.perf_counter() - t0)
            row = {}
            try:
                for reporter in reporters:
                    reporter.round(run, r, state, metrics, row)
            except TrainingDiverged as e:
                failure = e
                break
        summary: dict[str, Any] = {
            "status": "failed" if failure else "completed",
            "error": str(failure) if failure else None,
            "final": {k: row.get(k) for k in ("round", "train_loss", "test_loss",
                                              "test_accuracy")},
            "rounds": cfg.sampling.rounds, "rounds_run": len(run.round_seconds),
            "resumed_from": len(rows) if rows else None,
            "compile_seconds": run.compile_seconds}
        for reporter in reporters:
            reporter.finish(run, state, summary)
    finally:
        for reporter in reporters:
            reporter.close()
        if checkpoints is not None:
            checkpoints.close()
    if failure is None and out:
        summary["model"] = save_params(out, state.params)
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
        "provenance": provenance(cfg.seed),
        "config": cfg.to_dict(),
    })
    _write_summary(out, summary)
    if out:
        write_report(out)
    if failure is not None:
        raise failure
    if exp.ledger is not None:
        print(f"privacy: {summary['privacy']['statement']}", file=sys.stderr)
    return summary


__all__ = ["Run", "TrainingDiverged", "default_reporters", "run_experiment"]
