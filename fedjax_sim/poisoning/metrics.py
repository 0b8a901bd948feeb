"""What a poisoning experiment measures: backdoor success, main-task accuracy, alignment.

:func:`poisoning_diagnostics` is the round's observer (:class:`~fedjax_sim.Observer`) of
an attacked run: the aggregate against the honest clients' mean upload and the two
groups' upload norms, computed from the uploads as the server chain received them
(simulator ground truth: the simulator knows who is malicious, a server does not).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim._trees import alignment, per_client_l2_norms, weighted_sum
from fedjax_sim._validation import check_int, fail
from fedjax_sim.models import Model
from fedjax_sim.observers import Observer
from fedjax_sim.server.base import CohortUpdates

PyTree = Any


@functools.lru_cache(maxsize=16)
def _predict_fn(model: Model) -> Callable:
    """One jitted ``argmax(model.apply(params, x))`` per model (compiled once per shape)."""
    return jax.jit(lambda p, xb: jnp.argmax(model.apply(p, xb), -1))


def _predict(model: Model, params: PyTree, x: np.ndarray, batch_size: int = 2048
             ) -> np.ndarray:
    apply = _predict_fn(model)
    return np.concatenate([np.asarray(apply(params, jnp.asarray(x[i:i + batch_size])))
                           for i in range(0, len(x), batch_size)] or [np.zeros(0, int)])


def main_task_accuracy(model: Model, params: PyTree, x: Any, y: Any) -> float:
    """Accuracy on the clean test set ``(x, y)``."""
    x, y = np.asarray(x), np.asarray(y)
    if len(x) == 0:
        fail("x", x.shape, "the test set is empty")
    return float(np.mean(_predict(model, params, x) == y))


def backdoor_evaluator(model: Model, x: Any, y: Any, trigger: Callable[[jax.Array], jax.Array],
                       target_label: int) -> Callable[[PyTree], float]:
    """``success(params)``: :func:`backdoor_success_rate` with the triggered test set built
    once and the prediction compiled once (for evaluating every round of a run)."""
    target = check_int("target_label", target_label, min_value=0)
    x, y = np.asarray(x), np.asarray(y)
    keep = y != target
    if not keep.any():
        fail("y", "all target", "no test example outside the target class")
    triggered = np.asarray(trigger(jnp.asarray(x[keep])))
    return lambda params: float(np.mean(_predict(model, params, triggered) == target))


def backdoor_success_rate(model: Model, params: PyTree, x: Any, y: Any,
                          trigger: Callable[[jax.Array], jax.Array], target_label: int
                          ) -> float:
    """Fraction of triggered test examples classified as ``target_label``.

    Examples whose true label already is ``target_label`` are excluded (classifying them
    as the target is not evidence of a backdoor), as in Bagdasaryan et al. 2020.

    Args:
      model: the model.
      params: the global params to test.
      x, y: clean test inputs and labels.
      trigger: the trigger the attacker used.
      target_label: the attacker's target class.

    Returns:
      The attack success rate in ``[0, 1]``.
    """
    return backdoor_evaluator(model, x, y, trigger, target_label)(params)


def honest_mean(cohort: CohortUpdates, honest: jax.Array) -> PyTree:
    """Unweighted mean of the rows with ``cohort.mask & honest`` (zero if none)."""
    sel = (cohort.mask & honest).astype(jnp.float32)
    return jax.tree.map(lambda s: s / jnp.maximum(jnp.sum(sel), 1.0),
                        weighted_sum(cohort.updates, sel))


def aggregate_alignment(aggregate: PyTree, cohort: CohortUpdates, honest: jax.Array
                        ) -> dict[str, jax.Array]:
    """Inner product and cosine of an aggregate with the honest clients' mean update."""
    return alignment(aggregate, honest_mean(cohort, honest))


def poisoning_diagnostics(is_malicious: Callable[[jax.Array], jax.Array] | None = None
                          ) -> Observer:
    """The round observer of honest-versus-malicious diagnostics (simulator ground truth).

    Metrics: ``honest_inner_product`` and ``honest_cosine`` (the aggregate against the
    weighted mean of the honest aggregated clients' uploads: 1 for an undefended mean
    without attackers; how far DP noise, a robust reducer or an attack turn the step),
    ``num_malicious`` (adversarial clients sampled), ``honest_update_norm`` /
    ``malicious_update_norm`` (mean upload norm of each group's aggregated clients, 0 if
    empty). Its partial sums (an upload-sized weighted sum plus five scalars) ride along
    the round's streaming reduction; runs without it pay nothing.

    Args:
      is_malicious: the adversary's predicate on population ids (None: all honest).
    """

    def malicious(ids):
        if is_malicious is None:
            return jnp.zeros(ids.shape, bool)
        return is_malicious(ids) & (ids >= 0)

    def partial(cohort: CohortUpdates):
        bad = malicious(cohort.client_ids)
        honest = cohort.mask & ~bad
        w = jnp.where(honest, cohort.weights, 0.0)
        norms = per_client_l2_norms(cohort.updates)
        stats = jnp.stack([jnp.sum(w), jnp.sum(bad).astype(jnp.float32),
                           jnp.sum(jnp.where(honest, norms, 0.0)),
                           jnp.sum(honest).astype(jnp.float32),
                           jnp.sum(jnp.where(cohort.mask & bad, norms, 0.0)),
                           jnp.sum(cohort.mask & bad).astype(jnp.float32)])
        return weighted_sum(cohort.updates, w), stats

    def finalize(total, aggregate):
        honest_sum, stats = total
        mean = jax.tree.map(lambda x: x / jnp.maximum(stats[0], 1e-12), honest_sum)
        aligned = alignment(aggregate, mean)
        return {"honest_inner_product": aligned["inner_product"],
                "honest_cosine": aligned["cosine"],
                "num_malicious": stats[1].astype(jnp.int32),
                "honest_update_norm": stats[2] / jnp.maximum(stats[3], 1.0),
                "malicious_update_norm": stats[4] / jnp.maximum(stats[5], 1.0)}

    return Observer("poisoning_diagnostics", partial, finalize)


__all__ = ["aggregate_alignment", "alignment", "backdoor_evaluator", "backdoor_success_rate",
           "honest_mean", "main_task_accuracy", "poisoning_diagnostics"]
