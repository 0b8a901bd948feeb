"""A malicious server and a malicious client inside ``fedjax-sim run``.

Two options of the ``[leakage]`` section put an active attacker into the run:

* ``imprint_rounds`` (1-based): in these rounds a malicious server sends the cohort an
  imprinted copy of its own model (:mod:`fedjax_sim.attacks.malicious_server`), reads
  the examples off the round's aggregate (every client's update summed: the weighted
  mean, or behind secure aggregation the decoded sum) and discards the round;
* ``malicious_client_round`` (1-based): a client sampled in that round for the first
  time sends a model-replacement update that installs an imprint in the global model
  (:mod:`fedjax_sim.attacks.malicious_client`), then reads the next round's honest
  clients' examples off two consecutive global models (it is assumed to receive both, as
  a client that downloads the published model does). Whenever it is sampled later it
  sends zeros while its imprint holds and installs it again when training has worn it
  off. The run is float32 throughout, where the lab's reference runs the two rounds in
  float64: the read-off differences two float32 models, which costs precision when the
  imprint's weights are large (:data:`LIVE_GAIN`).

Both attackers' bins are set from ``imprint_public`` held-out examples (the attacker's
auxiliary data from the same domain). Both are scored with the honest server's metrics
against the attacked cohort's real examples (simulator ground truth) and write
``leak_imprint_*`` / ``leak_mclient_*`` fields to the round's row, a PNG grid to
``DIR/leakage/``, and a ``malicious`` block to the summary with the closed-form
expectation ``(1 - 1/k)^(n-1)`` beside the measurement.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim._validation import fail
from fedjax_sim.algorithms import FEDOPT
from fedjax_sim.algorithms.base import Algorithm
from fedjax_sim.attacks import imprint as imp
from fedjax_sim.attacks.capture import AGGREGATE
from fedjax_sim.attacks.honest_server import Truth, is_image, score_reconstructions
from fedjax_sim.attacks.malicious_client import (MaliciousClientConfig,
                                                 imprint_target_params, read_off_next_round,
                                                 replacement_client)
from fedjax_sim.attacks.malicious_server import Imprint, make_imprint, spy_server
from fedjax_sim.experiment.leakage import (LEAKAGE_DIR, cohort_truth, is_canary,
                                           pooled_truth, save_grid)
from fedjax_sim.experiment.reporters import Reporter
from fedjax_sim.rounds import split_round_key

LIVE_GAIN = 3.0
"""The malicious client's weight from each bin to its live unit. The install round's
honest updates perturb these weights by about what they perturb any weight (~0.1 on the
digits MLP early in training), so a larger gain installs more reliably; the read-off's
precision does not depend on it (the next layer divides it out). Measured on digits,
install rounds 1-3, hidden (32, 16) to (200, 200): 0.05 (the lab's float64 value)
installed in 2 of 9 cases, 1.0 in 6, 3.0 in all 9."""
_DEFAULTS = {"imprint_bins": 64, "malicious_bins": 16, "imprint_public": 256}
# Models whose first layer is no dense layer on the flattened input.
_NO_DENSE_INPUT = frozenset({"cnn", "softmax"})


def imprint_rounds(cfg: Any) -> tuple[int, ...]:
    """The malicious server's spy rounds, 0-based (empty: none)."""
    rounds = cfg.leakage.imprint_rounds
    return () if rounds is None else tuple(sorted({r - 1 for r in rounds}))


def check_malicious(cfg: Any) -> None:
    """The cross-field rules of the two active attackers (one-line ConfigErrors)."""
    from fedjax_sim.experiment.algorithms import resolved_weighting
    from fedjax_sim.experiment.server import privacy_plan

    lk, rounds = cfg.leakage, cfg.sampling.rounds
    spies = lk.imprint_rounds or ()
    mc = lk.malicious_client_round
    if not spies and lk.imprint_bins != _DEFAULTS["imprint_bins"]:
        fail("imprint_bins", lk.imprint_bins, "only applies with imprint_rounds")
    if mc is None and lk.malicious_bins != _DEFAULTS["malicious_bins"]:
        fail("malicious_bins", lk.malicious_bins, "only applies with malicious_client_round")
    if not spies and mc is None:
        if lk.imprint_public != _DEFAULTS["imprint_public"]:
            fail("imprint_public", lk.imprint_public, "only applies with imprint_rounds or "
                 "malicious_client_round")
        return
    if cfg.model.name in _NO_DENSE_INPUT:
        fail("imprint_rounds" if spies else "malicious_client_round", spies or mc,
             "an imprint needs a fully connected first layer on the flattened input "
             f"followed by a hidden layer; model={cfg.model.name} has none")
    for r in spies:
        if r > rounds:
            fail("imprint_rounds", r, f"beyond the run's {rounds} rounds")
    both = set(spies) & set(lk.observe_rounds or ())
    if both:
        fail("imprint_rounds", min(both), "is also in observe_rounds: the honest server's "
             "attacks replay the global model, which a spy round does not send")
    if cfg.output.resume:
        fail("imprint_rounds" if spies else "malicious_client_round", spies or mc,
             "the active attackers' plans are not checkpointed: a resumed run cannot run them")
    if spies and cfg.algorithm.name == "scaffold":
        fail("imprint_rounds", spies[0], "a spy round would still update SCAFFOLD's client "
             "control variates; use a FedAvg-family algorithm")
    if spies and len(cfg.model.hidden) < 1:
        fail("imprint_rounds", spies[0], "needs an MLP with a hidden layer")
    if spies and lk.imprint_bins > cfg.model.hidden[0]:
        fail("imprint_bins", lk.imprint_bins, f"exceeds the first hidden layer's "
             f"{cfg.model.hidden[0]} units")
    if mc is None:
        return
    if mc + 1 > rounds:
        fail("malicious_client_round", mc, f"needs the next round to read off: at most "
             f"{rounds - 1} in a {rounds}-round run")
    if mc in spies or mc + 1 in spies:
        fail("malicious_client_round", mc, "overlaps imprint_rounds")
    member = FEDOPT.get(cfg.algorithm.name)
    if member is None or not member.plain_sgd_server:
        fail("malicious_client_round", mc, "model replacement steers a plain SGD server "
             f"(fedsgd, fedavg, fedprox); algorithm={cfg.algorithm.name} is not")
    weighting = resolved_weighting(cfg, privacy_plan(cfg).dp or cfg.secure.enabled)
    if weighting != "uniform":
        fail("malicious_client_round", mc, "model replacement scales by the cohort size: "
             "it needs weighting=uniform (under example weighting the attacker would need "
             "every client's example count)")
    if cfg.sampling.kind != "fixed":
        fail("malicious_client_round", mc, "model replacement scales by the cohort size: "
             f"it needs sampling=fixed, not {cfg.sampling.kind}")
    if len(cfg.model.hidden) < 2:
        fail("malicious_client_round", mc, "needs an MLP with at least two hidden layers "
             "(the imprint and one live unit)")
    if lk.malicious_bins > cfg.model.hidden[0]:
        fail("malicious_bins", lk.malicious_bins, f"exceeds the first hidden layer's "
             f"{cfg.model.hidden[0]} units")


@dataclasses.dataclass(frozen=True)
class MaliciousPlan:
    """The run's active attackers, as assembled.

    Attributes:
      spy_rounds: the malicious server's spy rounds, 0-based.
      direction: ``[d]`` the measurement direction both attackers bin by.
      imprint: what the spy rounds send (None: no malicious server).
      install_round: the malicious client's install round, 0-based (None: none).
      attacker: its population id.
      target: the model it installs (``theta*``'s first three layers matter).
      client_config: its settings.
      client_edges: ``[k + 1]`` its bin edges.
    """

    spy_rounds: tuple[int, ...] = ()
    direction: np.ndarray | None = None
    imprint: Imprint | None = None
    install_round: int | None = None
    attacker: int | None = None
    target: Any = None
    client_config: MaliciousClientConfig | None = None
    client_edges: np.ndarray | None = None


def cohort_ids(sampler: Any, rounds_key: jax.Array, round_index: int) -> np.ndarray:
    """The ids the run's sampler draws in round ``round_index`` (0-based; the run's round
    keys are ``fold_in(rounds_key, r)``), in cohort order."""
    sample_key, _ = split_round_key(jax.random.fold_in(rounds_key, round_index))
    c = sampler.sample(sample_key, jnp.asarray(round_index, jnp.int32))
    return np.asarray(c.ids)[np.asarray(c.mask, bool)]


def first_timer(sampler: Any, rounds_key: jax.Array, round_index: int,
                excluded: np.ndarray) -> int:
    """The first client the sampler draws in ``round_index`` that it drew in no earlier
    round and that is not in ``excluded``."""
    seen = set(excluded.tolist())
    for r in range(round_index):
        seen.update(cohort_ids(sampler, rounds_key, r).tolist())
    fresh = [int(i) for i in cohort_ids(sampler, rounds_key, round_index)
             if int(i) not in seen]
    if not fresh:
        fail("malicious_client_round", round_index + 1, "every client sampled in that round "
             "took part before (or is a canary): choose an earlier round")
    return fresh[0]


def with_malicious(cfg: Any, algorithm: Algorithm, data: Any, model: Any, sampler: Any,
                   base_key: jax.Array, rounds_key: jax.Array, canary_ids: Any
                   ) -> tuple[Algorithm, MaliciousPlan | None]:
    """``algorithm`` with the configured malicious server and/or client (module
    docstring); ``(algorithm, None)`` when there is neither."""
    lk = cfg.leakage
    spies = imprint_rounds(cfg)
    if not spies and lk.malicious_client_round is None:
        return algorithm, None
    aux = np.asarray(data.pooled_test()[0], np.float64)
    aux = aux[:min(lk.imprint_public, len(aux))]
    d = math.prod(model.example_shape)
    direction = imp.measurement_direction("random", d, key=jax.random.fold_in(base_key,
                                                                               0x1EB))
    m = imp.measure(aux, direction)
    params = jax.eval_shape(algorithm.server.init_params, base_key)
    plan = MaliciousPlan(spy_rounds=spies, direction=direction)
    if spies:
        config = imp.ImprintConfig(num_bins=lk.imprint_bins)
        imprint = make_imprint(params, direction, imp.bin_edges_from_data(m, config.num_bins),
                               config)
        algorithm = dataclasses.replace(algorithm, server=spy_server(algorithm.server, spies,
                                                                     imprint))
        plan = dataclasses.replace(plan, imprint=imprint)
    if lk.malicious_client_round is not None:
        t = lk.malicious_client_round - 1
        excluded = np.asarray([] if canary_ids is None else canary_ids, np.int64)
        attacker = first_timer(sampler, rounds_key, t, excluded)
        config = MaliciousClientConfig(num_bins=lk.malicious_bins,
                                       cohort_size=cfg.sampling.cohort_size,
                                       live_gain=LIVE_GAIN)
        init = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), params)
        edges = imp.bin_edges_from_data(m, config.num_bins)
        target = imprint_target_params(init, direction, edges, config)
        server_lr = cfg.algorithm.server_lr or FEDOPT[cfg.algorithm.name].default_server_lr
        algorithm = algorithm.with_client(replacement_client(
            algorithm.client, attacker, target, config, server_lr))
        plan = dataclasses.replace(plan, install_round=t, attacker=attacker, target=target,
                                   client_config=config, client_edges=edges)
    return algorithm, plan


