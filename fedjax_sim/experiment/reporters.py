"""Reporters: what the host loop does with each round, one concern each.

The host loop (:mod:`fedjax_sim.experiment.runner`) only steps the round; every reporter
reads the round's state and metrics and adds to the round's row (one ``metrics.jsonl``
object) and to the run's summary. A new feature is a new reporter; the loop stays as it
is. A reporter has three hooks, all host side:

* ``round(run, r, state, metrics, row)``: after round ``r`` (0-based), in order; earlier
  reporters' fields are already in ``row``;
* ``finish(run, state, summary)``: after the last round;
* ``close()``: always, also when the run fails.

Reporters never change the round (same seed, same model with or without them).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from fedjax_sim._trees import all_finite
from fedjax_sim.evaluation import evaluate_clients, make_central_evaluator
from fedjax_sim.server.clipping import clip_diagnostics


class TrainingDiverged(RuntimeError):
    """The global model became non-finite."""


class Reporter:
    """Base reporter: every hook does nothing."""

    def round(self, run: Any, r: int, state: Any, metrics: dict, row: dict) -> None:
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
    """The round's own metrics, its timing, and the divergence check."""

    def __init__(self):
        self.updates = 0

    def round(self, run, r, state, metrics, row):
        cfg = run.experiment.cfg
        self.updates += int(metrics["num_clients"])
        if not bool(_params_finite(state.params)):
            raise TrainingDiverged(f"round {r + 1}: the global params are not finite (lower "
                                   f"client_lr={cfg.algorithm.client_lr} or server_lr)")
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
            row[name] = int(value) if name in _ROUND_INTS or np.issubdtype(
                np.asarray(value).dtype, np.integer) else float(value)
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

    def round(self, run, r, state, metrics, row):
        if self.ledger is not None:
            self.ledger.record_round()
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


class JsonLinesReporter(Reporter):
    """One JSON object per round in ``DIR/metrics.jsonl``, flushed every round."""

    def __init__(self, output_dir: str | None):
        self._f = None
        if output_dir:
            os.makedirs(output_dir, exist_ok=True)
            self._f = open(os.path.join(output_dir, "metrics.jsonl"), "w")

    def round(self, run, r, state, metrics, row):
        if self._f:
            self._f.write(json.dumps(row) + "\n")
            self._f.flush()

    def close(self):
        if self._f:
            self._f.close()
            self._f = None


class ProgressReporter(Reporter):
    """A tqdm progress bar on stderr: loss, accuracy, epsilon, updates per second."""

    def __init__(self, run, enabled: bool):
        cfg = run.experiment.cfg
        desc = (cfg.algorithm.name if cfg.server.aggregator == "mean"
                else f"{cfg.algorithm.name}+{cfg.server.aggregator}")
        self.bar = tqdm(total=cfg.sampling.rounds, desc=desc, disable=not enabled,
                        file=sys.stderr, dynamic_ncols=True)
        self.accuracy = float("nan")

    def round(self, run, r, state, metrics, row):
        if row.get("test_accuracy") is not None:
            self.accuracy = row["test_accuracy"]
        eps = "inf" if row.get("epsilon") is None else f"{row['epsilon']:.3g}"
        self.bar.set_postfix(loss=f"{row.get('train_loss', float('nan')):.3f}",
                             acc=f"{self.accuracy:.3f}", eps=eps,
                             upd_s=f"{row['client_updates_per_s']:.0f}")
        self.bar.update(1)

    def close(self):
        self.bar.close()


class CallbackReporter(Reporter):
    """Hands every finished row to a user callback."""

    def __init__(self, callback: Callable[[dict], None]):
        self.callback = callback

    def round(self, run, r, state, metrics, row):
        self.callback(row)


__all__ = ["AttackReporter", "CallbackReporter", "ClipReporter", "EvaluationReporter",
           "JsonLinesReporter", "PrivacyReporter", "ProgressReporter", "Reporter",
           "TrainingDiverged", "TrainingReporter", "backdoor_reporter_extra"]
