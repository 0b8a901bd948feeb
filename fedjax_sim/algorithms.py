"""Federated algorithms as (client config, server transform, server optimiser) triples.

Every algorithm here is the same round (``fedjax_sim.rounds``) with different parts:

=========  ======================================  ====================================
name       client                                  server optimiser on -mean(delta)
=========  ======================================  ====================================
fedsgd     one full-batch gradient step, lr 1      SGD(server_lr)           [1]
fedavg     local SGD epochs                        SGD(server_lr=1)         [1]
fedavgm    local SGD epochs                        SGD + momentum           [2]
fedadam    local SGD epochs                        Adam (eps = tau)         [3]
fedyogi    local SGD epochs                        Yogi                     [3]
fedadagrad local SGD epochs                        Adagrad                  [3]
fedprox    local SGD + mu/2 ||w - w_t||^2          SGD(server_lr=1)         [4]
=========  ======================================  ====================================

[1] McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
    Data", AISTATS 2017. [2] Hsu et al., "Measuring the Effects of Non-Identical Data
    Distribution for Federated Visual Classification", 2019. [3] Reddi et al., "Adaptive
    Federated Optimization", ICLR 2021. [4] Li et al., "Federated Optimization in
    Heterogeneous Networks", MLSys 2020.

The server transform defaults to the example-weighted mean; any chain (clipping, robust
reducers, DP noise) can replace it.
"""

from __future__ import annotations

import dataclasses

import optax

from fedjax_sim._validation import check_choice, check_float, check_int, fail
from fedjax_sim.client_update import ClientConfig
from fedjax_sim.server.base import ServerTransform, weighted_mean


@dataclasses.dataclass(frozen=True)
class FederatedAlgorithm:
    """The parts of a round that define an algorithm.

    Attributes:
      name: algorithm name (for logs).
      client: local training configuration.
      server_transform: aggregation chain over the cohort's deltas.
      server_optimizer: optax optimiser applied to the pseudo-gradient ``-aggregate``.
    """

    name: str
    client: ClientConfig
    server_transform: ServerTransform
    server_optimizer: optax.GradientTransformation


ALGORITHM_NAMES = ("fedsgd", "fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad",
                   "fedprox")


def make_algorithm(name: str, *, client_lr: float = 0.1, local_epochs: int = 1,
                   batch_size: int | None = 10, server_lr: float | None = None,
                   server_momentum: float = 0.9, beta1: float = 0.9, beta2: float = 0.99,
                   adaptivity: float = 1e-3, prox_mu: float | None = None,
                   client_momentum: float = 0.0, weighting: str = "examples",
                   server_transform: ServerTransform | None = None) -> FederatedAlgorithm:
    """Builds one of ``ALGORITHM_NAMES`` with validated hyper-parameters.

    Args:
      name: algorithm name.
      client_lr: local SGD learning rate (ignored by fedsgd, whose local step has lr 1 so
        that the delta is exactly minus the client's gradient).
      local_epochs: local passes per round (fedsgd: forced to 1).
      batch_size: local batch size; None = full client batch (fedsgd: forced to None).
      server_lr: server learning rate; default 1.0 for fedavg/fedprox/fedavgm/fedsgd and
        0.01 for the adaptive optimisers (Reddi et al.'s grid centre).
      server_momentum: momentum of fedavgm.
      beta1, beta2: first/second moment decay of fedadam/fedyogi.
      adaptivity: tau, the epsilon of fedadam/fedyogi/fedadagrad (Reddi et al. use 1e-3).
      prox_mu: FedProx proximal coefficient (fedprox only; default 0.01).
      client_momentum: momentum of the local SGD (0 = plain SGD).
      weighting: ``"examples"`` or ``"uniform"`` client weights.
      server_transform: the aggregation chain; default :func:`weighted_mean`.

    Returns:
      The algorithm.
    """
    check_choice("algorithm", name, ALGORITHM_NAMES)
    check_float("client_lr", client_lr, min_value=0.0, min_exclusive=True)
    check_int("local_epochs", local_epochs, min_value=1)
    check_float("server_momentum", server_momentum, min_value=0.0, max_value=1.0,
                max_exclusive=True)
    check_float("beta1", beta1, min_value=0.0, max_value=1.0, max_exclusive=True)
    check_float("beta2", beta2, min_value=0.0, max_value=1.0, max_exclusive=True)
    check_float("adaptivity", adaptivity, min_value=0.0, min_exclusive=True)
    check_float("client_momentum", client_momentum, min_value=0.0, max_value=1.0,
                max_exclusive=True)
    adaptive = name in ("fedadam", "fedyogi", "fedadagrad")
    if server_lr is None:
        server_lr = 0.01 if adaptive else 1.0
    check_float("server_lr", server_lr, min_value=0.0, min_exclusive=True)
    if name != "fedprox" and prox_mu is not None:
        fail("prox_mu", prox_mu, f"only applies to fedprox, not algorithm={name!r}")
    mu = 0.0
    if name == "fedprox":
        mu = check_float("prox_mu", 0.01 if prox_mu is None else prox_mu, min_value=0.0)

    if name == "fedsgd":
        client_opt, local_epochs, batch_size = optax.sgd(1.0), 1, None
    else:
        client_opt = optax.sgd(client_lr, momentum=client_momentum or None)
    client = ClientConfig(optimizer=client_opt, local_epochs=local_epochs,
                          batch_size=batch_size, prox_mu=mu, weighting=weighting)

    if name == "fedavgm":
        server_opt = optax.sgd(server_lr, momentum=server_momentum)
    elif name == "fedadam":
        server_opt = optax.adam(server_lr, b1=beta1, b2=beta2, eps=adaptivity)
    elif name == "fedyogi":
        server_opt = optax.yogi(server_lr, b1=beta1, b2=beta2, eps=adaptivity)
    elif name == "fedadagrad":
        server_opt = optax.adagrad(server_lr, initial_accumulator_value=0.0, eps=adaptivity)
    else:
        server_opt = optax.sgd(server_lr)
    return FederatedAlgorithm(name=name, client=client,
                              server_transform=server_transform or weighted_mean(),
                              server_optimizer=server_opt)
