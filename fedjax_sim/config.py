"""Experiment configuration: one frozen dataclass, validated on the host.

A configuration comes from defaults, then an optional TOML file, then command-line
flags (each later source overrides the earlier). TOML files may be flat or grouped in
tables (``[data]``, ``[algorithm]``, ...): table names are ignored, keys must be field
names of :class:`ExperimentConfig`; an unknown key is an error naming it.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import typing
from typing import Any, Mapping

from fedjax_sim._validation import (ConfigError, check_choice, check_float, check_int,
                                    fail)
from fedjax_sim.algorithms import ALGORITHM_NAMES
from fedjax_sim.models import MODEL_NAMES

DATA_SOURCES = ("label_skew", "synthetic", "synthetic_materialized", "digits", "npz", "leaf")
PARTITIONS = ("iid", "dirichlet", "shards", "quantity")
SAMPLINGS = ("fixed", "poisson")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Every knob of a ``fedjax-sim run`` experiment.

    The defaults are the main job: FedAvg on a procedural label-skewed population of
    10,000 clients (Dirichlet(0.3) label mix per client), 1,000 clients per round.
    """

    # Data.
    data: str = "label_skew"
    num_clients: int = 10_000
    synthetic_alpha: float = 0.5
    synthetic_beta: float = 0.5
    synthetic_iid: bool = False
    max_examples: int = 64
    min_examples: int = 10
    synthetic_size_mean: float = 3.0
    synthetic_size_sigma: float = 1.0
    partition: str = "dirichlet"
    dirichlet_alpha: float = 0.3
    class_separation: float = 0.3
    shards_per_client: int = 2
    data_path: str = ""
    test_path: str = ""
    eval_clients: int = 1000
    # Model.
    model: str = "softmax"
    hidden: tuple[int, ...] = (200, 200)
    # Algorithm.
    algorithm: str = "fedavg"
    client_lr: float = 0.05
    local_epochs: int = 2
    batch_size: int = 10
    server_lr: float = 0.0  # 0: the algorithm's default (1.0 SGD servers, 0.01 adaptive)
    server_momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    adaptivity: float = 1e-3
    prox_mu: float = 0.0  # fedprox only; 0 there means its default 0.01
    client_momentum: float = 0.0
    weighting: str = "examples"
    # Sampling and rounds.
    sampling: str = "fixed"
    cohort_size: int = 1000
    sampling_rate: float = 0.1
    rounds: int = 60
    eval_every: int = 1
    # Engine.
    chunk_size: int = 0  # 0: chosen from the model size (cohort.default_chunk_size)
    num_devices: int = 1
    seed: int = 0

    def __post_init__(self):
        check_choice("data", self.data, DATA_SOURCES)
        check_int("num_clients", self.num_clients, min_value=1, max_value=2**31 - 2)
        check_float("synthetic_alpha", self.synthetic_alpha, min_value=0.0)
        check_float("synthetic_beta", self.synthetic_beta, min_value=0.0)
        if not isinstance(self.synthetic_iid, bool):
            fail("synthetic_iid", self.synthetic_iid, "must be true or false")
        check_int("max_examples", self.max_examples, min_value=1)
        check_int("min_examples", self.min_examples, min_value=1)
        if self.min_examples > self.max_examples:
            fail("min_examples", self.min_examples,
                 f"exceeds max_examples={self.max_examples}")
        check_float("synthetic_size_mean", self.synthetic_size_mean)
        check_float("synthetic_size_sigma", self.synthetic_size_sigma, min_value=0.0)
        check_choice("partition", self.partition, PARTITIONS)
        check_float("dirichlet_alpha", self.dirichlet_alpha, min_value=0.0,
                    min_exclusive=True)
        check_float("class_separation", self.class_separation, min_value=0.0,
                    min_exclusive=True)
        check_int("shards_per_client", self.shards_per_client, min_value=1)
        if self.data in ("npz", "leaf") and not self.data_path:
            fail("data_path", self.data_path, f"is required with data={self.data!r}")
        check_int("eval_clients", self.eval_clients, min_value=1)
        if not self.hidden or any(not isinstance(h, int) or h < 1 for h in self.hidden):
            fail("hidden", self.hidden, "must be a non-empty list of positive widths")
        check_choice("model", self.model, MODEL_NAMES)
        check_choice("algorithm", self.algorithm, ALGORITHM_NAMES)
        check_float("client_lr", self.client_lr, min_value=0.0, min_exclusive=True)
        check_int("local_epochs", self.local_epochs, min_value=1)
        check_int("batch_size", self.batch_size, min_value=1)
        check_float("server_lr", self.server_lr, min_value=0.0)
        check_float("prox_mu", self.prox_mu, min_value=0.0)
        if self.prox_mu > 0 and self.algorithm != "fedprox":
            fail("prox_mu", self.prox_mu, f"only applies to algorithm='fedprox', "
                 f"not {self.algorithm!r}")
        check_choice("weighting", self.weighting, ("examples", "uniform"))
        check_choice("sampling", self.sampling, SAMPLINGS)
        check_int("cohort_size", self.cohort_size, min_value=1)
        if self.sampling == "fixed" and self.cohort_size > self.num_clients:
            fail("cohort_size", self.cohort_size,
                 f"exceeds num_clients={self.num_clients}")
        check_float("sampling_rate", self.sampling_rate, min_value=0.0, max_value=1.0,
                    min_exclusive=True)
        check_int("rounds", self.rounds, min_value=1)
        check_int("eval_every", self.eval_every, min_value=1)
        check_int("chunk_size", self.chunk_size, min_value=0)
        check_int("num_devices", self.num_devices, min_value=0)
        check_int("seed", self.seed, min_value=0, max_value=2**32 - 1)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        return d


