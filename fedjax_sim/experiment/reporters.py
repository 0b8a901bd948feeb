"""Reporters: what the host loop does with each round, one concern each.

The host loop (:mod:`fedjax_sim.experiment.runner`) only steps the round; every reporter
reads the round's state and metrics and adds to the round's row (one ``metrics.jsonl``
object) and to the run's summary. A new feature is a new reporter; the loop stays as it
is. A reporter has three hooks, all host side:

* ``round(run, r, state, metrics, row)``: after round ``r`` (0-based), in order; earlier
  reporters' fields are already in ``row``;
* ``resume(run, rows)``: once, before the first round of a resumed run, with the
  ``metrics.jsonl`` rows the checkpoint covers: the reporter rebuilds its counters so
  that the resumed run reports exactly what the uninterrupted run would;
* ``finish(run, state, summary)``: after the last round (also of a failed run: the
  summary then records the failure);
* ``close()``: always, also when the run fails.

Reporters never change the round (same seed, same model with or without them).

A run that produces a dead model fails instead of reporting it
(:class:`HealthReporter`): non-finite global params, a non-finite held-out loss, or
``max_empty_rounds`` consecutive rounds that aggregated no client raise
:class:`TrainingDiverged` after the round's row is written, so the metrics so far are
kept.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from fedjax_sim._host import format_bytes
from fedjax_sim._trees import all_finite
from fedjax_sim.evaluation import evaluate_clients, make_central_evaluator
from fedjax_sim.experiment.outputs import METRICS, dumps
from fedjax_sim.server.clipping import clip_diagnostics


class TrainingDiverged(RuntimeError):
    """The run produced a dead model: non-finite global params or held-out loss, or
    rounds on end that aggregated no client. Its message is one line."""


class Reporter:
    """Base reporter: every hook does nothing."""

    def round(self, run: Any, r: int, state: Any, metrics: dict, row: dict) -> None:
        pass

    def resume(self, run: Any, rows: list[dict]) -> None:
        pass

    def finish(self, run: Any, state: Any, summary: dict) -> None:
        pass

    def close(self) -> None:
        pass


_ROUND_INTS = ("num_clients", "num_aggregated", "num_nonfinite", "num_examples")
_ENGINE = frozenset(("overflow",))


@jax.jit
def _params_finite(params):
    return all_finite(params)


class TrainingReporter(Reporter):
    """The round's own metrics and its timing.

    A round that aggregated no client has no training metrics: its losses, accuracies
    and norms are logged as null (the counts stay).
    """

    def __init__(self):
        self.updates = 0

    def resume(self, run, rows):
        self.updates = sum(int(row["num_clients"]) for row in rows)

    def round(self, run, r, state, metrics, row):
        self.updates += int(metrics["num_clients"])
        empty = int(metrics["num_aggregated"]) == 0
        if int(metrics["num_nonfinite"]):
            tqdm.write(f"round {r + 1}: dropped {int(metrics['num_nonfinite'])} non-finite "
                       "client updates (not aggregated)", file=sys.stderr)
        if int(metrics["overflow"]):
            tqdm.write(f"round {r + 1}: Poisson draw exceeded the cohort capacity; "
                       f"{int(metrics['overflow'])} clients dropped", file=sys.stderr)
        row["round"] = r + 1
        for name, value in metrics.items():
            if name in _ENGINE:
                continue
            kind = np.asarray(value).dtype
            if kind == np.bool_:
                row[name] = bool(value)
            elif name in _ROUND_INTS or np.issubdtype(kind, np.integer):
                row[name] = int(value)
            else:
                row[name] = None if empty else float(value)
        seconds = run.round_seconds[-1]
        row["seconds"] = seconds
        row["client_updates_per_s"] = int(metrics["num_clients"]) / max(seconds, 1e-9)

    def finish(self, run, state, summary):
        steady = run.round_seconds[1:] or run.round_seconds
        summary.update({
            "client_updates": self.updates,
            "train_seconds": float(sum(run.round_seconds)),
            "mean_round_seconds": float(np.mean(steady)),
            "client_updates_per_s": float(self.updates / max(sum(run.round_seconds), 1e-9)),
        })


def _number(value: Any) -> Any:
    """A row's value as the float it was written from (null back to NaN)."""
    return float("nan") if value is None else value


