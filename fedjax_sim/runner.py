"""The experiment runner: configuration in, metrics.jsonl and summary.json out.

Host-side only: it builds the data, model, algorithm and sampler from an
:class:`~fedjax_sim.config.ExperimentConfig`, compiles the round once (ahead of time,
so compile time is reported apart from steady-state time), runs it, evaluates, logs one
JSON object per round, and shows a progress bar. Nothing here runs inside the round.

Privacy. The server chain, sampler and noise multiplier come from
:func:`fedjax_sim.server_config.build_server`. When the run adds DP noise
(``cfg.dp``), the accountant is built from what runs --
``privacy_spec_from_transform_infos`` of the round's own transform chain and the
sampler's ``privacy_sampling`` -- records one round per round, and every
``metrics.jsonl`` row, the progress bar (``eps=``) and ``summary.json`` carry the
client-level ``epsilon`` at ``delta``. A DP-FTRL run (``aggregator="dp_ftrl"``) is
accounted by a :class:`~fedjax_sim.privacy.accounting.DPFTRLAccountant` whose noise
multiplier and tree size are read from the chain's tree transform and whose pass length
comes from the cyclic sampler; its summary states the assumptions (at most one
contribution per tree, a fixed cyclic order, replace-one-client-with-zero adjacency).
A run without noise has no formal DP guarantee:
its epsilon is infinite, written as JSON ``null`` (``inf`` on the progress bar), and a
one-line note says so. Rows and the summary also carry ``delta``, ``noise_multiplier``
and ``accountant``. When clipping runs, rows carry ``clip_norm`` (used that round),
``clipped_fraction`` and ``mean_update_norm`` (before clipping); like the training loss
these are simulation diagnostics from raw client data, not covered by epsilon.

Poisoning. Every row carries ``honest_cosine`` / ``honest_inner_product`` (the aggregate
against the weighted mean of the honest clients' raw updates, computed inside the round);
with an attack, also ``num_malicious`` (adversarial clients sampled), the groups' mean
update norms and, for backdoors, ``backdoor_success`` at every evaluation. These are
diagnostics an honest simulator knows, not something a real server could compute.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from fedjax_sim._validation import ConfigError, fail
from fedjax_sim.algorithms import make_algorithm
from fedjax_sim.cohort import client_mesh
from fedjax_sim.config import ExperimentConfig
from fedjax_sim.data.federated import ClientData, FederatedData
from fedjax_sim.evaluation import evaluate_clients, make_central_evaluator
from fedjax_sim.models import make_model
from fedjax_sim.privacy import Accountant
from fedjax_sim.privacy.accounting import DPFTRLAccountant
from fedjax_sim.rounds import make_round
from fedjax_sim.client_update import make_client_update
from fedjax_sim.server.base import chain
from fedjax_sim.server_config import (accountant_for, build_server, clip_diagnostics,
                                      server_key)


class TrainingDiverged(RuntimeError):
    """The global model became non-finite."""


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


def _federated_as_clients(data: FederatedData) -> ClientData:
    return data.cohort_data(jnp.arange(data.num_clients, dtype=jnp.int32))


def _procedural_test(pop: Any, cfg: ExperimentConfig) -> ClientData:
    """Held-out examples of ``eval_clients`` population clients chosen by the seed."""
    n_eval = min(cfg.eval_clients, cfg.num_clients)
    rng = np.random.default_rng(cfg.seed + 1)
    eval_ids = np.sort(rng.choice(cfg.num_clients, n_eval, replace=False))
    return jax.jit(pop.test_data)(jnp.asarray(eval_ids, jnp.int32))


# The config fields build_data reads; generated populations are cached on them (a small
# LRU), so sweeps over server/DP settings (notebooks, tests) build their data once.
_DATA_FIELDS = ("data", "num_clients", "synthetic_alpha", "synthetic_beta", "synthetic_iid",
                "max_examples", "min_examples", "synthetic_size_mean", "synthetic_size_sigma",
                "partition", "dirichlet_alpha", "class_separation", "shards_per_client",
                "data_path", "test_path", "eval_clients", "seed")
_DATA_CACHE: "collections.OrderedDict[tuple, ExperimentData]" = collections.OrderedDict()
_DATA_CACHE_SIZE = 2


def build_data(cfg: ExperimentConfig) -> ExperimentData:
    """Builds the population and test data that ``cfg`` describes (host side, once).

    Generated data (everything but ``npz``/``leaf`` files, which may change on disk) is
    deterministic in the fields of ``_DATA_FIELDS`` and cached on them: the last two
    distinct data configurations are reused, not rebuilt. The result is immutable.
    """
    if cfg.data in ("npz", "leaf"):
        return _build_data(cfg)
    key = tuple(getattr(cfg, f) for f in _DATA_FIELDS)
    if key in _DATA_CACHE:
        _DATA_CACHE.move_to_end(key)
        return _DATA_CACHE[key]
    data = _build_data(cfg)
    _DATA_CACHE[key] = data
    while len(_DATA_CACHE) > _DATA_CACHE_SIZE:
        _DATA_CACHE.popitem(last=False)
    return data


def _build_data(cfg: ExperimentConfig) -> ExperimentData:
    if cfg.data == "label_skew":
        from fedjax_sim.data.label_skew import procedural_label_skew

        pop = procedural_label_skew(
            cfg.num_clients, alpha=cfg.dirichlet_alpha, seed=cfg.seed,
            max_examples=cfg.max_examples, min_examples=cfg.min_examples,
            size_mean=cfg.synthetic_size_mean, size_sigma=cfg.synthetic_size_sigma,
            separation=cfg.class_separation)
        return ExperimentData(pop, pop.num_classes, pop.example_shape,
                              test_clients=_procedural_test(pop, cfg),
                              reference_accuracy=pop.bayes_accuracy(seed=cfg.seed))
    if cfg.data == "synthetic":
        from fedjax_sim.data.procedural import procedural_synthetic

        pop = procedural_synthetic(
            cfg.num_clients, alpha=cfg.synthetic_alpha, beta=cfg.synthetic_beta,
            iid=cfg.synthetic_iid, seed=cfg.seed, max_examples=cfg.max_examples,
            min_examples=min(cfg.min_examples, cfg.max_examples),
            size_mean=cfg.synthetic_size_mean, size_sigma=cfg.synthetic_size_sigma)
        return ExperimentData(pop, pop.num_classes, pop.example_shape,
                              test_clients=_procedural_test(pop, cfg))
    if cfg.data == "synthetic_materialized":
        from fedjax_sim.data.synthetic import synthetic_fedprox

        split = synthetic_fedprox(
            cfg.num_clients, alpha=cfg.synthetic_alpha, beta=cfg.synthetic_beta,
            iid=cfg.synthetic_iid, seed=cfg.seed, max_examples=cfg.max_examples,
            min_examples=min(max(cfg.min_examples, 2), cfg.max_examples),
            size_mean=cfg.synthetic_size_mean, size_sigma=cfg.synthetic_size_sigma)
        return ExperimentData(split.train, split.train.num_classes,
                              split.train.example_shape,
                              test_clients=_federated_as_clients(split.test))
    if cfg.data == "digits":
        from fedjax_sim.data.digits import digits_federated

        split = digits_federated(cfg.num_clients, partition=cfg.partition,
                                 alpha=cfg.dirichlet_alpha,
                                 shards_per_client=cfg.shards_per_client, seed=cfg.seed)
        return ExperimentData(split.train, split.train.num_classes,
                              split.train.example_shape,
                              test_central=(split.test_x, split.test_y))
    from fedjax_sim.data import io

    loader = io.load_npz if cfg.data == "npz" else io.load_leaf
    train = loader(cfg.data_path).data
    if train.num_clients != cfg.num_clients:
        fail("num_clients", cfg.num_clients,
             f"does not match the {train.num_clients} clients in data_path={cfg.data_path!r}")
    if cfg.test_path:
        test = loader(cfg.test_path).data
        if test.num_clients != train.num_clients:
            fail("test_path", cfg.test_path,
                 f"holds {test.num_clients} clients, training data {train.num_clients}")
        test_clients = _federated_as_clients(test)
    else:
        test_clients = _federated_as_clients(train)
    return ExperimentData(train, train.num_classes, train.example_shape,
                          test_clients=test_clients)


def _mesh(cfg: ExperimentConfig):
    """The ``clients`` mesh over ``num_devices`` local devices (0: all); None for one."""
    devices = jax.devices()
    if cfg.num_devices > len(devices):
        fail("num_devices", cfg.num_devices, f"only {len(devices)} devices are available")
    devices = devices if cfg.num_devices == 0 else devices[:cfg.num_devices]
    return None if len(devices) == 1 else client_mesh(devices)


class _JsonlWriter:
    def __init__(self, output_dir: str | None):
        self._f = None
        if output_dir:
            os.makedirs(output_dir, exist_ok=True)
            self._f = open(os.path.join(output_dir, "metrics.jsonl"), "w")

    def write(self, row: dict[str, Any]) -> None:
        if self._f:
            self._f.write(json.dumps(row) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f:
            self._f.close()


def run_experiment(cfg: ExperimentConfig, *, output_dir: str | None = None,
                   progress: bool = True,
                   on_round: Callable[[dict[str, Any]], None] | None = None
                   ) -> dict[str, Any]:
    """Runs the experiment ``cfg`` and returns its summary.

    Args:
      cfg: the validated configuration.
      output_dir: if set, ``metrics.jsonl`` (one object per round) and ``summary.json``
        are written there.
      progress: show a tqdm progress bar on stderr.
      on_round: optional callback receiving each round's metrics row.

    Returns:
      The summary (also written to ``summary.json``): final metrics, timings, config.

    Raises:
      ConfigError: for inconsistent settings discovered while building the data.
      TrainingDiverged: if the global params become non-finite.
    """
    t_start = time.perf_counter()
    data = build_data(cfg)
    pop = data.population
    model = make_model(cfg.model, data.example_shape, data.num_classes, hidden=cfg.hidden)
    base_key = jax.random.key(cfg.seed)
    plan = build_server(cfg, key=server_key(base_key), num_clients=pop.num_clients)
    algorithm = make_algorithm(
        cfg.algorithm, client_lr=cfg.client_lr, local_epochs=cfg.local_epochs,
        batch_size=cfg.batch_size, server_lr=cfg.server_lr or None,
        server_momentum=cfg.server_momentum, beta1=cfg.beta1, beta2=cfg.beta2,
        adaptivity=cfg.adaptivity, client_momentum=cfg.client_momentum,
        prox_mu=(cfg.prox_mu or None) if cfg.algorithm == "fedprox" else None,
        weighting=plan.weighting, server_transform=plan.transform)
    sampler = plan.sampler
    poison = _build_poisoning(cfg, model, algorithm, data)
    if poison.server_stage is not None:  # Colluding omniscient stage: first in the chain.
        algorithm = dataclasses.replace(algorithm, server_transform=chain(
            poison.server_stage, algorithm.server_transform))
    accountant = None
    if plan.dp:  # The ledger reads the chain that runs, not the config's numbers.
        accountant = accountant_for(algorithm.server_transform, sampler,
                                    accountant=cfg.accountant, delta=plan.delta)
        if not np.isclose(accountant.noise_multiplier, plan.noise_multiplier, rtol=1e-6):
            raise AssertionError(
                f"the chain reports noise_multiplier={accountant.noise_multiplier}, "
                f"the config asked for {plan.noise_multiplier}")
        if getattr(accountant, "max_rounds", 0) != plan.ftrl_max_rounds:
            raise AssertionError(
                f"the chain's DP-FTRL tree has max_rounds="
                f"{getattr(accountant, 'max_rounds', None)}, the config asked for "
                f"{plan.ftrl_max_rounds}")
    for note in plan.notes:
        print(note, file=sys.stderr)
    fed_round = make_round(model, algorithm, sampler, max_examples=pop.max_examples,
                           chunk_size=cfg.chunk_size or None, mesh=_mesh(cfg),
                           client_update=poison.client_update,
                           is_malicious=poison.is_malicious)
    init_key, rounds_key = jax.random.split(base_key)
    state = fed_round.init(init_key)

    t0 = time.perf_counter()
    step = fed_round.step.lower(state, pop, jax.random.fold_in(rounds_key, 0)).compile()
    compile_seconds = time.perf_counter() - t0

    if data.test_central is not None:
        central = make_central_evaluator(model)

        def evaluate(params):
            m = central(params, *data.test_central)
            return {"test_loss": m["loss"], "test_accuracy": m["accuracy"]}
    else:
        def evaluate(params):
            m = evaluate_clients(model, params, data.test_clients,
                                 chunk_size=fed_round.chunk_size)
            return {"test_loss": m["loss_example_weighted"],
                    "test_accuracy": m["accuracy_example_weighted"],
                    "test_accuracy_client_averaged": m["accuracy_client_averaged"]}

    if poison.trigger is not None:  # Backdoor success on the pooled clean test set.
        evaluate = _with_backdoor_success(evaluate, model, data, poison)

    writer = _JsonlWriter(output_dir)
    desc = cfg.algorithm if cfg.aggregator == "mean" else f"{cfg.algorithm}+{cfg.aggregator}"
    bar = tqdm(total=cfg.rounds, desc=desc, disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    round_seconds, updates, last_eval, row = [], 0, {}, {}
    try:
        for r in range(cfg.rounds):
            t0 = time.perf_counter()
            state, out = step(state, pop, jax.random.fold_in(rounds_key, r))
            metrics = jax.device_get(out.metrics)
            seconds = time.perf_counter() - t0
            round_seconds.append(seconds)
            updates += int(metrics["num_clients"])
            if not bool(jax.device_get(_params_finite(state.params))):
                raise TrainingDiverged(
                    f"round {r + 1}: the global params are not finite "
                    f"(lower client_lr={cfg.client_lr} or server_lr)")
            if int(metrics["num_nonfinite"]):
                tqdm.write(f"round {r + 1}: dropped {int(metrics['num_nonfinite'])} "
                           "non-finite client updates (not aggregated)", file=sys.stderr)
            if int(metrics["overflow"]):
                tqdm.write(f"round {r + 1}: Poisson draw exceeded the cohort capacity; "
                           f"{int(metrics['overflow'])} clients dropped", file=sys.stderr)
            evaluated = (r + 1) % cfg.eval_every == 0 or r + 1 == cfg.rounds
            if evaluated:
                last_eval = evaluate(state.params)
            row = {"round": r + 1,
                   "train_loss": float(metrics["train_loss"]),
                   "train_accuracy": float(metrics["train_accuracy"]),
                   "test_loss": last_eval.get("test_loss") if evaluated else None,
                   "test_accuracy": last_eval.get("test_accuracy") if evaluated else None,
                   "num_clients": int(metrics["num_clients"]),
                   "num_aggregated": int(metrics["num_aggregated"]),
                   "num_nonfinite": int(metrics["num_nonfinite"]),
                   "num_examples": int(metrics["num_examples"]),
                   "update_norm": float(metrics["update_norm"]),
                   "honest_cosine": float(metrics["honest_cosine"]),
                   "honest_inner_product": float(metrics["honest_inner_product"]),
                   "seconds": seconds,
                   "client_updates_per_s": int(metrics["num_clients"]) / max(seconds, 1e-9)}
            if cfg.attack != "none":
                row.update({k: metrics[k].item() for k in (
                    "num_malicious", "honest_update_norm", "malicious_update_norm")})
            if poison.trigger is not None:
                row["backdoor_success"] = last_eval["backdoor_success"] if evaluated else None
            if evaluated and "test_accuracy_client_averaged" in last_eval:
                row["test_accuracy_client_averaged"] = last_eval[
                    "test_accuracy_client_averaged"]
            if accountant is not None:
                accountant.record_round()
            row.update(_privacy_fields(accountant, plan, cfg))
            if plan.clipping:
                row.update(_clip_fields(state.transform_state))
            writer.write(row)
            if on_round:
                on_round(row)
            eps = "inf" if row["epsilon"] is None else f"{row['epsilon']:.3g}"
            bar.set_postfix(loss=f"{row['train_loss']:.3f}",
                            acc=f"{last_eval.get('test_accuracy', float('nan')):.3f}",
                            eps=eps, upd_s=f"{row['client_updates_per_s']:.0f}")
            bar.update(1)
    finally:
        bar.close()
        writer.close()

    steady = round_seconds[1:] or round_seconds
    summary = {
        "final": {k: row[k] for k in ("round", "train_loss", "test_loss", "test_accuracy")},
        "test_accuracy": last_eval.get("test_accuracy"),
        "test_accuracy_client_averaged": last_eval.get("test_accuracy_client_averaged"),
        "bayes_accuracy": data.reference_accuracy,
        **({"attack": cfg.attack, "num_malicious": poison.num_malicious,
            "backdoor_success": last_eval.get("backdoor_success")}
           if cfg.attack != "none" else {}),
        **_privacy_fields(accountant, plan, cfg),
        "privacy": _privacy_summary(accountant, plan, cfg),
        "rounds": cfg.rounds,
        "client_updates": updates,
        "compile_seconds": compile_seconds,
        "train_seconds": float(sum(round_seconds)),
        "mean_round_seconds": float(np.mean(steady)),
        "client_updates_per_s": float(updates / max(sum(round_seconds), 1e-9)),
        "total_seconds": time.perf_counter() - t_start,
        "population": pop.num_clients,
        "cohort_capacity": fed_round.cohort_capacity,
        "chunk_size": fed_round.chunk_size,
        "num_params": model.num_params(state.params),
        "backend": jax.default_backend(),
        "devices": len(jax.devices()) if cfg.num_devices == 0 else cfg.num_devices,
        "jax_version": jax.__version__,
        "config": cfg.to_dict(),
    }
    if output_dir:
        with open(os.path.join(output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    if accountant is not None:
        print(f"privacy: {summary['privacy']['statement']}", file=sys.stderr)
    return summary


def _build_poisoning(cfg: ExperimentConfig, model: Any, algorithm: Any,
                     data: ExperimentData) -> Any:
    """The run's :class:`~fedjax_sim.poisoning.experiment.PoisoningPlan` (empty if honest)."""
    from fedjax_sim.poisoning.experiment import PoisoningPlan, build_poisoning

    if cfg.attack == "none":
        return PoisoningPlan()
    honest = make_client_update(model, algorithm.client, data.population.max_examples)
    return build_poisoning(cfg, honest_update=honest,
                           num_clients=data.population.num_clients,
                           num_classes=data.num_classes, example_shape=data.example_shape)


