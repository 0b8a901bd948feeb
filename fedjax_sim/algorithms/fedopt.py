"""The FedAvg family: local SGD on the client, an optax optimiser on the server.

Every member is the same client program (local training, upload the model delta) and the
same server program (broadcast the params; apply an optax optimiser to the
pseudo-gradient ``-aggregate``) with different parts:

==========  ======================================  ====================================
name        client                                  server optimiser on -aggregate
==========  ======================================  ====================================
fedsgd      one full-batch gradient step, lr 1      SGD(server_lr)           [1]
fedavg      local SGD epochs                        SGD(server_lr=1)         [1]
fedavgm     local SGD epochs                        SGD + momentum           [2]
fedadam     local SGD epochs                        Adam (eps = tau)         [3]
fedyogi     local SGD epochs                        Yogi                     [3]
fedadagrad  local SGD epochs                        Adagrad                  [3]
fedprox     local SGD + mu/2 ||w - w_t||^2          SGD(server_lr=1)         [4]
==========  ======================================  ====================================

[1] McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
    Data", AISTATS 2017. [2] Hsu et al., "Measuring the Effects of Non-Identical Data
    Distribution for Federated Visual Classification", 2019. [3] Reddi et al., "Adaptive
    Federated Optimization", ICLR 2021. [4] Li et al., "Federated Optimization in
    Heterogeneous Networks", MLSys 2020.

The aggregator defaults to the example-weighted mean; any complete chain (clipping,
robust reducers, DP noise) can replace it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from fedjax_sim._validation import check_choice, check_float, check_int, fail
from fedjax_sim.algorithms.base import (Algorithm, ClientProgram, ClientResult, RoundInfo,
                                        ServerProgram)
from fedjax_sim.client_update import ClientConfig, make_local_update, optax_update
from fedjax_sim.models import Model
from fedjax_sim.server.base import Chain, Stage
from fedjax_sim.server.reducers import weighted_mean

PyTree = Any


def local_training_client(model: Model, config: ClientConfig) -> ClientProgram:
    """The FedAvg client: local training on the broadcast params, upload the delta."""
    local_update = make_local_update(model, config)

    def update(params, data, key, state=()):
        out = local_update(params, data, key)
        return ClientResult(out.delta, out.weight, out.metrics, state)

    return ClientProgram(update)


def optax_server(model: Model, optimizer: optax.GradientTransformation,
                 aggregator: Stage | Chain) -> ServerProgram:
    """The FedOpt server (Reddi et al. 2021): ``optimizer`` on the pseudo-gradient
    ``-aggregate``; the message is the params."""

    def apply(params, opt_state, aggregate, info: RoundInfo):
        del info
        pseudo_grad = jax.tree.map(jnp.negative, aggregate)
        updates, opt_state = optax_update(optimizer, pseudo_grad, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return ServerProgram(init_params=model.init, init=optimizer.init,
                         broadcast=lambda params, state: params, aggregator=aggregator,
                         apply=apply)


@dataclasses.dataclass(frozen=True)
class FedOptHyperparams:
    """The hyper-parameters of the family (validated by :func:`make_algorithm`)."""

    server_lr: float
    server_momentum: float
    beta1: float
    beta2: float
    adaptivity: float


@dataclasses.dataclass(frozen=True)
class FedOptMember:
    """One member of the family: its server optimiser and what sets it apart.

    Attributes:
      server_optimizer: ``hyperparams -> optax optimiser``.
      default_server_lr: the server learning rate when none is given.
      plain_sgd_server: the server step is SGD without momentum (DP-FTRL proper).
      full_batch_step: the client takes one full-batch gradient step with lr 1 (FedSGD).
      proximal: the client adds FedProx's proximal term.
      description: one line for ``--help``.
    """

    server_optimizer: Callable[[FedOptHyperparams], optax.GradientTransformation]
    description: str = ""
    default_server_lr: float = 1.0
    plain_sgd_server: bool = False
    full_batch_step: bool = False
    proximal: bool = False


FEDOPT: dict[str, FedOptMember] = {
    "fedsgd": FedOptMember(lambda h: optax.sgd(h.server_lr), "one full-batch gradient per "
                           "client, SGD server", plain_sgd_server=True, full_batch_step=True),
    "fedavg": FedOptMember(lambda h: optax.sgd(h.server_lr), "local SGD epochs, SGD server",
                           plain_sgd_server=True),
    "fedavgm": FedOptMember(lambda h: optax.sgd(h.server_lr, momentum=h.server_momentum),
                            "local SGD, SGD server with momentum"),
    "fedadam": FedOptMember(lambda h: optax.adam(h.server_lr, b1=h.beta1, b2=h.beta2,
                                                 eps=h.adaptivity), "local SGD, Adam server",
                            default_server_lr=0.01),
    "fedyogi": FedOptMember(lambda h: optax.yogi(h.server_lr, b1=h.beta1, b2=h.beta2,
                                                 eps=h.adaptivity), "local SGD, Yogi server",
                            default_server_lr=0.01),
    "fedadagrad": FedOptMember(lambda h: optax.adagrad(h.server_lr,
                                                       initial_accumulator_value=0.0,
                                                       eps=h.adaptivity),
                               "local SGD, Adagrad server", default_server_lr=0.01),
    "fedprox": FedOptMember(lambda h: optax.sgd(h.server_lr), "local SGD with a proximal "
                            "term, SGD server", plain_sgd_server=True, proximal=True),
}
"""The FedAvg family by name."""

ALGORITHM_NAMES = tuple(FEDOPT)


def make_algorithm(name: str, model: Model, *, client_lr: float = 0.1,
                   local_epochs: int = 1, batch_size: int | None = 10,
                   server_lr: float | None = None, server_momentum: float = 0.9,
                   beta1: float = 0.9, beta2: float = 0.99, adaptivity: float = 1e-3,
                   prox_mu: float | None = None, client_momentum: float = 0.0,
                   weighting: str = "examples",
                   aggregator: Stage | Chain | None = None) -> Algorithm:
    """Builds one of the FedAvg family (:data:`FEDOPT`) for ``model``.

    Args:
      name: a key of :data:`FEDOPT`.
      model: the model clients train.
      client_lr: local SGD learning rate (ignored by fedsgd, whose local step has lr 1 so
        that the delta is exactly minus the client's gradient).
      local_epochs: local passes per round (fedsgd: forced to 1).
      batch_size: local batch size; None = full client batch (fedsgd: forced to None).
      server_lr: server learning rate; default 1.0 for the SGD servers and 0.01 for the
        adaptive optimisers (Reddi et al.'s grid centre).
      server_momentum: momentum of fedavgm.
      beta1, beta2: first/second moment decay of fedadam/fedyogi.
      adaptivity: tau, the epsilon of fedadam/fedyogi/fedadagrad (Reddi et al. use 1e-3).
      prox_mu: FedProx proximal coefficient (fedprox only; default 0.01).
      client_momentum: momentum of the local SGD (0 = plain SGD).
      weighting: ``"examples"`` or ``"uniform"`` client weights.
      aggregator: the aggregation chain; default :func:`weighted_mean`.

    Returns:
      The :class:`Algorithm`.
    """
    member = FEDOPT[check_choice("algorithm", name, FEDOPT)]
    check_float("client_lr", client_lr, min_value=0.0, min_exclusive=True)
    check_int("local_epochs", local_epochs, min_value=1)
    hp = FedOptHyperparams(
        server_lr=check_float("server_lr", member.default_server_lr if server_lr is None
                              else server_lr, min_value=0.0, min_exclusive=True),
        server_momentum=check_float("server_momentum", server_momentum, min_value=0.0,
                                    max_value=1.0, max_exclusive=True),
        beta1=check_float("beta1", beta1, min_value=0.0, max_value=1.0, max_exclusive=True),
        beta2=check_float("beta2", beta2, min_value=0.0, max_value=1.0, max_exclusive=True),
        adaptivity=check_float("adaptivity", adaptivity, min_value=0.0, min_exclusive=True))
    check_float("client_momentum", client_momentum, min_value=0.0, max_value=1.0,
                max_exclusive=True)
    if not member.proximal and prox_mu is not None:
        fail("prox_mu", prox_mu, f"only applies to fedprox, not algorithm={name!r}")
    mu = check_float("prox_mu", 0.01 if prox_mu is None else prox_mu,
                     min_value=0.0) if member.proximal else 0.0
    if member.full_batch_step:
        client_opt, local_epochs, batch_size = optax.sgd(1.0), 1, None
    else:
        client_opt = optax.sgd(client_lr, momentum=client_momentum or None)
    client = ClientConfig(optimizer=client_opt, local_epochs=local_epochs,
                          batch_size=batch_size, prox_mu=mu, weighting=weighting)
    return Algorithm(name, local_training_client(model, client),
                     optax_server(model, member.server_optimizer(hp),
                                  weighted_mean() if aggregator is None else aggregator))


__all__ = ["ALGORITHM_NAMES", "FEDOPT", "FedOptHyperparams", "FedOptMember",
           "local_training_client", "make_algorithm", "optax_server"]
