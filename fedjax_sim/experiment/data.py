"""Data sources of a run: the registry, the built data and its cache.

Each source builds an :class:`ExperimentData` from the ``data`` section and the seed:
a population (anything with ``cohort_data(ids)``: generated inside jit, or padded
arrays) and held-out data to evaluate on. Generated data is deterministic in the data
section and the seed, and cached on exactly those (the section is a frozen dataclass):
sweeps over server or privacy settings build their data once. Files (``npz``, ``leaf``)
are read every time (they may change on disk).

Sizes are refused before they are allocated, in one line naming the field and the
estimated bytes (:func:`fedjax_sim._validation.check_fits`): each source's ``check`` runs
when the configuration is made (the padded population of ``synthetic_materialized``, the
held-out clients of the procedural sources; that the files exist), the loaders check a
file's declared and padded sizes before reading or padding it
(:mod:`fedjax_sim.data.io`). :func:`declared_shape` gives the model's registry the
example shape and class count of a generated source before anything is built.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from fedjax_sim._validation import check_fits, fail
from fedjax_sim.compile_options import one_off_jit
from fedjax_sim.data.federated import ClientData, FederatedData, padded_bytes
from fedjax_sim.experiment.registry import Entry, Registry


@dataclasses.dataclass(frozen=True)
class ExperimentData:
    """A training population and how to evaluate on held-out data.

    Exactly one of ``test_clients`` (per-client held-out data, leading client axis) and
    ``test_central`` (a pooled ``(x, y)`` test set) is set.
    """

    population: Any
    num_classes: int
    example_shape: tuple[int, ...]
    test_clients: ClientData | None = None
    test_central: tuple[np.ndarray, np.ndarray] | None = None
    reference_accuracy: float | None = None

    def pooled_test(self) -> tuple[np.ndarray, np.ndarray]:
        """The held-out examples pooled into ``(x, y)`` arrays."""
        if self.test_central is not None:
            return tuple(np.asarray(a) for a in self.test_central)
        mask = np.asarray(self.test_clients.mask)
        return (np.asarray(self.test_clients.x)[mask], np.asarray(self.test_clients.y)[mask])


def _federated_as_clients(data: FederatedData) -> ClientData:
    return data.cohort_data(jnp.arange(data.num_clients, dtype=jnp.int32))


def _procedural_test(pop: Any, d: Any, seed: int) -> ClientData:
    """Held-out examples of ``eval_clients`` population clients chosen by the seed."""
    n_eval = min(d.eval_clients, d.num_clients)
    rng = np.random.default_rng(seed + 1)
    eval_ids = np.sort(rng.choice(d.num_clients, n_eval, replace=False))
    return one_off_jit(pop.test_data)(jnp.asarray(eval_ids, jnp.int32))


GENERATED_DIM, GENERATED_CLASSES = 60, 10
"""Input dimension and class count of the generated sources (label_skew, synthetic,
synthetic_materialized)."""


def _label_skew(d: Any, seed: int) -> ExperimentData:
    from fedjax_sim.data.label_skew import procedural_label_skew

    pop = procedural_label_skew(
        d.num_clients, alpha=d.dirichlet_alpha, seed=seed, max_examples=d.max_examples,
        min_examples=d.min_examples, size_mean=d.synthetic_size_mean,
        size_sigma=d.synthetic_size_sigma, separation=d.class_separation,
        dim=GENERATED_DIM, num_classes=GENERATED_CLASSES)
    return ExperimentData(pop, pop.num_classes, pop.example_shape,
                          test_clients=_procedural_test(pop, d, seed),
                          reference_accuracy=pop.bayes_accuracy(seed=seed))


def _synthetic(d: Any, seed: int) -> ExperimentData:
    from fedjax_sim.data.procedural import procedural_synthetic

    pop = procedural_synthetic(
        d.num_clients, alpha=d.synthetic_alpha, beta=d.synthetic_beta, iid=d.synthetic_iid,
        seed=seed, max_examples=d.max_examples,
        min_examples=min(d.min_examples, d.max_examples), size_mean=d.synthetic_size_mean,
        size_sigma=d.synthetic_size_sigma, dim=GENERATED_DIM, num_classes=GENERATED_CLASSES)
    return ExperimentData(pop, pop.num_classes, pop.example_shape,
                          test_clients=_procedural_test(pop, d, seed))


def _synthetic_materialized(d: Any, seed: int) -> ExperimentData:
    from fedjax_sim.data.synthetic import synthetic_fedprox

    split = synthetic_fedprox(
        d.num_clients, alpha=d.synthetic_alpha, beta=d.synthetic_beta, iid=d.synthetic_iid,
        seed=seed, max_examples=d.max_examples,
        min_examples=min(max(d.min_examples, 2), d.max_examples),
        size_mean=d.synthetic_size_mean, size_sigma=d.synthetic_size_sigma,
        dim=GENERATED_DIM, num_classes=GENERATED_CLASSES)
    return ExperimentData(split.train, split.train.num_classes, split.train.example_shape,
                          test_clients=_federated_as_clients(split.test))


def _digits(d: Any, seed: int) -> ExperimentData:
    from fedjax_sim.data.digits import digits_federated

    split = digits_federated(d.num_clients, partition=d.partition, alpha=d.dirichlet_alpha,
                             shards_per_client=d.shards_per_client, seed=seed)
    return ExperimentData(split.train, split.train.num_classes, split.train.example_shape,
                          test_central=(split.test_x, split.test_y))


def _from_files(d: Any, seed: int) -> ExperimentData:
    from fedjax_sim.data import io

    loader = io.load_npz if d.source == "npz" else io.load_leaf
    train = loader(d.data_path, field="data_path").data
    if train.num_classes < 2:
        fail("data_path", d.data_path, "holds labels of one class only; a classifier "
             "needs >= 2 classes (an .npz file may store num_classes)")
    if train.num_clients != d.num_clients:
        fail("num_clients", d.num_clients,
             f"does not match the {train.num_clients} clients in data_path={d.data_path!r}")
    if not d.test_path:
        return ExperimentData(train, train.num_classes, train.example_shape,
                              test_clients=_federated_as_clients(train))
    test = loader(d.test_path, field="test_path").data
    if test.num_clients != train.num_clients:
        fail("test_path", d.test_path,
             f"holds {test.num_clients} clients, training data {train.num_clients}")
    if test.example_shape != train.example_shape:
        fail("test_path", d.test_path, f"holds examples of shape {test.example_shape}, "
             f"training data {train.example_shape}")
    num_classes = max(train.num_classes, test.num_classes)  # the model covers both
    train, test = (a.replace(num_classes=num_classes) for a in (train, test))
    return ExperimentData(train, num_classes, train.example_shape,
                          test_clients=_federated_as_clients(test))


def _check_sizes(cfg: Any) -> None:
    d = cfg.data
    if d.min_examples > d.max_examples:
        fail("min_examples", d.min_examples, f"exceeds max_examples={d.max_examples}")


def _blame(d: Any, *keys: str) -> str:
    """Of ``keys``, the field furthest above its default (the one to name)."""
    defaults = type(d)()
    return max(keys, key=lambda k: getattr(d, k) / getattr(defaults, k))


def _check_procedural(cfg: Any) -> None:
    """The held-out data of ``eval_clients`` clients is materialised (once)."""
    _check_sizes(cfg)
    d = cfg.data
    n_eval = min(d.eval_clients, d.num_clients)
    key = _blame(d, "eval_clients", "max_examples")
    check_fits(key, getattr(d, key), padded_bytes(n_eval, d.max_examples, (GENERATED_DIM,)),
               f"the held-out data of {n_eval} clients x {d.max_examples} examples x "
               f"{GENERATED_DIM} features")


def _check_materialized(cfg: Any) -> None:
    """Every client's training and held-out examples are held, padded."""
    _check_sizes(cfg)
    d = cfg.data
    key = _blame(d, "num_clients", "max_examples")
    need = padded_bytes(d.num_clients, d.max_examples, (GENERATED_DIM,))
    check_fits(key, getattr(d, key), need,
               f"the padded population of {d.num_clients} clients x {d.max_examples} "
               f"examples x {GENERATED_DIM} features")


