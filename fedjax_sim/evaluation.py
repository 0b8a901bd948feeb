"""Evaluation: a centralised test set, and per-client (vmapped) evaluation.

Two aggregates answer different questions and are both reported for per-client
evaluation:

* ``example_weighted``: every test example counts once (what a centralised test set
  measures);
* ``client_averaged``: every client with at least one example counts once (what a
  typical user experiences; sensitive to heterogeneity).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim._chunks import chunked_map
from fedjax_sim._validation import check_int, fail
from fedjax_sim.data.federated import ClientData
from fedjax_sim.models import Model

PyTree = Any


def _masked_sums(model: Model, params: PyTree, x, y, mask) -> jax.Array:
    per = model.per_example_metrics(params, x, y)
    m = mask.astype(jnp.float32)
    return jnp.stack([jnp.sum(per["loss"] * m), jnp.sum(per["accuracy"] * m), jnp.sum(m)])


def make_central_evaluator(model: Model, batch_size: int = 1024
                           ) -> Callable[[PyTree, Any, Any], dict[str, float]]:
    """Returns ``evaluate(params, x, y) -> {"loss", "accuracy", "num_examples"}``.

    The test set is padded on the host to a multiple of ``batch_size`` and evaluated in a
    jitted ``lax.map`` over batches (one compilation per test-set size).
    """
    check_int("batch_size", batch_size, min_value=1)

    @jax.jit
    def _sums(params, xb, yb, mb):
        return jax.lax.map(lambda a: _masked_sums(model, params, *a), (xb, yb, mb)).sum(0)

    def evaluate(params, x, y) -> dict[str, float]:
        x = np.asarray(x)
        y = np.asarray(y)
        if x.shape[0] != y.shape[0]:
            fail("y.shape", y.shape, f"must have {x.shape[0]} labels to match x")
        if x.shape[1:] != tuple(model.example_shape):
            fail("x.shape", x.shape, f"examples must have shape {tuple(model.example_shape)}")
        n = x.shape[0]
        b = min(batch_size, max(n, 1))
        pad = (-n) % b
        xp = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]).reshape(
            (-1, b) + x.shape[1:])
        yp = np.concatenate([y, np.zeros((pad,), y.dtype)]).reshape(-1, b)
        mp = (np.arange(n + pad) < n).reshape(-1, b)
        loss, correct, count = np.asarray(_sums(params, xp, yp, mp))
        count = max(count, 1.0)
        return {"loss": float(loss / count), "accuracy": float(correct / count),
                "num_examples": int(n)}

    return evaluate


@functools.partial(jax.jit, static_argnames=("model", "chunk_size"))
def per_client_metrics(model: Model, params: PyTree, data: ClientData, *,
                       chunk_size: int = 256) -> dict[str, jax.Array]:
    """Per-client ``loss``, ``accuracy`` and ``num_examples`` (``[K]`` each).

    ``data`` has a leading client axis; clients with no examples get loss and accuracy 0
    and ``num_examples`` 0.
    """

    def one(args):
        x, y, m = args
        loss, correct, n = _masked_sums(model, params, x, y, m)
        safe = jnp.maximum(n, 1.0)
        return {"loss": loss / safe, "accuracy": correct / safe, "num_examples": n}

    return chunked_map(one, (data.x, data.y, data.mask), chunk_size)


def summarize_clients(metrics: dict[str, jax.Array]) -> dict[str, float]:
    """Example-weighted and client-averaged loss and accuracy from per-client metrics."""
    n = np.asarray(metrics["num_examples"], np.float64)
    has = n > 0
    out = {"num_clients": int(has.sum()), "num_examples": int(n.sum())}
    for name in ("loss", "accuracy"):
        v = np.asarray(metrics[name], np.float64)
        out[f"{name}_example_weighted"] = float((v * n).sum() / max(n.sum(), 1.0))
        out[f"{name}_client_averaged"] = float(v[has].mean()) if has.any() else 0.0
    return out


def evaluate_clients(model: Model, params: PyTree, data: ClientData, *,
                     chunk_size: int = 256) -> dict[str, float]:
    """Per-client evaluation summarised both ways (see module docstring)."""
    check_int("chunk_size", chunk_size, min_value=1)
    return summarize_clients(per_client_metrics(model, params, data, chunk_size=chunk_size))
