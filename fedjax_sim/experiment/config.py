"""The configuration of a ``fedjax-sim run``: sections of frozen dataclasses.

:class:`ExperimentConfig` holds one section per concern (``data``, ``model``,
``algorithm``, ``sampling``, ``server``, ``secure``, ``attack``, ``leakage``, ``engine``,
``output``)
and the run's ``seed``. Every field is declared once (:func:`~fedjax_sim.experiment.schema.option`):
type, range, help and flag. ``None`` means "automatic" (the builder picks; the help
says what).

Sources, later ones winning: the defaults (the main job), a TOML file, flags.

* In a TOML file a table means its section (``[data]``, ``[server]``, ...; a key in the
  wrong table is a one-line error saying where it lives); keys at the top level are the
  flat keys of earlier versions (``num_clients = 300``) and keep working.
* A flag is the flat key with dashes (``--num-clients``); the flat key of a field is its
  name except for the six "which one" fields: ``data`` (``data.source``), ``model``
  (``model.name``), ``algorithm`` (``algorithm.name``), ``sampling``
  (``sampling.kind``), ``aggregator`` (``server.aggregator``), ``attack``
  (``attack.kind``). Inside their table these are also accepted under the flat name.
* Flat keys and flags whose earlier versions used 0 for "automatic" (``server_lr``,
  ``clip_norm``, ...) still accept 0 with that meaning.

Cross-field rules are checked when the configuration is made (:func:`make_config`), by
the builders' own checks (:mod:`fedjax_sim.experiment.registry`), before any data is
built.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import tomllib
from typing import Any, Mapping

from fedjax_sim._validation import ConfigError, fail
from fedjax_sim.experiment import registry
from fedjax_sim.experiment.outputs import check_output
from fedjax_sim.experiment.schema import FieldSpec, option, section_fields, validate_section


def _names(family: str):
    def names() -> tuple[str, ...]:
        return registry.family(family).names

    return names


class _Section:
    SECTION = ""

    def __post_init__(self):
        validate_section(self)


@dataclasses.dataclass(frozen=True)
class DataConfig(_Section):
    SECTION = "data"
    source: str = option("label_skew", "the training population", choices=_names("data"),
                         flag="data")
    num_clients: int = option(10_000, "clients in the population", low=1, high=2**31 - 2)
    max_examples: int = option(64, "examples per client, padded", low=1, high=2**20)
    min_examples: int = option(10, "fewest examples of a generated client", low=1,
                               high=2**20)
    synthetic_size_mean: float = option(3.0, "mean log-size of a generated client",
                                        low=-30.0, high=30.0)
    synthetic_size_sigma: float = option(1.0, "std of a generated client's log-size",
                                         low=0.0, high=30.0)
    dirichlet_alpha: float = option(0.3, "Dirichlet concentration of the label mix "
                                    "(label_skew; digits with partition=dirichlet)",
                                    low=0.0, low_open=True, high=1e6)
    class_separation: float = option(0.3, "distance between class means (label_skew)",
                                     low=0.0, low_open=True, high=1e6)
    synthetic_alpha: float = option(0.5, "FedProx Synthetic(alpha, beta): model "
                                    "heterogeneity", low=0.0, high=1e6)
    synthetic_beta: float = option(0.5, "FedProx Synthetic(alpha, beta): data "
                                   "heterogeneity", low=0.0, high=1e6)
    synthetic_iid: bool = option(False, "FedProx Synthetic with IID clients")
    partition: str = option("dirichlet", "how digits are split over clients",
                            choices=("iid", "dirichlet", "shards", "quantity"))
    shards_per_client: int = option(2, "shards per client (partition=shards)", low=1,
                                    high=10**6)
    data_path: str | None = option(None, "training data file (data=npz or leaf)")
    test_path: str | None = option(None, "held-out data file (npz or leaf); automatic: "
                                   "evaluate on the training clients")
    eval_clients: int = option(1000, "held-out clients evaluated (generated data)",
                               low=1, high=2**31 - 2)


@dataclasses.dataclass(frozen=True)
class ModelConfig(_Section):
    SECTION = "model"
    name: str = option("softmax", "the model", choices=_names("models"), flag="model")
    hidden: tuple[int, ...] = option((200, 200), "hidden widths of the MLP")
    compute_dtype: str = option("float32", "precision of the clients' forward and backward "
                                "passes; bfloat16 = mixed precision (float32 params, "
                                "gradients, deltas and server state)",
                                choices=("float32", "bfloat16"))


@dataclasses.dataclass(frozen=True)
class AlgorithmConfig(_Section):
    SECTION = "algorithm"
    name: str = option("fedavg", "the federated algorithm", choices=_names("algorithms"),
                       flag="algorithm")
    client_lr: float = option(0.05, "local SGD learning rate", low=0.0, low_open=True,
                              high=1e6)
    local_epochs: int = option(2, "local passes over a client's data per round", low=1,
                               high=10**4)
    batch_size: int = option(10, "local mini-batch size", low=1, high=2**20)
    server_lr: float | None = option(None, "server learning rate; automatic: 1 for SGD "
                                     "servers, 0.01 for adaptive ones", low=0.0,
                                     low_open=True, high=1e6, zero_is_auto=True)
    server_momentum: float | None = option(None, "fedavgm's server momentum; automatic: "
                                           "0.9", low=0.0, high=1.0, high_open=True)
    beta1: float | None = option(None, "first-moment decay (fedadam, fedyogi); automatic: "
                                 "0.9", low=0.0, high=1.0, high_open=True)
    beta2: float | None = option(None, "second-moment decay (fedadam, fedyogi); automatic: "
                                 "0.99", low=0.0, high=1.0, high_open=True)
    adaptivity: float | None = option(None, "tau of the adaptive servers; automatic: 1e-3",
                                      low=0.0, low_open=True, high=1e6)
    prox_mu: float | None = option(None, "FedProx proximal coefficient; automatic: 0.01",
                                   low=0.0, high=1e6, zero_is_auto=True)
    client_momentum: float | None = option(None, "momentum of the local SGD; automatic: 0",
                                           low=0.0, high=1.0, high_open=True,
                                           zero_is_auto=True)
    worker_momentum: float | None = option(None, "clients upload momentum of their updates "
                                           "kept across rounds (Karimireddy et al. 2021); "
                                           "automatic: none", low=0.0, high=1.0,
                                           high_open=True, zero_is_auto=True)
    weighting: str | None = option(None, "client weights in the mean; automatic: uniform "
                                   "with DP (sensitivity), else examples",
                                   choices=("examples", "uniform"))


@dataclasses.dataclass(frozen=True)
class SamplingConfig(_Section):
    SECTION = "sampling"
    kind: str = option("fixed", "who takes part in a round", choices=_names("samplers"),
                       flag="sampling")
    cohort_size: int = option(1000, "clients per round (fixed, cyclic)", low=1,
                              high=2**31 - 2)
    sampling_rate: float = option(0.1, "each client's chance to take part (poisson)",
                                  low=0.0, low_open=True, high=1.0)
    rounds: int = option(60, "rounds to run", low=1, high=10**8)


@dataclasses.dataclass(frozen=True)
class ServerConfig(_Section):
    SECTION = "server"
    aggregator: str = option("mean", "the server's aggregation rule",
                             choices=_names("aggregators"))
    clip_norm: float | None = option(None, "per-client L2 clip norm; automatic: no "
                                     "clipping", low=0.0, low_open=True, high=1e30,
                                     zero_is_auto=True)
    adaptive_clipping: bool = option(False, "clip_norm is the initial norm of "
                                     "quantile-tracking clipping (Andrew et al. 2021)")
    target_quantile: float | None = option(None, "adaptive clipping's target quantile; "
                                           "automatic: 0.5", low=0.0, high=1.0)
    clip_learning_rate: float | None = option(None, "adaptive clipping's geometric step; "
                                              "automatic: 0.2", low=0.0, high=1e3)
    norm_bound: float | None = option(None, "drop clients whose update norm exceeds this "
                                      "(norm-bound filter); automatic: none", low=0.0,
                                      low_open=True, high=1e30)
    noise_multiplier: float | None = option(None, "DP noise std / clip_norm; automatic: no "
                                            "noise", low=0.0, low_open=True, high=1e6,
                                            zero_is_auto=True)
    target_epsilon: float | None = option(None, "calibrate noise_multiplier to this epsilon "
                                          "over the run", low=0.0, low_open=True,
                                          high=1e6, zero_is_auto=True)
    delta: float | None = option(None, "DP delta; automatic: num_clients^-1.1", low=0.0,
                                 low_open=True, high=1.0, high_open=True, zero_is_auto=True)
    accountant: str = option("rdp", "privacy accountant", choices=("rdp", "pld"))
    ftrl_restart_rounds: int | None = option(None, "DP-FTRL tree size; automatic: one "
                                             "pass, num_clients // cohort_size", low=1,
                                             high=2**30 - 1, zero_is_auto=True)
    ftrl_efficient: bool = option(False, "DP-FTRL with Honaker's variance-reduced tree")
    num_byzantine: int | None = option(None, "f, the Byzantine clients a robust reducer "
                                       "assumes; automatic: 0", low=0, high=2**30,
                                       zero_is_auto=True)
    trim_fraction: float | None = option(None, "fraction trimmed from each side "
                                         "(trimmed_mean); automatic: 0.1", low=0.0,
                                         high=0.5, high_open=True)
    multi_krum_selected: int | None = option(None, "updates averaged by multi_krum; "
                                             "automatic: cohort - num_byzantine", low=1,
                                             high=2**30, zero_is_auto=True)
    centered_clipping_tau: float | None = option(None, "radius of centered_clipping; "
                                                 "automatic: 1", low=0.0, low_open=True,
                                                 high=1e30)
    quantize_bits: int | None = option(None, "stochastic quantisation of each update; "
                                       "automatic: none", low=1, high=16, zero_is_auto=True)
    top_k_fraction: float | None = option(None, "keep this fraction of each update's "
                                          "coordinates; automatic: all", low=0.0,
                                          low_open=True, high=1.0, zero_is_auto=True)


@dataclasses.dataclass(frozen=True)
class AttackConfig(_Section):
    SECTION = "attack"
    kind: str = option("none", "the poisoning attack", choices=_names("attacks"),
                       flag="attack")
    num_malicious: int | None = option(None, "adversarial clients (or malicious_fraction)",
                                       low=1, high=2**31 - 2, zero_is_auto=True)
    malicious_fraction: float | None = option(None, "adversarial share of the population",
                                              low=0.0, low_open=True, high=1.0,
                                              zero_is_auto=True)
    target_label: int | None = option(None, "the class triggered inputs should get "
                                      "(backdoors); automatic: 0", low=0, high=2**30)
    poison_fraction: float | None = option(None, "share of a backdoor client's examples "
                                           "triggered; automatic: 0.5", low=0.0,
                                           low_open=True, high=1.0)
    trigger_size: int | None = option(None, "square side (images) or leading features "
                                      "(tabular) of the trigger; automatic: 3", low=1,
                                      high=2**20)
    trigger_value: float | None = option(None, "the trigger's value; automatic: 1 for "
                                         "images, 3 for features", low=-1e6, high=1e6,
                                         zero_is_auto=True)
    boost: float | None = option(None, "model_replacement's scale; automatic: expected "
                                 "cohort / server_lr", low=0.0, low_open=True, high=1e12,
                                 zero_is_auto=True)
    attack_norm: float | None = option(None, "constrain_scale's norm; automatic: clip_norm",
                                       low=0.0, low_open=True, high=1e30, zero_is_auto=True)
    attack_strength: float | None = option(None, "sign_flip scale, gaussian std, ALIE z, "
                                           "IPM epsilon; automatic: 1, 1, Baruch's z, 0.5",
                                           low=0.0, low_open=True, high=1e12,
                                           zero_is_auto=True)


@dataclasses.dataclass(frozen=True)
class SecureConfig(_Section):
    SECTION = "secure"
    enabled: bool = option(False, "secure aggregation: the server sees only the sum of the "
                           "survivors' ring-encoded updates", flag="secure_aggregation")
    bits: int = option(20, "secure aggregation's ring Z_(2^bits)", low=1, high=32)
    neighbours: int | None = option(None, "masking neighbours per client (SecAgg+, even); "
                                    "automatic: every other client", low=2, high=2**20)
    threshold: int | None = option(None, "surviving neighbours a client's masks need; "
                                   "automatic: a majority of its neighbours", low=1,
                                   high=2**20)
    dropout: float = option(0.0, "probability that a client drops out after the key "
                            "exchange", low=0.0, high=1.0, high_open=True)
    mechanism: str = option("none", "distributed DP: each client adds a discrete noise "
                            "share (ddg: distributed discrete Gaussian, skellam)",
                            choices=lambda: _names("secure")())
    full_masking: bool = option(False, "generate and remove every pairwise and self mask "
                                "(the same sum, at the masks' cost)")
    k_stddevs: float = option(4.0, "standard deviations of the aggregate the ring holds",
                              low=0.0, low_open=True, high=1e3)
    beta: float | None = option(None, "conditional rounding's beta; automatic: exp(-1/2)",
                                low=0.0, high=1.0, high_open=True)


@dataclasses.dataclass(frozen=True)
class LeakageConfig(_Section):
    SECTION = "leakage"
    observe_rounds: tuple[int, ...] | None = option(
        None, "rounds (1-based) in which the honest-but-curious server attacks what it "
        "sees: each victim's upload, or behind secure aggregation only the sum; "
        "automatic: none")
    victims: int = option(4, "clients attacked per observed round", low=1, high=2**16)
    leak_attacks: str | None = option(None, "comma-separated subset of labels, "
                                      "closed_form, ig; automatic: every attack the model "
                                      "supports")
    inversion_steps: int = option(200, "optimisation steps of the inversion (ig)", low=1,
                                  high=10**6)
    inversion_restarts: int = option(1, "random restarts of the inversion (ig)", low=1,
                                     high=1024)
    tv_weight: float = option(1e-3, "total-variation weight of the inversion (images)",
                              low=0.0, high=1e6)
    imprint_rounds: tuple[int, ...] | None = option(
        None, "rounds (1-based) in which a malicious server sends an imprinted copy of "
        "the model, reads the cohort's examples off the aggregate (or secure sum) and "
        "discards the round; automatic: none")
    imprint_bins: int = option(64, "bins of the malicious server's imprint (units of the "
                               "first hidden layer)", low=2, high=2**20)
    malicious_client_round: int | None = option(
        None, "round (1-based) in which a malicious client, sampled for the first time, "
        "installs an imprint by model replacement and reads the next round's clients off "
        "two global models; automatic: none", low=1, high=10**8)
    malicious_bins: int = option(16, "bins of the malicious client's imprint", low=2,
                                 high=2**20)
    imprint_public: int = option(256, "held-out examples the active attackers set their "
                                 "bins from (their auxiliary data)", low=2, high=10**8)
    canaries: int = option(0, "canary clients for empirical privacy auditing (needs DP "
                           "noise; each is inserted with probability 1/2); 0: none",
                           low=0, high=10**6)
    canary_guesses: int | None = option(None, "guesses on each side of the one-run lower "
                                        "bound; automatic: canaries // 8", low=1,
                                        high=10**6)


@dataclasses.dataclass(frozen=True)
class EngineConfig(_Section):
    SECTION = "engine"
    chunk_size: int | None = option(None, "clients vectorised together; automatic: from "
                                    "the model size", low=1, high=2**20, zero_is_auto=True)
    num_devices: int | None = option(None, "devices the cohort is sharded over; automatic: "
                                     "every local device", low=1, high=2**16,
                                     zero_is_auto=True)
    lean_compile: bool = option(False, "compile the round for memory and compile time "
                                "(XLA:CPU's elemental emitters: 100-180 MiB lower peak, a "
                                "fifth less compile, steady rounds about as fast but the "
                                "two-device MLP's 6 percent slower; last bits may differ)")


@dataclasses.dataclass(frozen=True)
class OutputConfig(_Section):
    SECTION = "output"
    dir: str | None = option(None, "folder for metrics.jsonl, summary.json, checkpoints "
                             "and the final model; it must be new or empty unless "
                             "--resume or --overwrite (automatic: write nothing)",
                             flag="output")
    overwrite: bool = option(False, "replace the run an existing output folder holds")
    resume: bool = option(False, "continue the run in the output folder from its newest "
                          "checkpoint; the configuration must match the checkpoint's "
                          "(command line: --resume DIR)")
    checkpoint_every: int = option(0, "save a checkpoint every this many rounds (0: none)",
                                   low=0, high=10**8)
    max_empty_rounds: int = option(5, "fail the run after this many consecutive rounds "
                                   "that aggregate no client", low=1, high=10**8)
    eval_every: int = option(1, "evaluate every this many rounds", low=1, high=10**8)


SECTIONS: dict[str, type] = {c.SECTION: c for c in (
    DataConfig, ModelConfig, AlgorithmConfig, SamplingConfig, ServerConfig, SecureConfig,
    AttackConfig, LeakageConfig, EngineConfig, OutputConfig)}


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Every knob of a ``fedjax-sim run`` experiment, by section (module docstring).

    The defaults are the main job: FedAvg on a procedural label-skewed population of
    10,000 clients (Dirichlet(0.3) label mix per client), 1,000 clients per round.
    """

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    sampling: SamplingConfig = SamplingConfig()
    server: ServerConfig = ServerConfig()
    secure: SecureConfig = SecureConfig()
    attack: AttackConfig = AttackConfig()
    leakage: LeakageConfig = LeakageConfig()
    engine: EngineConfig = EngineConfig()
    output: OutputConfig = OutputConfig()
    seed: int = 0

    def __post_init__(self):
        for name, cls in SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                fail(name, getattr(self, name), f"must be a {cls.__name__}")
        SEED.coerce(self.seed)

    def to_dict(self) -> dict[str, Any]:
        """The configuration as JSON-ready nested tables (what TOML and summary.json hold)."""
        out: dict[str, Any] = {"seed": self.seed}
        for name in SECTIONS:
            out[name] = {k: (list(v) if isinstance(v, tuple) else v)
                         for k, v in dataclasses.asdict(getattr(self, name)).items()}
        return out


