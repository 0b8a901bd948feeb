"""Models of a run: the registry (name -> builder for the data's example shape).

Guaranteed: a model too large for one device is refused before it is built, in one line
naming the field (``hidden`` for the MLP, else ``model``; ``chunk_size`` or
``cohort_size`` when those dominate) and the estimated bytes
(:func:`fedjax_sim._validation.check_fits`). The estimate counts the parameters exactly
(``jax.eval_shape`` of the model's init, nothing allocated) and, from below, what one
round holds: the server's params and their update, each of the clients training at once
(a chunk: their params and gradients, one batch of logits), the logits of the chunk's
held-out evaluation, and a few scalars per cohort client. It runs twice: when the
configuration is made (every member's ``check``), with the data's shape if the source
declares it (:func:`fedjax_sim.experiment.data.declared_shape`) or else the smallest
shape the data could have, so an absurd ``hidden`` is refused before any file is read;
and again by :func:`build_model`, with the data's real shape and classes.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax

from fedjax_sim._validation import ConfigError, check_fits, check_int, fail
from fedjax_sim.experiment.registry import Entry, Registry
from fedjax_sim.models import Model, make_model

MAX_WIDTH = 2**31 - 1
"""The widest MLP layer accepted (wider ones cannot be laid out in memory anyway)."""

# Scalars a cohort client costs a round beyond its model: id, key, weight, metrics.
_BYTES_PER_COHORT_CLIENT = 32


def _builder(name: str):
    def build(model_cfg: Any, example_shape: tuple[int, ...], num_classes: int) -> Model:
        return make_model(name, example_shape, num_classes, hidden=model_cfg.hidden,
                          compute_dtype=model_cfg.compute_dtype)

    return build


@functools.lru_cache(maxsize=64)
def _param_count(name: str, example_shape: tuple[int, ...], num_classes: int,
                 hidden: tuple[int, ...]) -> int:
    model = make_model(name, example_shape, num_classes, hidden=hidden)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0)))
    return sum(math.prod(s.shape) for s in jax.tree.leaves(shapes))


def _cohort(cfg: Any) -> int:
    """Clients per round (the expected number for Poisson sampling)."""
    if cfg.sampling.kind == "poisson":
        return max(1, math.ceil(cfg.sampling.sampling_rate * cfg.data.num_clients))
    return min(cfg.sampling.cohort_size, cfg.data.num_clients)


def check_model_fits(cfg: Any, example_shape: tuple[int, ...], num_classes: int, *,
                     max_examples: int = 1, exact: bool = True) -> int:
    """Refuses (one line, module docstring) a model and round that cannot fit on one
    device; returns the estimated bytes.

    Args:
      cfg: the experiment configuration.
      example_shape, num_classes: the data's (or, with ``exact=False``, the smallest the
        data could have: the estimate is then a lower bound).
      max_examples: examples per client evaluated at once (padded client size).
      exact: whether the shape is the data's own (only changes the message).
    """
    from fedjax_sim.cohort import default_chunk_size

    name, hidden = cfg.model.name, tuple(cfg.model.hidden)
    for width in hidden:
        check_int("hidden", width, min_value=1, max_value=MAX_WIDTH)
    try:
        params = _param_count(name, tuple(example_shape), num_classes, hidden)
    except ConfigError as e:  # e.g. a cnn on data that are not images
        fail("model", name, f"does not fit the data ({e})")
    cohort = _cohort(cfg)
    chunk = min(cfg.engine.chunk_size or default_chunk_size(params, cohort), cohort)
    batch = min(cfg.algorithm.batch_size, max_examples)
    terms = {  # field -> bytes it drives
        "model": 4 * params * 2,
        "chunk_size": 4 * chunk * (2 * params + (batch + max_examples) * num_classes),
        "cohort_size": _BYTES_PER_COHORT_CLIENT * cohort,
    }
    need = sum(terms.values())
    key = max(terms, key=terms.get)
    if key == "chunk_size" and cfg.engine.chunk_size is None:
        key = "model"
    if key == "cohort_size" and cfg.sampling.kind == "poisson":
        key = "sampling_rate"
    if key == "model" and name == "mlp":
        key = "hidden"
    value = {"model": name, "hidden": hidden, "chunk_size": cfg.engine.chunk_size,
             "cohort_size": cfg.sampling.cohort_size,
             "sampling_rate": cfg.sampling.sampling_rate}[key]
    shape = (f"examples of shape {tuple(example_shape)} and {num_classes} classes"
             if exact else "the smallest data, 1 feature and 2 classes")
    return check_fits(key, value, need, f"one round of the {name} model ({params:,} "
                      f"params for {shape}; {chunk} of {cohort} cohort clients training "
                      "at once)")


def _check(cfg: Any) -> None:
    from fedjax_sim.experiment.data import declared_shape

    declared = declared_shape(cfg)
    if declared is not None:
        check_model_fits(cfg, *declared, max_examples=cfg.data.max_examples)
    else:
        smallest = (1, 1, 1) if cfg.model.name == "cnn" else (1,)
        check_model_fits(cfg, smallest, 2, exact=False)


REGISTRY = Registry("models", "model", "model", governed={"hidden": None})
REGISTRY.add(Entry("softmax", _builder("softmax"), "multinomial logistic regression",
                   check=_check))
REGISTRY.add(Entry("mlp", _builder("mlp"), "fully connected ReLU network",
                   uses=frozenset({"hidden"}), check=_check))
REGISTRY.add(Entry("cnn", _builder("cnn"), "two conv+pool blocks (images [H, W, C])",
                   check=_check))


def build_model(cfg: Any, example_shape: tuple[int, ...], num_classes: int) -> Model:
    """The model ``cfg.model`` names, for the data's example shape and classes (refused
    first if it cannot fit, module docstring)."""
    from fedjax_sim.experiment.data import declared_shape

    max_examples = cfg.data.max_examples if declared_shape(cfg) is not None else 1
    check_model_fits(cfg, example_shape, num_classes, max_examples=max_examples)
    return REGISTRY[cfg.model.name].build(cfg.model, example_shape, num_classes)


__all__ = ["MAX_WIDTH", "REGISTRY", "build_model", "check_model_fits"]
