"""Algorithms of a run: the registry (name -> builder of client + server programs).

A builder gets the configuration, the model, the aggregation chain the server section
assembled, the population size and the resolved client weighting, and returns an
:class:`~fedjax_sim.algorithms.Algorithm`. The FedAvg family's entries are made from
the library's own table (:data:`fedjax_sim.algorithms.FEDOPT`), so its names are typed
once. ``worker_momentum`` wraps any member's client program.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fedjax_sim.algorithms import FEDOPT, Algorithm, make_algorithm
from fedjax_sim.experiment.registry import Entry, Registry
from fedjax_sim.models import Model
from fedjax_sim.server.base import Chain


@dataclasses.dataclass(frozen=True)
class AlgorithmMeta:
    """Facts other builders need.

    Attributes:
      plain_sgd_server: the server step is SGD without momentum (DP-FTRL proper).
      default_weighting: the weighting when none is configured (None: uniform with DP,
        examples otherwise).
    """

    plain_sgd_server: bool = False
    default_weighting: str | None = None


_LOCAL = frozenset({"client_lr", "local_epochs", "batch_size", "client_momentum",
                    "weighting", "worker_momentum", "server_lr"})
_EXTRA = {"fedavgm": {"server_momentum"}, "fedadam": {"beta1", "beta2", "adaptivity"},
          "fedyogi": {"beta1", "beta2", "adaptivity"}, "fedadagrad": {"adaptivity"},
          "fedprox": {"prox_mu"}}


def _fedopt_builder(name: str):
    def build(cfg: Any, model: Model, aggregator: Chain, num_clients: int,
              weighting: str) -> Algorithm:
        a = cfg.algorithm
        optional = {k: getattr(a, k) for k in ("server_momentum", "beta1", "beta2",
                                                "adaptivity") if getattr(a, k) is not None}
        return make_algorithm(name, model, client_lr=a.client_lr,
                              local_epochs=a.local_epochs, batch_size=a.batch_size,
                              server_lr=a.server_lr, prox_mu=a.prox_mu,
                              client_momentum=a.client_momentum or 0.0,
                              weighting=weighting, aggregator=aggregator, **optional)

    return build


REGISTRY = Registry("algorithms", "algorithm", "algorithm", governed={
    k: None for k in _LOCAL | {"server_momentum", "beta1", "beta2", "adaptivity",
                               "prox_mu"}})
for _name, _member in FEDOPT.items():
    _uses = set(_EXTRA.get(_name, ())) | ({"server_lr", "weighting", "worker_momentum"}
                                          if _member.full_batch_step else _LOCAL)
    REGISTRY.add(Entry(_name, _fedopt_builder(_name), _member.description,
                       uses=frozenset(_uses),
                       meta=AlgorithmMeta(plain_sgd_server=_member.plain_sgd_server)))


def _scaffold(cfg: Any, model: Model, aggregator: Chain, num_clients: int,
              weighting: str) -> Algorithm:
    from fedjax_sim.algorithms.scaffold import scaffold

    a = cfg.algorithm
    return scaffold(model, client_lr=a.client_lr, local_epochs=a.local_epochs,
                    batch_size=a.batch_size, server_lr=a.server_lr or 1.0,
                    weighting=weighting, aggregator=aggregator)


REGISTRY.add(Entry("scaffold", _scaffold, "SCAFFOLD (Karimireddy et al. 2020, option II): "
                   "control variates against client drift; one c_i per client on the "
                   "device", uses=_LOCAL - {"client_momentum"},
                   meta=AlgorithmMeta(plain_sgd_server=True, default_weighting="uniform")))


def build_algorithm(cfg: Any, model: Model, aggregator: Chain, num_clients: int,
                    weighting: str) -> Algorithm:
    """The algorithm ``cfg.algorithm`` names, with worker momentum when configured."""
    alg = REGISTRY[cfg.algorithm.name].build(cfg, model, aggregator, num_clients, weighting)
    beta = cfg.algorithm.worker_momentum
    if beta is not None:
        from fedjax_sim.algorithms.worker_momentum import with_worker_momentum
        alg = alg.with_client(with_worker_momentum(alg.client, beta))
    return alg


def resolved_weighting(cfg: Any, dp: bool) -> str:
    """``algorithm.weighting``, or the algorithm's default, or uniform with DP (the sum's
    sensitivity is the clip norm only when every client counts 1)."""
    if cfg.algorithm.weighting is not None:
        return cfg.algorithm.weighting
    meta = REGISTRY[cfg.algorithm.name].meta
    if meta.default_weighting is not None:
        return meta.default_weighting
    return "uniform" if dp else "examples"


__all__ = ["AlgorithmMeta", "REGISTRY", "build_algorithm", "resolved_weighting"]