SEED = FieldSpec("", "seed", int, False, 0, {
    "help": "seed of the data, the model, sampling and noise", "choices": None, "low": 0,
    "high": 2**32 - 1, "low_open": False, "high_open": False, "flag": None,
    "zero_is_auto": False})

FIELDS: dict[str, FieldSpec] = {"seed": SEED}
for _name, _cls in SECTIONS.items():
    for _spec in section_fields(_cls, _name):
        if _spec.key in FIELDS:
            raise AssertionError(f"flat key {_spec.key!r} declared twice")
        FIELDS[_spec.key] = _spec
"""Every field by its flat key (and flag name)."""

_BY_SECTION = {(s.section, s.name): s for s in FIELDS.values()}


def _lookup(key: str) -> FieldSpec:
    """The field of a flat key or a dotted ``section.name`` path (one-line error if none)."""
    if key in FIELDS:
        return FIELDS[key]
    if "." in key:
        section, name = key.split(".", 1)
        if (section, name) in _BY_SECTION:
            return _BY_SECTION[(section, name)]
    candidates = list(FIELDS) + [f"{s}.{n}" for s, n in _BY_SECTION]
    close = difflib.get_close_matches(key.replace("-", "_"), candidates, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"unknown config key {key!r}{hint}")


def _set(values: dict[str, dict[str, Any]], spec: FieldSpec, value: Any, *,
         legacy: bool) -> None:
    if legacy and spec.meta["zero_is_auto"] and not isinstance(value, bool) and (
            value == 0 or value in ("0", "0.0")):
        value = None
    values.setdefault(spec.section, {})[spec.name] = spec.coerce(value)