def _evaluator(run) -> Callable[[Any], dict[str, float]]:
    exp = run.experiment
    data, model = exp.data, exp.model
    if data.test_central is not None:
        central = make_central_evaluator(model)

        def evaluate(params):
            m = central(params, *data.test_central)
            return {"test_loss": m["loss"], "test_accuracy": m["accuracy"]}
        return evaluate

    def evaluate(params):
        m = evaluate_clients(model, params, data.test_clients, chunk_size=exp.round.chunk_size)
        return {"test_loss": m["loss_example_weighted"],
                "test_accuracy": m["accuracy_example_weighted"],
                "test_accuracy_client_averaged": m["accuracy_client_averaged"]}
    return evaluate


class EvaluationReporter(Reporter):
    """Held-out loss and accuracy every ``eval_every`` rounds and after the last one."""

    def __init__(self, run, extra: dict[str, Callable[[Any], float]] | None = None):
        self.evaluate = _evaluator(run)
        self.extra = dict(extra or {})
        self.last: dict[str, float] = {}

    def resume(self, run, rows):
        keys = ("test_loss", "test_accuracy", "test_accuracy_client_averaged", *self.extra)
        for row in rows:
            if row.get("test_loss") is not None:
                self.last = {k: _number(row.get(k)) for k in keys if k in row}

    def round(self, run, r, state, metrics, row):
        cfg = run.experiment.cfg
        evaluated = (r + 1) % cfg.output.eval_every == 0 or r + 1 == cfg.sampling.rounds
        if evaluated:
            self.last = dict(self.evaluate(state.params))
            self.last.update({k: f(state.params) for k, f in self.extra.items()})
        keys = ("test_loss", "test_accuracy", *self.extra)
        row.update({k: (self.last.get(k) if evaluated else None) for k in keys})
        if evaluated and "test_accuracy_client_averaged" in self.last:
            row["test_accuracy_client_averaged"] = self.last["test_accuracy_client_averaged"]

    def finish(self, run, state, summary):
        summary["test_accuracy"] = self.last.get("test_accuracy")
        summary["test_accuracy_client_averaged"] = self.last.get(
            "test_accuracy_client_averaged")
        summary["bayes_accuracy"] = run.experiment.data.reference_accuracy
        for k in self.extra:
            summary[k] = self.last.get(k)


def backdoor_reporter_extra(run) -> dict[str, Callable[[Any], float]]:
    """The backdoor's success rate on the pooled held-out set, for the evaluation reporter
    (the triggered set built and the prediction compiled once)."""
    from fedjax_sim.poisoning.metrics import backdoor_evaluator

    exp = run.experiment
    adversary = exp.adversary
    if adversary.trigger is None:
        return {}
    x, y = exp.data.pooled_test()
    return {"backdoor_success": backdoor_evaluator(exp.model, x, y, adversary.trigger,
                                                   adversary.target_label)}


class AttackReporter(Reporter):
    """The adversary's size and kind in the summary (per-round figures come from the
    poisoning observer's metrics)."""

    def finish(self, run, state, summary):
        cfg = run.experiment.cfg
        summary.update({"attack": cfg.attack.kind,
                        "num_malicious": run.experiment.adversary.num_malicious})


class PrivacyReporter(Reporter):
    """The ledger: epsilon after every round (None without DP), and the guarantee."""

    def __init__(self, run):
        self.ledger = run.experiment.ledger
        self.plan = run.experiment.plan

    def _fields(self, run) -> dict[str, Any]:
        cfg = run.experiment.cfg
        return {"epsilon": None if self.ledger is None else self.ledger.epsilon(),
                "delta": self.plan.delta,
                "noise_multiplier": (self.ledger.noise_multiplier if self.ledger
                                     else self.plan.noise_multiplier),
                "accountant": cfg.server.accountant if self.ledger else None}

    def _record(self, aborted: bool, survivors: int | None) -> None:
        """One round: an aborted protocol released nothing; distributed DP is accounted
        with the noise shares that reached the sum (the survivors')."""
        if self.ledger is None or aborted:
            return
        if getattr(self.ledger, "accounts_survivors", False):
            self.ledger.record_round(survivors=survivors)
        else:
            self.ledger.record_round()

    def resume(self, run, rows):
        for row in rows:
            self._record(bool(row.get("aborted", False)), row.get("secagg_survivors"))

    def round(self, run, r, state, metrics, row):
        survivors = metrics.get("secagg_survivors")
        self._record(bool(metrics["aborted"]), None if survivors is None else int(survivors))
        row.update(self._fields(run))

    def finish(self, run, state, summary):
        cfg = run.experiment.cfg
        summary.update(self._fields(run))
        if self.ledger is None:
            summary["privacy"] = {"dp": False, "aggregator": cfg.server.aggregator,
                                  "statement": "no formal DP guarantee (no noise is added); "
                                               "epsilon = inf"}
            return
        block = self.ledger.summary()
        block.update({"aggregator": cfg.server.aggregator, "clip_norm": cfg.server.clip_norm,
                      "adaptive_clipping": cfg.server.adaptive_clipping,
                      "calibrated_from_target_epsilon": (cfg.server.target_epsilon
                                                         if self.plan.calibrated else None)})
        if cfg.sampling.kind == "poisson":
            from fedjax_sim.privacy import poisson_overflow_probability
            s = run.experiment.sampler
            block["poisson_overflow_probability"] = cfg.sampling.rounds * (
                poisson_overflow_probability(s.spec.rate, s.num_clients, s.capacity))
        summary["privacy"] = block


