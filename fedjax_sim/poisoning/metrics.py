"""What a poisoning experiment measures: backdoor success, main-task accuracy, alignment."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim._validation import check_int, fail
from fedjax_sim.models import Model
from fedjax_sim.server.base import CohortUpdates, alignment, weighted_sum

PyTree = Any


def _predict(model: Model, params: PyTree, x: np.ndarray, batch_size: int = 2048
             ) -> np.ndarray:
    apply = jax.jit(lambda p, xb: jnp.argmax(model.apply(p, xb), -1))
    return np.concatenate([np.asarray(apply(params, jnp.asarray(x[i:i + batch_size])))
                           for i in range(0, len(x), batch_size)] or [np.zeros(0, int)])


def main_task_accuracy(model: Model, params: PyTree, x: Any, y: Any) -> float:
    """Accuracy on the clean test set ``(x, y)``."""
    x, y = np.asarray(x), np.asarray(y)
    if len(x) == 0:
        fail("x", x.shape, "the test set is empty")
    return float(np.mean(_predict(model, params, x) == y))


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
    target = check_int("target_label", target_label, min_value=0)
    x, y = np.asarray(x), np.asarray(y)
    keep = y != target
    if not keep.any():
        fail("y", "all target", "no test example outside the target class")
    triggered = np.asarray(trigger(jnp.asarray(x[keep])))
    return float(np.mean(_predict(model, params, triggered) == target))


def honest_mean(cohort: CohortUpdates, honest: jax.Array) -> PyTree:
    """Unweighted mean of the rows with ``cohort.mask & honest`` (zero if none)."""
    sel = (cohort.mask & honest).astype(jnp.float32)
    return jax.tree.map(lambda s: s / jnp.maximum(jnp.sum(sel), 1.0),
                        weighted_sum(cohort.updates, sel))


def aggregate_alignment(aggregate: PyTree, cohort: CohortUpdates, honest: jax.Array
                        ) -> dict[str, jax.Array]:
    """Inner product and cosine of an aggregate with the honest clients' mean update."""
    return alignment(aggregate, honest_mean(cohort, honest))


__all__ = ["aggregate_alignment", "alignment", "backdoor_success_rate", "honest_mean",
           "main_task_accuracy"]
