"""SCAFFOLD: local SGD corrected by control variates (Karimireddy et al. 2020, option II).

Karimireddy, Kale, Mohri, Reddi, Stich, Suresh, "SCAFFOLD: Stochastic Controlled
Averaging for Federated Learning", ICML 2020, Algorithm 1 with option II.

The server keeps the params ``x`` and a control variate ``c``; every client keeps its own
control variate ``c_i`` (zeros at first) across rounds. One round, for each sampled
client ``i`` (``eta_l`` = ``client_lr``, ``eta_g`` = ``server_lr``, ``N`` the population):

1. receive ``(x, c)``; from ``y_i = x`` run ``K_i`` local SGD steps
   ``y_i <- y_i - eta_l (g_i(y_i) + c - c_i)``;
2. ``c_i+ = c_i - c + (x - y_i) / (K_i eta_l)`` (option II);
3. upload ``(delta_y, delta_c) = (y_i - x, c_i+ - c_i)`` and keep ``c_i+``.

The server aggregates the uploads with its chain (default :func:`weighted_mean`) and sets
``x <- x + eta_g mean(delta_y)`` (an optax SGD step on the pseudo-gradient ``-mean``, as
FedAvg's server) and ``c <- c + (n / N) mean(delta_c)``, where ``n`` is
``RoundInfo.num_contributing`` (the clients whose uploads reached the reducer with a
positive weight) and ``N`` is ``RoundInfo.population``.

Since ``y_i = x - eta_l sum_k (g_k + c - c_i)``, option II gives ``c_i+ = (1/K_i)
sum_k g_k``: the mean of the client's own stochastic gradients along its local path (the
corrections cancel), which is what :func:`scaffold`'s tests check against a Python loop.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_sim._validation import check_choice, check_float, fail
from fedjax_sim.algorithms.base import (Algorithm, ClientProgram, ClientResult, RoundInfo,
                                        ServerProgram)
from fedjax_sim.client_update import ClientConfig, make_local_update
from fedjax_sim.models import Model
from fedjax_sim.server.base import Chain, Stage
from fedjax_sim.server.reducers import weighted_mean

PyTree = Any


class ScaffoldMessage(NamedTuple):
    """What every sampled client receives: the params ``x`` and the server's ``c``."""

    params: PyTree
    control: PyTree


class ScaffoldUpload(NamedTuple):
    """What a client sends: its model change and the change of its control variate."""

    delta_params: PyTree
    delta_control: PyTree


class ScaffoldServerState(NamedTuple):
    """The server's state: its optax optimiser state and the control variate ``c``."""

    opt_state: optax.OptState
    control: PyTree


def _zeros_like(tree: PyTree) -> PyTree:
    return jax.tree.map(jnp.zeros_like, tree)


def scaffold_client(model: Model, config: ClientConfig, client_lr: float) -> ClientProgram:
    """SCAFFOLD's client program (one client; its state is its control variate ``c_i``).

    Args:
      model: the model the client trains.
      config: local training; its optimiser must be plain SGD with learning rate
        ``client_lr`` (option II divides the model change by ``K * client_lr``).
      client_lr: the local learning rate ``eta_l``.

    Returns:
      The program: ``update(ScaffoldMessage, data, key, c_i)`` trains with the correction
      ``c - c_i`` added to every local gradient and returns the upload
      :class:`ScaffoldUpload` with the new ``c_i``. A client whose local training took no
      step (no examples) keeps ``c_i`` and uploads zeros (its weight is 0 as well).
    """
    local_update = make_local_update(model, config)
    lr = check_float("client_lr", client_lr, min_value=0.0, min_exclusive=True)

    def update(message: ScaffoldMessage, data, key, control_i):
        params, control = message
        correction = jax.tree.map(jnp.subtract, control, control_i)
        out = local_update(params, data, key, correction)
        steps = out.metrics["num_steps"]
        took_steps = steps > 0
        inv = 1.0 / (jnp.maximum(steps, 1.0) * lr)  # 1 / (K eta_l); K = 0 is masked below
        # Option II: c_i+ = c_i - c + (x - y_i) / (K eta_l), with x - y_i = -delta.
        new_control_i = jax.tree.map(
            lambda ci, c, d: jnp.where(took_steps, ci - c - d * inv.astype(d.dtype), ci),
            control_i, control, out.delta)
        delta_control = jax.tree.map(jnp.subtract, new_control_i, control_i)
        upload = ScaffoldUpload(out.delta, delta_control)
        return ClientResult(upload, out.weight, out.metrics, new_control_i)

    return ClientProgram(update, init_state=_zeros_like,
                         upload_like=lambda params: ScaffoldUpload(params, params))