FIELDS = {f.name: f for f in dataclasses.fields(ExperimentConfig)}
_HINTS = typing.get_type_hints(ExperimentConfig)


def field_kind(name: str) -> type:
    """The scalar type of a config field (``tuple`` for lists)."""
    hint = _HINTS[name]
    return tuple if typing.get_origin(hint) is tuple else hint


def _coerce(name: str, value: Any) -> Any:
    kind = field_kind(name)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        fail(name, value, "must be true or false")
    if kind is int:
        if isinstance(value, bool):
            fail(name, value, "must be an integer")
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                fail(name, value, "must be an integer")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, int):
            fail(name, value, "must be an integer")
        return value
    if kind is float:
        if isinstance(value, bool):
            fail(name, value, "must be a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            fail(name, value, "must be a number")
    if kind is tuple:
        if isinstance(value, str):
            parts = [p for p in value.replace(",", " ").split() if p]
        elif isinstance(value, (list, tuple)):
            parts = list(value)
        else:
            fail(name, value, "must be a list of integers")
        try:
            return tuple(int(p) for p in parts)
        except (TypeError, ValueError):
            fail(name, value, "must be a list of integers")
    if not isinstance(value, str):
        fail(name, value, "must be a string")
    return value


def flatten_toml(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flattens nested TOML tables; table names are dropped, keys must be unique."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, Mapping):
            for k, v in flatten_toml(value, f"{prefix}{key}.").items():
                if k in flat:
                    fail(k, v, "is set twice in the config file")
                flat[k] = v
        else:
            if key in flat:
                fail(key, value, "is set twice in the config file")
            flat[key] = value
    return flat


def load_toml(path: str) -> dict[str, Any]:
    """Reads a TOML config file into a flat ``{field: value}`` mapping."""
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except FileNotFoundError:
        fail("config", path, "no such file")
    except tomllib.TOMLDecodeError as e:
        fail("config", path, f"invalid TOML ({e})")
    return flatten_toml(table)


def make_config(overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """Defaults updated with ``overrides``; unknown keys and bad values raise ConfigError."""
    values: dict[str, Any] = {}
    for name, value in (overrides or {}).items():
        if name not in FIELDS:
            close = difflib.get_close_matches(name.replace("-", "_"), FIELDS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {name!r}{hint}")
        values[name] = _coerce(name, value)
    return ExperimentConfig(**values)