class ClipReporter(Reporter):
    """Clipping diagnostics of the round (not DP: simulation ground truth)."""

    def round(self, run, r, state, metrics, row):
        diag = clip_diagnostics(state.aggregator)
        if diag is not None:
            diag = jax.device_get(diag)
            row.update({"clip_norm": float(diag.clip_norm),
                        "clipped_fraction": float(diag.clipped_fraction),
                        "mean_update_norm": float(diag.mean_update_norm)})


class CommsReporter(Reporter):
    """The communication ledger (:mod:`fedjax_sim.comms`): bytes up and down in every
    round and in total, from what the clients send (exact integers)."""

    UPLOADED_LESS = "secagg_dropped"  # clients that never delivered their upload

    def __init__(self, run):
        self.cost = run.experiment.round.comms
        self.up = self.down = 0

    def resume(self, run, rows):
        if rows:
            self.up, self.down = int(rows[-1]["bytes_up_total"]), int(
                rows[-1]["bytes_down_total"])

    def round(self, run, r, state, metrics, row):
        sampled = int(metrics["num_clients"])
        uploaded = sampled - int(metrics.get(self.UPLOADED_LESS, 0))
        up, down = self.cost.round_bytes(sampled, uploaded)
        self.up += up
        self.down += down
        row.update({"bytes_up": up, "bytes_down": down, "bytes_up_total": self.up,
                    "bytes_down_total": self.down})

    def finish(self, run, state, summary):
        summary["communication"] = dict(self.cost.describe(), bytes_up_total=self.up,
                                        bytes_down_total=self.down)


class ServerViewReporter(Reporter):
    """What the server could know, in the summary: every upload, or behind secure
    aggregation only the survivors' sum; the metrics it could not have computed then
    are listed as simulator ground truth (the clients' losses, the encodings' wrapped
    coordinates and rounding error, honest-versus-malicious diagnostics, clipping)."""

    SERVER_KNOWS = frozenset({"num_clients", "num_aggregated", "aborted", "overflow",
                              "update_norm", "secagg_survivors", "secagg_dropped"})

    def __init__(self, run):
        self.hides = run.experiment.round.hides_clients
        self.names: set[str] = set()

    def round(self, run, r, state, metrics, row):
        self.names.update(metrics)
        self.names.update(k for k in ("clip_norm", "clipped_fraction", "mean_update_norm")
                          if k in row)

    def finish(self, run, state, summary):
        summary["server_view"] = {
            "sees": ("the sum of the survivors' uploads" if self.hides
                     else "every client's upload"),
            "simulator_ground_truth": sorted(self.names - self.SERVER_KNOWS)
            if self.hides else []}


class JsonLinesReporter(Reporter):
    """One strict-JSON object per round in ``DIR/metrics.jsonl``, flushed every round.

    A non-finite value is written as null and its key listed in the row's ``nonfinite``
    field (:func:`fedjax_sim.experiment.outputs.strict_json`). A resumed run appends to
    the rows its checkpoint covers (the runner has cut the file back to them).
    """

    def __init__(self, output_dir: str | None, *, append: bool = False):
        self._f = None
        if output_dir:
            self._f = open(os.path.join(output_dir, METRICS), "a" if append else "w")

    def round(self, run, r, state, metrics, row):
        if self._f:
            self._f.write(dumps(row) + "\n")
            self._f.flush()  # in the OS's hands: a killed process loses no row

    def close(self):
        if self._f:
            self._f.close()
            self._f = None


