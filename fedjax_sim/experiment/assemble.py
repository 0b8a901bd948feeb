"""From a configuration to a ready round: every builder, called once, in order.

:func:`assemble` is the whole experiment assembly::

    data  = data registry          (cfg.data, seed)            host, cached
    model = model registry         (cfg.model, the data's shape)
    plan  = privacy plan           (cfg.server)                DP or not, delta
    sampler = sampler registry     (cfg.sampling, population, the plan's overflow tail)
    plan  = calibrated plan        (z from target_epsilon for the sampler's schedule)
    adversary = attack registry    (cfg.attack, the data)      client wrapper, stage
    chain = [adversary stage] + server chain (compress, filter, clip, reducer, noise;
            with secure aggregation: secure sum, then the aggregator's noise/division)
    algorithm = algorithm registry (cfg.algorithm, model, chain), wrapped by the adversary,
                then by the auditing canaries, then by the active attackers (a
                malicious server's spy rounds, a malicious client)
    ledger = ledger_for(chain, sampler.spec)                   read from what runs
    round = make_round(algorithm, sampler, engine settings, observers: the adversary's
            diagnostics, the honest server's victim capture, the malicious
            server's aggregate; behind secure aggregation the server view)

Nothing here runs inside the round, and the library never imports this module.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import math

from fedjax_sim.algorithms.base import Algorithm
from fedjax_sim.attacks.capture import aggregate_capture, victim_capture
from fedjax_sim.cohort import mesh_for
from fedjax_sim.experiment.algorithms import build_algorithm, resolved_weighting
from fedjax_sim.experiment.attacks import AdversaryPlan, AttackContext, build_adversary
from fedjax_sim.experiment.config import ExperimentConfig
from fedjax_sim.experiment.audit import with_canaries
from fedjax_sim.experiment.data import ExperimentData, build_data
from fedjax_sim.experiment.leakage import observed_rounds
from fedjax_sim.experiment.malicious import MaliciousPlan, with_malicious
from fedjax_sim.experiment.models import build_model
from fedjax_sim.experiment.sampling import build_sampler
from fedjax_sim.experiment.server import (PrivacyPlan, build_chain, calibrated,
                                          privacy_plan, server_key)
from fedjax_sim.models import Model
from fedjax_sim.privacy import ledger_for
from fedjax_sim.privacy.canaries import Canaries
from fedjax_sim.rounds import FederatedRound, make_round
from fedjax_sim.sampling import Sampler
from fedjax_sim.server.base import chain
from fedjax_sim.server.reducers import weighted_mean


@dataclasses.dataclass(frozen=True)
class Experiment:
    """Everything a run needs, built from one configuration.

    Attributes:
      cfg: the configuration.
      data: the population and held-out data.
      model: the model.
      sampler: the sampler.
      plan: the privacy plan (z, delta, notes).
      adversary: the attack (empty for an honest run).
      algorithm: the client and server programs (adversary included).
      ledger: the privacy ledger, or None without DP noise.
      round: the compiled-once round.
      key: the run's base PRNG key.
      canaries: the auditing canaries (None without them).
      malicious: the active attackers (None without them).
    """

    cfg: ExperimentConfig
    data: ExperimentData
    model: Model
    sampler: Sampler
    plan: PrivacyPlan
    adversary: AdversaryPlan
    algorithm: Algorithm
    ledger: Any
    round: FederatedRound
    key: jax.Array
    canaries: Canaries | None = None
    malicious: MaliciousPlan | None = None

    @property
    def num_params(self) -> int:
        shapes = jax.eval_shape(self.algorithm.server.init_params, self.key)
        return int(sum(math.prod(s.shape) for s in jax.tree.leaves(shapes)))


def run_keys(base_key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(init key, rounds key)`` of a run; round ``r`` steps with
    ``fold_in(rounds key, r)``."""
    init_key, rounds_key = jax.random.split(base_key)
    return init_key, rounds_key


def assemble(cfg: ExperimentConfig) -> Experiment:
    """Builds the experiment ``cfg`` describes (module docstring)."""
    data = build_data(cfg)
    pop = data.population
    model = build_model(cfg, data.example_shape, data.num_classes)
    plan = privacy_plan(cfg)
    sampler = build_sampler(cfg, pop.num_clients, plan.overflow_tail)
    base_key = jax.random.key(cfg.seed)
    weighting = resolved_weighting(cfg, plan.dp or cfg.secure.enabled)
    upload_dim = None
    if cfg.secure.enabled:  # the secure sum encodes exactly what a client uploads
        probe = build_algorithm(cfg, model, chain(weighted_mean()), pop.num_clients,
                                weighting)
        params = jax.eval_shape(probe.server.init_params, base_key)
        upload_dim = sum(math.prod(x.shape) for x in jax.tree.leaves(
            jax.eval_shape(probe.client.upload_like, params)))
    plan = calibrated(cfg, plan, sampler, upload_dim)
    adversary = build_adversary(cfg, AttackContext(pop.num_clients, data.num_classes,
                                                   data.example_shape))
    server_chain = build_chain(cfg, sampler=sampler, plan=plan, key=server_key(base_key),
                               upload_dim=upload_dim)
    if adversary.cohort_stage is not None:  # colluding, omniscient: before any defence
        server_chain = chain(adversary.cohort_stage, server_chain)
    algorithm = build_algorithm(cfg, model, server_chain, pop.num_clients, weighting)
    if adversary.wrap is not None:
        algorithm = algorithm.with_client(adversary.wrap(algorithm.client))
    algorithm, canaries = with_canaries(cfg, algorithm, base_key, pop.num_clients)
    algorithm, malicious = with_malicious(
        cfg, algorithm, data, model, sampler, base_key, run_keys(base_key)[1],
        None if canaries is None else canaries.client_ids)
    ledger = None
    if plan.dp:  # The ledger reads the chain that runs, not the config's numbers.
        ledger = ledger_for(server_chain, sampler.spec, accountant=cfg.server.accountant,
                            delta=plan.delta)
        if not math.isclose(ledger.noise_multiplier, plan.noise_multiplier, rel_tol=1e-6):
            raise AssertionError(f"the chain reports noise_multiplier="
                                 f"{ledger.noise_multiplier}, the plan asked for "
                                 f"{plan.noise_multiplier}")
    observers = [adversary.observer] if adversary.observer is not None else []
    observed = observed_rounds(cfg)
    if observed and not server_chain.hides_clients:  # the server keeps victims' uploads
        observers.append(victim_capture(cfg.leakage.victims, observed))
    if malicious is not None and malicious.spy_rounds:  # the malicious server reads it
        observers.append(aggregate_capture())
    fed_round = make_round(algorithm, sampler, chunk_size=cfg.engine.chunk_size,
                           mesh=mesh_for(cfg.engine.num_devices), observers=observers,
                           server_view=bool(observed) and server_chain.hides_clients)
    return Experiment(cfg, data, model, sampler, plan, adversary, algorithm, ledger,
                      fed_round, base_key, canaries, malicious)


__all__ = ["Experiment", "assemble", "run_keys"]