def scaffold_server(model: Model, server_lr: float, aggregator: Stage | Chain
                    ) -> ServerProgram:
    """SCAFFOLD's server program: SGD(``server_lr``) on ``-mean(delta_y)`` and
    ``c <- c + (num_contributing / population) mean(delta_c)``."""
    optimizer = optax.sgd(server_lr)

    def init(params):
        return ScaffoldServerState(optimizer.init(params), _zeros_like(params))

    def broadcast(params, state: ScaffoldServerState):
        return ScaffoldMessage(params, state.control)

    def apply(params, state: ScaffoldServerState, aggregate: ScaffoldUpload,
              info: RoundInfo):
        delta_params, delta_control = aggregate
        pseudo_grad = jax.tree.map(jnp.negative, delta_params)
        updates, opt_state = optimizer.update(pseudo_grad, state.opt_state, params)
        fraction = info.num_contributing.astype(jnp.float32) / float(info.population)
        control = jax.tree.map(lambda c, d: c + (fraction * d).astype(c.dtype),
                               state.control, delta_control)
        return optax.apply_updates(params, updates), ScaffoldServerState(opt_state, control)

    return ServerProgram(init_params=model.init, init=init, broadcast=broadcast,
                         aggregator=aggregator, apply=apply)


def scaffold(model: Model, *, client_lr: float, local_epochs: int,
             batch_size: int | None, server_lr: float = 1.0, weighting: str = "uniform",
             aggregator: Stage | Chain | None = None,
             client_momentum: float = 0.0) -> Algorithm:
    """SCAFFOLD (Karimireddy et al., ICML 2020, Algorithm 1, option II) for ``model``.

    Guarantee (the paper's Theorem III, under its assumptions: each client's loss
    ``beta``-smooth, stochastic gradients unbiased with bounded variance, clients sampled
    uniformly, local steps plain SGD with ``eta_l`` small enough, every sampled client
    taking the same ``K`` steps): convergence does not depend on the clients'
    gradient dissimilarity, unlike FedAvg's, so SCAFFOLD does not suffer client drift
    under heterogeneous (non-IID) data. Here the number of steps ``K_i`` is the client's
    own (``num_steps``: ragged clients take fewer), which option II's formula accounts for
    per client.

    The server's control step is ``c <- c + (n / N) mean(delta_c)`` with ``n`` the
    clients that reached the reducer with a positive weight and ``N`` the population (the
    round passes both). With ``weighting="uniform"`` (the default, as in the paper) and
    the default aggregator this is exactly the paper's ``c + (1/N) sum_{i in S}
    delta_c_i`` (a client without examples uploads zeros with weight 0), so ``c`` stays
    the mean of all ``N`` clients' ``c_i``. With
    ``weighting="examples"`` both means are example-weighted (the example-weighted
    variant): ``c`` then moves by ``(1/N) sum_{i in S} (n_i / mean_S n) delta_c_i``, so it
    tracks an example-weighted mean of the ``c_i``, exactly only when every cohort has the
    same mean size. Any other aggregator (clipping, robust reducers, DP noise) treats
    the upload ``(delta_y, delta_c)`` as one vector, e.g. clipping its joint norm.

    Memory: every client's ``c_i`` lives on the device, ``[num_clients, num_params]``
    float32; :func:`fedjax_sim.make_round` refuses a population whose state would not fit.

    Args:
      model: the model clients train.
      client_lr: the local SGD learning rate ``eta_l`` (> 0).
      local_epochs: local passes per round (>= 1).
      batch_size: local batch size; None = one full-batch step per epoch.
      server_lr: the global learning rate ``eta_g`` (> 0; 1 = the plain average).
      weighting: ``"uniform"`` or ``"examples"`` client weights.
      aggregator: the aggregation chain; default :func:`weighted_mean`.
      client_momentum: must be 0: option II assumes plain local SGD.

    Returns:
      The :class:`Algorithm` named ``"scaffold"``.
    """
    client_lr = check_float("client_lr", client_lr, min_value=0.0, min_exclusive=True)
    server_lr = check_float("server_lr", server_lr, min_value=0.0, min_exclusive=True)
    check_choice("weighting", weighting, ("uniform", "examples"))
    if check_float("client_momentum", client_momentum) != 0.0:
        fail("client_momentum", client_momentum, "SCAFFOLD (option II) needs plain local "
             "SGD: its control variate divides the model change by K * client_lr")
    config = ClientConfig(optimizer=optax.sgd(client_lr), local_epochs=local_epochs,
                          batch_size=batch_size, weighting=weighting)
    return Algorithm("scaffold", scaffold_client(model, config, client_lr),
                     scaffold_server(model, server_lr,
                                     weighted_mean() if aggregator is None else aggregator))


__all__ = ["ScaffoldMessage", "ScaffoldServerState", "ScaffoldUpload", "scaffold",
           "scaffold_client", "scaffold_server"]