def _with_backdoor_success(evaluate: Callable, model: Any, data: ExperimentData,
                           poison: Any) -> Callable:
    """``evaluate`` plus ``backdoor_success`` on the pooled test examples."""
    from fedjax_sim.poisoning.metrics import backdoor_success_rate

    if data.test_central is not None:
        x, y = (np.asarray(a) for a in data.test_central)
    else:
        mask = np.asarray(data.test_clients.mask)
        x = np.asarray(data.test_clients.x)[mask]
        y = np.asarray(data.test_clients.y)[mask]

    def evaluate_with_backdoor(params):
        out = evaluate(params)
        out["backdoor_success"] = backdoor_success_rate(model, params, x, y, poison.trigger,
                                                        poison.target_label)
        return out

    return evaluate_with_backdoor


def _privacy_fields(accountant: Accountant | DPFTRLAccountant | None, plan: Any,
                    cfg: ExperimentConfig) -> dict[str, Any]:
    """``epsilon`` (None: infinite, no DP), ``delta``, ``noise_multiplier``, ``accountant``."""
    return {"epsilon": None if accountant is None else accountant.epsilon(),
            "delta": plan.delta,
            "noise_multiplier": (accountant.noise_multiplier if accountant
                                 else plan.noise_multiplier),
            "accountant": cfg.accountant if accountant else None}