class MaliciousReporter(Reporter):
    """Scores the active attackers in their rounds (module docstring)."""

    def __init__(self, run: Any, output_dir: str | None):
        exp = run.experiment
        self.plan: MaliciousPlan = exp.malicious
        self.shape = tuple(exp.model.example_shape)
        self.image = is_image(self.shape)
        self.dir = os.path.join(output_dir, LEAKAGE_DIR) if output_dir else None
        self.canary_ids = None if exp.canaries is None else exp.canaries.client_ids
        self.rows: dict[str, list[dict[str, float]]] = {"imprint": [], "mclient": []}

    def _cohort_examples(self, run, ids: np.ndarray, drop: int | None = None) -> Truth:
        """The real examples of ``ids`` (padding, canaries and ``drop`` left out) as one
        :class:`Truth` row."""
        keep = (ids >= 0) & ~is_canary(self.canary_ids, ids)
        if drop is not None:
            keep &= ids != drop
        return pooled_truth(cohort_truth(run.experiment.data.population, ids), keep)

    def _score(self, name: str, recon: np.ndarray, truth: Truth, k: int, r: int,
               row: dict, extra: dict) -> None:
        n = int(truth.mask.sum())
        recon = np.clip(recon, 0.0, 1.0) if self.image else recon
        metrics, pairs = score_reconstructions(name, recon[None], truth, np.asarray([k]),
                                               self.image)
        metrics.update({f"leak_{name}_examples": n, f"leak_{name}_bins": k,
                        f"leak_{name}_expected": imp.predicted_recovery_rate(max(n, 1), k)},
                       **extra)
        row.update(metrics)
        self.rows[name].append(dict(metrics, round=r + 1))
        if self.dir:
            os.makedirs(self.dir, exist_ok=True)
            who = "malicious server" if name == "imprint" else "malicious client"
            save_grid(os.path.join(self.dir, f"{name}_round_{r + 1:04d}.png"),
                      {name: pairs}, self.image,
                      f"round {r + 1}, {who}: originals (top) and reconstructions")

    def round(self, run, r, state, metrics, row):
        plan = self.plan
        if r in plan.spy_rounds:
            aggregate = jax.device_get(run.output.observed[AGGREGATE])
            truth = self._cohort_examples(run, np.asarray(run.output.client_ids))
            recon = plan.imprint.read_off(aggregate, self.shape)
            self._score("imprint", recon, truth, plan.imprint.config.num_bins, r, row, {})
        if plan.install_round is not None and r == plan.install_round + 1:
            read = read_off_next_round(run.params_before, state.params, plan.client_config,
                                       self.shape, target=plan.target)
            truth = self._cohort_examples(run, np.asarray(run.output.client_ids),
                                          drop=plan.attacker)
            k = plan.client_config.num_bins
            recon = read.reconstructions
            if len(recon) == 0:
                recon = np.full((k,) + self.shape, np.nan)
            self._score("mclient", recon, truth, k, r, row,
                        {"leak_mclient_installed": bool(read.installed),
                         "leak_mclient_install_error": float(read.install_error)})

    def finish(self, run, state, summary):
        plan = self.plan
        block: dict[str, Any] = {}
        if plan.imprint is not None:
            block["server"] = {
                "threat_model": "malicious server: sends an imprinted copy of its model in "
                                "spy rounds, reads the cohort's aggregate (or secure sum), "
                                "discards the round",
                "spy_rounds": [r + 1 for r in plan.spy_rounds],
                "bins": plan.imprint.config.num_bins, "rounds": self.rows["imprint"]}
        if plan.install_round is not None:
            block["client"] = {
                "threat_model": "malicious client: installs an imprint by model "
                                "replacement, reads the next round off two global models",
                "install_round": plan.install_round + 1, "attacker": plan.attacker,
                "bins": plan.client_config.num_bins, "rounds": self.rows["mclient"]}
        summary["malicious"] = block


__all__ = ["MaliciousPlan", "MaliciousReporter", "check_malicious", "cohort_ids",
           "first_timer", "imprint_rounds", "with_malicious"]