def load_toml(path: str) -> dict[str, dict[str, Any]]:
    """Reads a TOML config file into ``{section: {field: value}}`` (module docstring)."""
    import os

    if os.path.isdir(path):
        fail("config", path, "is a directory, not a TOML file")
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except FileNotFoundError:
        fail("config", path, "no such file")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        fail("config", path, f"invalid TOML ({str(e).splitlines()[0]})")
    except OSError as e:
        fail("config", path, f"cannot be read ({e.strerror})")
    values: dict[str, dict[str, Any]] = {}
    for key, value in table.items():
        if not isinstance(value, Mapping):
            _set(values, _lookup(key), value, legacy=True)
            continue
        if key not in SECTIONS:
            where = {FIELDS[k].section for k in value if k in FIELDS}
            hint = (f"; its keys belong in [{'], ['.join(sorted(where))}]" if where else "")
            fail("config", f"[{key}]", f"is not a section (sections: "
                 f"{', '.join(SECTIONS)}){hint}")
        for name, item in value.items():
            if isinstance(item, Mapping):
                fail(f"{key}.{name}", "table", "sections do not nest")
            spec = _BY_SECTION.get((key, name)) or FIELDS.get(name)
            if spec is None:
                _lookup(f"{key}.{name}")
            if spec.section != key:
                fail(name, item, f"belongs in [{spec.section or 'top level'}], not [{key}]")
            _set(values, spec, item, legacy=name != spec.name)
    return values