class HealthReporter(Reporter):
    """Fails the run rather than report a dead model (after the row is written).

    Raises :class:`TrainingDiverged` when the global params are not finite, when the
    held-out loss of an evaluated round is not finite, or when ``max_empty_rounds``
    consecutive rounds aggregated no client (every sampled client was empty, dropped as
    non-finite or filtered out).
    """

    def __init__(self):
        self.empty = 0

    def resume(self, run, rows):
        self.empty = 0
        for row in rows:
            self.empty = self.empty + 1 if row["num_aggregated"] == 0 else 0

    def round(self, run, r, state, metrics, row):
        cfg = run.experiment.cfg
        hint = f"lower client_lr={cfg.algorithm.client_lr:g} or server_lr"
        if not bool(_params_finite(state.params)):
            raise TrainingDiverged(f"round {r + 1}: the global params are not finite "
                                   f"({hint})")
        loss = row.get("test_loss")
        if loss is not None and not np.isfinite(loss):
            raise TrainingDiverged(f"round {r + 1}: the held-out loss of the global model is "
                                   f"{loss} ({hint})")
        self.empty = self.empty + 1 if row["num_aggregated"] == 0 else 0
        if self.empty >= cfg.output.max_empty_rounds:
            why = (f"{row['num_nonfinite']} of {row['num_clients']} sampled clients sent "
                   f"non-finite updates in the last ({hint})" if row["num_nonfinite"] else
                   f"the last sampled {row['num_clients']} clients were all empty or "
                   f"filtered out by the server chain")
            raise TrainingDiverged(
                f"rounds {r + 2 - self.empty}-{r + 1}: no client was aggregated in "
                f"{self.empty} consecutive rounds (max_empty_rounds="
                f"{cfg.output.max_empty_rounds}): {why}")


class CheckpointReporter(Reporter):
    """Saves a checkpoint every ``checkpoint_every`` rounds, after the round's row is
    flushed (:mod:`fedjax_sim.experiment.checkpoint`): the state, the number of rounds
    (which is also the ledger's and the RNG's position) and the configuration."""

    def __init__(self, checkpoints: Any, every: int, config: dict):
        self.checkpoints, self.every, self.config = checkpoints, every, config

    def round(self, run, r, state, metrics, row):
        if (r + 1) % self.every == 0 and r + 1 < run.experiment.cfg.sampling.rounds:
            self.checkpoints.save(r + 1, state, {"rounds": r + 1, "config": self.config})


class ProgressReporter(Reporter):
    """A tqdm progress bar on stderr: loss, accuracy, epsilon (with canaries also the
    estimates and the lower bound), updates per second."""

    def __init__(self, run, enabled: bool):
        cfg = run.experiment.cfg
        desc = (cfg.algorithm.name if cfg.server.aggregator == "mean"
                else f"{cfg.algorithm.name}+{cfg.server.aggregator}")
        self.bar = tqdm(total=cfg.sampling.rounds, desc=desc, disable=not enabled,
                        file=sys.stderr, dynamic_ncols=True)
        self.accuracy = float("nan")
        self.audit = ""

    def resume(self, run, rows):
        for row in rows:
            if row.get("test_accuracy") is not None:
                self.accuracy = row["test_accuracy"]
        self.bar.update(len(rows))

    def round(self, run, r, state, metrics, row):
        if row.get("test_accuracy") is not None:
            self.accuracy = row["test_accuracy"]
        eps = "inf" if row.get("epsilon") is None else f"{row['epsilon']:.3g}"
        if row.get("epsilon_estimate") is not None:
            self.audit = (f"{row['epsilon_estimate']:.3g}/"
                          f"{row['epsilon_estimate_all_iterates']:.3g}>="
                          f"{row['epsilon_lower_bound']:.3g}")
        if self.audit:  # canaries: estimate (final / all iterates) >= lower bound
            eps = f"{eps} est {self.audit}"
        loss = row.get("train_loss")
        self.bar.set_postfix(loss="-" if loss is None else f"{loss:.3f}",
                             acc=f"{self.accuracy:.3f}", eps=eps,
                             upd_s=f"{row['client_updates_per_s']:.0f}",
                             sent=format_bytes(row["bytes_up_total"]
                                               + row["bytes_down_total"]))
        self.bar.update(1)

    def close(self):
        self.bar.close()


class CallbackReporter(Reporter):
    """Hands every finished row to a user callback."""

    def __init__(self, callback: Callable[[dict], None]):
        self.callback = callback

    def round(self, run, r, state, metrics, row):
        self.callback(row)


__all__ = ["AttackReporter", "CallbackReporter", "CheckpointReporter", "ClipReporter",
           "CommsReporter", "ServerViewReporter",
           "EvaluationReporter", "HealthReporter", "JsonLinesReporter", "PrivacyReporter",
           "ProgressReporter", "Reporter", "TrainingDiverged", "TrainingReporter",
           "backdoor_reporter_extra"]
