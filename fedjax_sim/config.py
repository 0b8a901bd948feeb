"""Experiment configuration: one frozen dataclass, validated on the host.

A configuration comes from defaults, then an optional TOML file, then command-line
flags (each later source overrides the earlier). TOML files may be flat or grouped in
tables (``[data]``, ``[algorithm]``, ``[server]``, ...): table names are ignored, keys
must be field names of :class:`ExperimentConfig`; an unknown key is an error naming it.

Server aggregation and differential privacy (the ``[server]`` fields; the chain they
build is assembled by :mod:`fedjax_sim.server_config`):

* ``aggregator``: ``"mean"`` (default; FedAvg's weighted mean), ``"dp_fedavg"`` (McMahan
  et al. 2018: clip each client to ``clip_norm``, sum, add ``N(0, (z clip_norm)^2)``,
  divide by the *expected* cohort size), or a robust reducer: ``"median"``,
  ``"trimmed_mean"``, ``"krum"``, ``"multi_krum"``, ``"bulyan"``, ``"geometric_median"``,
  ``"centered_clipping"``.
* ``clip_norm`` (0 = off) clips every client's update before any aggregator;
  ``adaptive_clipping`` makes it the initial norm of quantile-tracking clipping (Andrew
  et al. 2021) with ``target_quantile`` and ``clip_learning_rate``.
* DP is on when ``aggregator="dp_fedavg"`` and ``noise_multiplier > 0`` or
  ``target_epsilon > 0`` (then z is calibrated for ``rounds`` rounds of the configured
  sampling at ``delta``). ``delta = 0`` means ``num_clients ** -1.1`` (strictly below
  1/N, as recommended by Ponomareva et al. 2023, "How to DP-fy ML"). ``accountant`` is
  ``"rdp"`` or ``"pld"`` (PLD needs Poisson sampling).
* ``aggregator="dp_ftrl"`` (Kairouz et al. 2021, "Practical and Private (Deep) Learning
  without Sampling or Shuffling"): clip each client to ``clip_norm``, sum, add online
  tree-aggregation noise (every tree node ``N(0, (z clip_norm)^2)``, see
  :mod:`fedjax_sim.server.dp_ftrl`), divide by ``cohort_size``. It needs
  ``sampling="cyclic"`` (round r trains the r-th block of ``cohort_size`` clients of one
  fixed permutation): the tree mechanism's guarantee assumes a data-independent
  schedule, and no amplification by sampling is claimed. The tree restarts every
  ``ftrl_restart_rounds`` rounds; 0 means one pass, ``floor(num_clients / cohort_size)``
  rounds. It is floor, not ceil: when ``cohort_size`` does not divide ``num_clients``
  the last block of a pass wraps around to the first clients, who would then be in one
  tree twice. The period may not exceed that pass, so a client contributes at most once
  per tree; a run longer than one pass composes its trees (accounted as at most one
  contribution per tree, replace-one-client-with-zero adjacency, RDP). It takes
  ``noise_multiplier`` or ``target_epsilon`` (calibrated for ``rounds``), RDP only, and
  no adaptive clipping (its noised count of unclipped clients is not a tree query, so
  it would not be accounted). Server optimiser: ``fedavg``, ``fedsgd`` and ``fedprox``
  step with plain SGD (no momentum), which makes the run DP-FTRL proper: the model is
  ``theta_0 + server_lr * (noisy prefix sum) / cohort_size``. Any other server optimiser
  (``fedavgm``'s momentum, ``fedadam``, ...) only post-processes the released noisy sums,
  so the guarantee holds, but the server step is no longer FTRL. It is allowed, and the
  run prints a note. ``ftrl_efficient=true`` uses Honaker's variance-reduced estimate of
  the tree nodes (the "efficient" tree of Kairouz et al. Sec. 4): less noise in every
  released sum, the same node noise and the same privacy accounting.

Decided on purpose (each is a one-line ConfigError naming the field and value): DP noise
only with ``dp_fedavg`` (robust reducers are not sums, so the Gaussian mechanism's
sensitivity analysis does not cover them); DP-FedAvg weights every client 1 (the
default ``weighting="auto"`` resolves to ``"uniform"`` there; explicit ``"examples"`` is
an error, since example weights would scale the sensitivity by the largest client).
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
SAMPLINGS = ("fixed", "poisson", "cyclic")
WEIGHTINGS = ("auto", "examples", "uniform")
AGGREGATORS = ("mean", "dp_fedavg", "dp_ftrl", "median", "trimmed_mean", "krum",
               "multi_krum", "bulyan", "geometric_median", "centered_clipping")
DP_AGGREGATORS = ("dp_fedavg", "dp_ftrl")  # clip, sum, noise: the aggregators DP can use
# Server optimisers that are plain SGD without momentum (DP-FTRL proper with dp_ftrl).
PLAIN_SGD_ALGORITHMS = ("fedavg", "fedsgd", "fedprox")
ACCOUNTANTS = ("rdp", "pld")
ATTACKS = ("none", "label_flip", "backdoor", "model_replacement", "constrain_scale",
           "sign_flip", "gaussian", "alie", "ipm")
BACKDOOR_ATTACKS = ("backdoor", "model_replacement", "constrain_scale")
# Byzantine-tolerant reducers that take ``num_byzantine`` and their cohort requirement
# ``cohort >= factor * f + 3`` (Blanchard et al. 2017; El Mhamdi et al. 2018).
BYZANTINE_FACTOR = {"krum": 2, "multi_krum": 2, "bulyan": 4}


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
    weighting: str = "auto"  # auto: "uniform" for dp_fedavg, else "examples"
    # Sampling and rounds.
    sampling: str = "fixed"
    cohort_size: int = 1000
    sampling_rate: float = 0.1
    rounds: int = 60
    eval_every: int = 1
    # Server aggregation, clipping, compression and differential privacy.
    aggregator: str = "mean"
    clip_norm: float = 0.0  # 0: no clipping (dp_fedavg needs > 0)
    adaptive_clipping: bool = False  # clip_norm is then the initial clip norm
    target_quantile: float = 0.5  # adaptive clipping's target quantile of update norms
    clip_learning_rate: float = 0.2  # adaptive clipping's geometric step
    noise_multiplier: float = 0.0  # 0: no noise; noise std / clip_norm (dp_fedavg)
    target_epsilon: float = 0.0  # 0: off; else calibrate noise_multiplier for `rounds`
    delta: float = 0.0  # 0: num_clients ** -1.1
    accountant: str = "rdp"
    ftrl_restart_rounds: int = 0  # dp_ftrl tree size; 0: one pass, num_clients // cohort_size
    ftrl_efficient: bool = False  # dp_ftrl: Honaker's variance-reduced tree estimator
    num_byzantine: int = 0  # f assumed by krum, multi_krum, bulyan
    trim_fraction: float = 0.1  # trimmed_mean: fraction cut from each side
    multi_krum_selected: int = 0  # multi_krum: 0 means cohort - num_byzantine
    centered_clipping_tau: float = 1.0  # centered_clipping radius
    quantize_bits: int = 0  # 0: off; stochastic uniform quantisation of each update
    top_k_fraction: float = 0.0  # 0: off; keep this fraction of coordinates per update
    # Poisoning (fedjax_sim.poisoning; see its experiment module for what each means).
    attack: str = "none"
    num_malicious: int = 0  # give this or malicious_fraction when attack != "none"
    malicious_fraction: float = 0.0
    target_label: int = 0  # backdoor attacks: the class triggered inputs should get
    poison_fraction: float = 0.5  # backdoor attacks: share of examples triggered
    trigger_size: int = 3  # square side (images) or number of leading features (tabular)
    trigger_value: float = 0.0  # 0: 1.0 for images, 3.0 for tabular features
    boost: float = 0.0  # model_replacement: 0 means expected_cohort / server_lr
    attack_norm: float = 0.0  # constrain_scale: 0 means clip_norm
    attack_strength: float = 0.0  # sign_flip scale, gaussian std, alie z, ipm epsilon (0: default)
    # Engine.
    chunk_size: int = 0  # 0: chosen from the model size (cohort.default_chunk_size)
    num_devices: int = 0  # 0: every local device (the CLI makes one CPU device per core)
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
        check_choice("weighting", self.weighting, WEIGHTINGS)
        check_choice("sampling", self.sampling, SAMPLINGS)
        check_int("cohort_size", self.cohort_size, min_value=1)
        if self.sampling in ("fixed", "cyclic") and self.cohort_size > self.num_clients:
            fail("cohort_size", self.cohort_size,
                 f"exceeds num_clients={self.num_clients}")
        check_float("sampling_rate", self.sampling_rate, min_value=0.0, max_value=1.0,
                    min_exclusive=True)
        check_int("rounds", self.rounds, min_value=1)
        check_int("eval_every", self.eval_every, min_value=1)
        check_int("chunk_size", self.chunk_size, min_value=0)
        check_int("num_devices", self.num_devices, min_value=0)
        check_int("seed", self.seed, min_value=0, max_value=2**32 - 1)
        self._check_server()
        self._check_attack()

    @property
    def dp(self) -> bool:
        """True when the run adds DP noise (and is then accounted)."""
        return self.aggregator in DP_AGGREGATORS and (self.noise_multiplier > 0
                                                      or self.target_epsilon > 0)

    @property
    def client_weighting(self) -> str:
        """``weighting`` with ``"auto"`` resolved (uniform for dp_fedavg and dp_ftrl)."""
        if self.weighting != "auto":
            return self.weighting
        return "uniform" if self.aggregator in DP_AGGREGATORS else "examples"

    @property
    def expected_cohort(self) -> float:
        """Expected clients per round: cohort_size, or sampling_rate * num_clients."""
        if self.sampling in ("fixed", "cyclic"):
            return float(self.cohort_size)
        return self.sampling_rate * self.num_clients

    @property
    def ftrl_pass_rounds(self) -> int:
        """``num_clients // cohort_size``: the most consecutive rounds in which the cyclic
        schedule trains no client twice (see the module docstring)."""
        return self.num_clients // self.cohort_size

    @property
    def ftrl_max_rounds(self) -> int:
        """The dp_ftrl tree size: ``ftrl_restart_rounds``, or one pass when it is 0."""
        return self.ftrl_restart_rounds or self.ftrl_pass_rounds

    def _only_with(self, name: str, applies: bool, where: str) -> None:
        value, default = getattr(self, name), FIELDS[name].default
        if value != default and not applies:
            fail(name, value, f"only applies with {where}")

    def _check_server(self) -> None:
        """Host-side checks of the server/DP fields (see the module docstring)."""
        agg = check_choice("aggregator", self.aggregator, AGGREGATORS)
        check_float("clip_norm", self.clip_norm, min_value=0.0)
        if not isinstance(self.adaptive_clipping, bool):
            fail("adaptive_clipping", self.adaptive_clipping, "must be true or false")
        check_float("target_quantile", self.target_quantile, min_value=0.0, max_value=1.0)
        check_float("clip_learning_rate", self.clip_learning_rate, min_value=0.0)
        z = check_float("noise_multiplier", self.noise_multiplier, min_value=0.0)
        eps = check_float("target_epsilon", self.target_epsilon, min_value=0.0)
        delta = check_float("delta", self.delta, min_value=0.0, max_value=1.0,
                            max_exclusive=True)
        check_choice("accountant", self.accountant, ACCOUNTANTS)
        f = check_int("num_byzantine", self.num_byzantine, min_value=0)
        check_float("trim_fraction", self.trim_fraction, min_value=0.0, max_value=0.5,
                    max_exclusive=True)
        check_int("multi_krum_selected", self.multi_krum_selected, min_value=0)
        check_float("centered_clipping_tau", self.centered_clipping_tau, min_value=0.0,
                    min_exclusive=True)
        check_int("quantize_bits", self.quantize_bits, min_value=0, max_value=16)
        check_float("top_k_fraction", self.top_k_fraction, min_value=0.0, max_value=1.0)
        if self.quantize_bits and self.top_k_fraction:
            fail("top_k_fraction", self.top_k_fraction,
                 f"pick one compressor: quantize_bits={self.quantize_bits} is also set")

        noisy_field = "noise_multiplier" if z > 0 else "target_epsilon"
        noisy_value = z if z > 0 else eps
        if z > 0 and eps > 0:
            fail("target_epsilon", eps, f"give noise_multiplier or target_epsilon, not both "
                 f"(noise_multiplier={z!r})")
        if noisy_value > 0 and self.clip_norm == 0:
            fail(noisy_field, noisy_value, "Gaussian noise needs a bound on each client's "
                 "update: set clip_norm > 0 (the noise std is noise_multiplier * clip_norm)")
        if noisy_value > 0 and agg not in DP_AGGREGATORS:
            fail(noisy_field, noisy_value,
                 f"DP noise needs aggregator='dp_fedavg' or 'dp_ftrl' (clip, sum, noise), "
                 f"got aggregator={agg!r}; robust reducers are not sums, so the Gaussian "
                 "mechanism's sensitivity analysis does not cover them")
        if agg == "dp_fedavg":
            if self.clip_norm == 0:
                fail("clip_norm", self.clip_norm,
                     "aggregator='dp_fedavg' needs clip_norm > 0 (the sum's sensitivity)")
            if self.weighting == "examples":
                fail("weighting", self.weighting,
                     "DP-FedAvg weights every client 1 so the sum's sensitivity is "
                     "clip_norm (McMahan et al. 2018); use weighting='uniform' or 'auto'")
            if self.dp and self.sampling == "cyclic":
                fail("sampling", self.sampling,
                     "DP-FedAvg's accounting relies on random (fixed-size or Poisson) "
                     "sampling; a cyclic schedule has no sampling to amplify privacy "
                     "(use aggregator='dp_ftrl' for cyclic participation)")
        self._check_dp_ftrl()
        if self.adaptive_clipping:
            if agg == "dp_ftrl":
                fail("adaptive_clipping", True,
                     "not with aggregator='dp_ftrl': adaptive clipping's noised count of "
                     "unclipped clients is not a tree query, so the tree accounting would "
                     "not cover it; use a fixed clip_norm")
            if self.clip_norm == 0:
                fail("adaptive_clipping", True, "needs clip_norm > 0 (the initial clip norm)")
            if agg == "dp_fedavg" and not self.dp:
                fail("adaptive_clipping", True,
                     "with aggregator='dp_fedavg' and no noise the private quantile "
                     "estimate protects nothing; set noise_multiplier or target_epsilon, "
                     "or use aggregator='mean' for non-private adaptive clipping")
            if self.dp and z > 0 and z >= self.expected_cohort / 10:
                fail("noise_multiplier", z,
                     f"adaptive clipping spends noise std expected_cohort/20 = "
                     f"{self.expected_cohort / 20:g} on the clipped count, which caps "
                     f"noise_multiplier below {self.expected_cohort / 10:g}; use a larger "
                     "cohort or adaptive_clipping=false")
        self._only_with("target_quantile", self.adaptive_clipping, "adaptive_clipping=true")
        self._only_with("clip_learning_rate", self.adaptive_clipping,
                        "adaptive_clipping=true")
        if self.dp and self.accountant == "pld" and self.sampling == "fixed":
            fail("accountant", self.accountant,
                 "dp-accounting's PLD accountant does not support fixed-size sampling "
                 "(replace-one, without replacement); use sampling='poisson' or "
                 "accountant='rdp'")
        if self.dp and delta > 0 and delta >= 1.0 / self.num_clients:
            fail("delta", delta, f"must be < 1/num_clients = {1.0 / self.num_clients:g} "
                 "(a delta of 1/N allows releasing one client's data in the clear)")
        self._only_with("trim_fraction", agg == "trimmed_mean", "aggregator='trimmed_mean'")
        self._only_with("num_byzantine", agg in BYZANTINE_FACTOR,
                        "aggregator in krum, multi_krum, bulyan")
        self._only_with("multi_krum_selected", agg == "multi_krum",
                        "aggregator='multi_krum'")
        self._only_with("centered_clipping_tau", agg == "centered_clipping",
                        "aggregator='centered_clipping'")
        if agg in BYZANTINE_FACTOR:
            need = BYZANTINE_FACTOR[agg] * f + 3
            cohort = self.expected_cohort
            if cohort < need:
                fail("num_byzantine", f,
                     f"{agg} needs cohort >= {BYZANTINE_FACTOR[agg]}*num_byzantine+3 = "
                     f"{need}, got {'expected ' if self.sampling == 'poisson' else ''}"
                     f"cohort {cohort:g}")
            if agg == "multi_krum" and self.multi_krum_selected > cohort:
                fail("multi_krum_selected", self.multi_krum_selected,
                     f"exceeds the {'expected ' if self.sampling == 'poisson' else ''}"
                     f"cohort {cohort:g}")

    def _check_dp_ftrl(self) -> None:
        """Host-side checks of ``aggregator="dp_ftrl"`` (see the module docstring)."""
        agg = self.aggregator
        restart = check_int("ftrl_restart_rounds", self.ftrl_restart_rounds, min_value=0)
        self._only_with("ftrl_restart_rounds", agg == "dp_ftrl", "aggregator='dp_ftrl'")
        if not isinstance(self.ftrl_efficient, bool):
            fail("ftrl_efficient", self.ftrl_efficient, "must be true or false")
        self._only_with("ftrl_efficient", agg == "dp_ftrl", "aggregator='dp_ftrl'")
        if agg != "dp_ftrl":
            return
        if self.sampling != "cyclic":
            fail("sampling", self.sampling,
                 "aggregator='dp_ftrl' needs sampling='cyclic': the tree mechanism's "
                 "guarantee assumes a data-independent participation schedule, and "
                 "amplification by sampling is not claimed")
        if self.clip_norm == 0:
            fail("clip_norm", self.clip_norm,
                 "aggregator='dp_ftrl' needs clip_norm > 0 (each client's bound in the sum)")
        if not self.dp:
            fail("noise_multiplier", self.noise_multiplier,
                 "aggregator='dp_ftrl' needs noise_multiplier > 0 (tree-node noise std / "
                 "clip_norm) or target_epsilon > 0")
        if self.weighting == "examples":
            fail("weighting", self.weighting,
                 "DP-FTRL weights every client 1 so the sum's sensitivity is clip_norm; "
                 "use weighting='uniform' or 'auto'")
        if self.accountant != "rdp":
            fail("accountant", self.accountant,
                 "DP-FTRL is accounted with RDP (dp-accounting's tree-aggregation event); "
                 "use accountant='rdp'")
        per_pass = self.ftrl_pass_rounds
        if restart > per_pass:
            fail("ftrl_restart_rounds", restart,
                 f"exceeds one pass over the population, num_clients // cohort_size = "
                 f"{per_pass} rounds: a client would contribute twice to one tree, which "
                 "the tree accounting does not cover")
        if self.ftrl_max_rounds >= 2 ** 30:
            fail("ftrl_restart_rounds", restart,
                 f"a tree of {self.ftrl_max_rounds} rounds is too large (< 2**30); set a "
                 "smaller restart period")

    def _check_attack(self) -> None:
        """Host-side checks of the poisoning fields (one-line errors)."""
        attack = check_choice("attack", self.attack, ATTACKS)
        m = check_int("num_malicious", self.num_malicious, min_value=0,
                      max_value=self.num_clients)
        frac = check_float("malicious_fraction", self.malicious_fraction, min_value=0.0,
                           max_value=1.0)
        check_int("target_label", self.target_label, min_value=0)
        check_float("poison_fraction", self.poison_fraction, min_value=0.0, max_value=1.0,
                    min_exclusive=True)
        check_int("trigger_size", self.trigger_size, min_value=1)
        check_float("trigger_value", self.trigger_value)
        check_float("boost", self.boost, min_value=0.0)
        check_float("attack_norm", self.attack_norm, min_value=0.0)
        check_float("attack_strength", self.attack_strength, min_value=0.0)
        on = attack != "none"
        self._only_with("num_malicious", on, "an attack (attack != 'none')")
        self._only_with("malicious_fraction", on, "an attack (attack != 'none')")
        backdoor = attack in BACKDOOR_ATTACKS
        for name in ("target_label", "poison_fraction", "trigger_size", "trigger_value"):
            self._only_with(name, backdoor, "attack in " + ", ".join(BACKDOOR_ATTACKS))
        self._only_with("boost", attack == "model_replacement", "attack='model_replacement'")
        self._only_with("attack_norm", attack == "constrain_scale",
                        "attack='constrain_scale'")
        self._only_with("attack_strength", attack in ("sign_flip", "gaussian", "alie", "ipm"),
                        "attack in sign_flip, gaussian, alie, ipm")
        if on and (m > 0) == (frac > 0):
            fail("num_malicious", m, f"attack={attack!r} needs exactly one of "
                 f"num_malicious > 0 and malicious_fraction > 0 (got malicious_fraction="
                 f"{frac!r})")
        if on and frac > 0 and round(frac * self.num_clients) < 1:
            fail("malicious_fraction", frac, f"makes no client of num_clients="
                 f"{self.num_clients} malicious")
        if attack in ("alie", "ipm") and (m >= self.num_clients or frac == 1.0):
            fail("attack", attack, "an omniscient attack imitates honest clients; leave at "
                 "least one client honest")
        if attack == "constrain_scale" and self.attack_norm == 0 and self.clip_norm == 0:
            fail("attack_norm", self.attack_norm, "constrain_scale needs a norm to scale to: "
                 "set attack_norm > 0 (or clip_norm > 0 to use the server's bound)")

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