def _check_files(cfg: Any) -> None:
    from fedjax_sim.data.io import check_source_path

    d = cfg.data
    if not d.data_path:
        fail("data_path", d.data_path, f"is required with data={d.source!r}")
    for key in ("data_path", "test_path"):
        if getattr(d, key):
            check_source_path(getattr(d, key), key, directory=d.source == "leaf")


@dataclasses.dataclass(frozen=True)
class SourceMeta:
    """``cached``: the source is generated from the data section and the seed alone.
    ``example_shape``, ``num_classes``: the data's, when known before it is built."""

    cached: bool = True
    example_shape: tuple[int, ...] | None = None
    num_classes: int | None = None


FILES = SourceMeta(cached=False)
GENERATED = SourceMeta(example_shape=(GENERATED_DIM,), num_classes=GENERATED_CLASSES)
REGISTRY = Registry("data", "data", "data",
                    governed={"data_path": None, "test_path": None})
REGISTRY.add(Entry("label_skew", _label_skew, "procedural label-skewed population: a "
                   "Dirichlet label mix per client, generated inside jit",
                   check=_check_procedural, meta=GENERATED))
REGISTRY.add(Entry("synthetic", _synthetic, "procedural FedProx Synthetic(alpha, beta)",
                   check=_check_procedural, meta=GENERATED))
REGISTRY.add(Entry("synthetic_materialized", _synthetic_materialized,
                   "FedProx Synthetic(alpha, beta), held in memory",
                   check=_check_materialized, meta=GENERATED))
REGISTRY.add(Entry("digits", _digits, "scikit-learn's bundled 8x8 digits, partitioned"))
REGISTRY.add(Entry("npz", _from_files, "a user's .npz file",
                   uses=frozenset({"data_path", "test_path"}), check=_check_files, meta=FILES))
REGISTRY.add(Entry("leaf", _from_files, "a user's LEAF JSON file",
                   uses=frozenset({"data_path", "test_path"}), check=_check_files, meta=FILES))


def declared_shape(cfg: Any) -> tuple[tuple[int, ...], int] | None:
    """``(example_shape, num_classes)`` of ``cfg``'s data if known before it is built."""
    meta = REGISTRY[cfg.data.source].meta
    if meta is None or meta.example_shape is None:
        return None
    return meta.example_shape, meta.num_classes


_CACHE: "collections.OrderedDict[tuple, ExperimentData]" = collections.OrderedDict()
_CACHE_SIZE = 2


def build_data(cfg: Any) -> ExperimentData:
    """The population and test data of ``cfg`` (host side, once; generated data cached on
    ``(cfg.data, cfg.seed)``, the last two distinct ones)."""
    d = cfg.data
    entry = REGISTRY[d.source]
    build = entry.build
    if entry.meta is not None and not entry.meta.cached:
        return build(d, cfg.seed)
    key = (d, cfg.seed)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    data = build(d, cfg.seed)
    _CACHE[key] = data
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return data


__all__ = ["ExperimentData", "GENERATED_DIM", "GENERATED_CLASSES", "REGISTRY", "build_data",
           "declared_shape"]