def make_config(overrides: Mapping[str, Any] | None = None, *,
                base: Mapping[str, Mapping[str, Any]] | None = None,
                check: bool = True) -> ExperimentConfig:
    """The defaults, updated with ``base`` (sectioned, e.g. from :func:`load_toml`) and
    then ``overrides`` (flat keys or ``section.field`` paths, e.g. from flags).

    Unknown keys and bad values raise one-line ConfigErrors; with ``check`` the builders'
    cross-field rules run too (:func:`fedjax_sim.experiment.registry.check_config`).
    """
    values: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (base or {}).items()}
    for key, value in (overrides or {}).items():
        _set(values, _lookup(key), value, legacy=True)
    seed = values.pop("", {}).get("seed", 0)
    sections = {name: cls(**values.get(name, {})) for name, cls in SECTIONS.items()}
    cfg = ExperimentConfig(**sections, seed=seed)
    if check:
        check_config(cfg)
    return cfg


def check_config(cfg: ExperimentConfig) -> None:
    """Every family's rules for ``cfg`` (one-line ConfigErrors), in a fixed order: the
    "only applies with" rule derived from what each member uses, then the member's own
    cross-field checks (:mod:`fedjax_sim.experiment.registry`)."""
    for name in registry.CHECK_ORDER:
        registry.family(name).check(cfg, FIELDS)
    # The [leakage] rules read the server section's privacy plan, whose module imports
    # this one: imported on use, as the families' modules are (registry.family).
    importlib.import_module("fedjax_sim.experiment.leakage").check_leakage(cfg)
    importlib.import_module("fedjax_sim.experiment.malicious").check_malicious(cfg)
    check_output(cfg.output)


def load_config(path: str | None = None, overrides: Mapping[str, Any] | None = None
                ) -> ExperimentConfig:
    """A TOML file (optional) updated with flat ``overrides``, validated."""
    return make_config(overrides, base=load_toml(path) if path else None)


__all__ = ["AlgorithmConfig", "AttackConfig", "DataConfig", "EngineConfig",
           "ExperimentConfig", "FIELDS", "LeakageConfig", "ModelConfig", "OutputConfig",
           "SECTIONS",
           "SamplingConfig", "SecureConfig", "ServerConfig", "check_config", "load_config",
           "load_toml", "make_config"]