def _dp_ftrl_summary(accountant: DPFTRLAccountant, plan: Any,
                     cfg: ExperimentConfig) -> dict[str, Any]:
    """The ``privacy`` block of a DP-FTRL run: the guarantee, its assumptions, parameters."""
    eps = accountant.epsilon()
    adjacency = "replace one client with zero (special)"
    sampling = f"cyclic(m={cfg.cohort_size}, n={plan.sampler.num_clients})"
    assumptions = [
        f"each client contributes to at most one round per tree (the tree restarts every "
        f"{accountant.max_rounds} rounds; the cyclic order trains no client twice in "
        f"{accountant.rounds_per_pass} consecutive rounds)",
        "the cyclic order is fixed in advance, independently of the data; no "
        "amplification by sampling is claimed",
        f"each client's update is clipped to L2 norm {cfg.clip_norm:g} and every client "
        "counts 1 in the sum",
        "the noise key is secret and nothing else reads the clients' data"]
    passes = ("one pass or less: each client contributed at most once"
              if accountant.participation == "once" else
              "several passes: the trees compose, one contribution per tree")
    return {"dp": True, "aggregator": cfg.aggregator, "mechanism": "dp_ftrl_tree",
            "epsilon": eps, "delta": plan.delta,
            "noise_multiplier": accountant.noise_multiplier,
            "calibrated_from_target_epsilon": cfg.target_epsilon if plan.calibrated
            else None,
            "clip_norm": cfg.clip_norm, "tree_restart_rounds": accountant.max_rounds,
            "rounds_per_pass": accountant.rounds_per_pass,
            "participation": accountant.participation, "accountant": "rdp",
            "sampling": sampling, "adjacency": adjacency, "rounds": accountant.rounds,
            "assumptions": assumptions,
            "statement": f"client-level ({eps:.4g}, {plan.delta:.3g})-DP for all "
                         f"{accountant.rounds} released models (DP-FTRL tree aggregation, "
                         f"z={accountant.noise_multiplier:.4g} per node, tree restarted "
                         f"every {accountant.max_rounds} rounds, {passes}; {adjacency}; "
                         f"{sampling}, a fixed data-independent order, no sampling "
                         "amplification; rdp)"}


def _privacy_summary(accountant: Accountant | DPFTRLAccountant | None, plan: Any,
                     cfg: ExperimentConfig) -> dict[str, Any]:
    """The summary's ``privacy`` block: the guarantee in words and its parameters."""
    if accountant is None:
        return {"dp": False, "aggregator": cfg.aggregator,
                "statement": "no formal DP guarantee (no noise is added); epsilon = inf"}
    if isinstance(accountant, DPFTRLAccountant):
        return _dp_ftrl_summary(accountant, plan, cfg)
    spec = accountant.config.sampling
    adjacency = ("add/remove one client" if spec.kind == "poisson"
                 else "replace one client")
    eps = accountant.epsilon()
    return {"dp": True, "aggregator": cfg.aggregator, "epsilon": eps, "delta": plan.delta,
            "noise_multiplier": accountant.config.noise_multiplier,
            "calibrated_from_target_epsilon": cfg.target_epsilon if plan.calibrated
            else None,
            "clip_norm": cfg.clip_norm, "adaptive_clipping": cfg.adaptive_clipping,
            "accountant": cfg.accountant, "sampling": spec.describe(),
            "adjacency": adjacency, "rounds": accountant.rounds,
            "poisson_overflow_probability": plan.poisson_overflow_probability,
            "statement": f"client-level ({eps:.4g}, {plan.delta:.3g})-DP for all "
                         f"{accountant.rounds} released models ({adjacency}, "
                         f"{spec.describe()}, {cfg.accountant})"}


def _clip_fields(transform_state: Any) -> dict[str, float]:
    diag = clip_diagnostics(transform_state)
    if diag is None:
        return {}
    diag = jax.device_get(diag)
    return {"clip_norm": float(diag.clip_norm),
            "clipped_fraction": float(diag.clipped_fraction),
            "mean_update_norm": float(diag.mean_update_norm)}


@jax.jit
def _params_finite(params) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))


__all__ = ["ConfigError", "ExperimentData", "TrainingDiverged", "build_data",
           "run_experiment"]
