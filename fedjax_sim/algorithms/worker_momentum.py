"""Worker momentum: each client uploads its momentum of uploads, kept across rounds.

Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust Optimization", ICML
2021: every worker ``i`` keeps ``m_i <- (1 - beta) u_i + beta m_i`` and sends ``m_i``
instead of its fresh update ``u_i``. Momentum averages out the honest workers' own noise
(for independent noise of variance ``s^2`` the momentum's stationary variance is
``s^2 (1 - beta) / (1 + beta)``), so a Byzantine vector stands out in distance; their
guarantee for robust aggregation (centred clipping,
:func:`fedjax_sim.server.reducers.centered_clipping`) is for momentum uploads.

In cross-device FL a client is sampled now and then, so its momentum is per-client
persistent state: the round gathers it for the cohort and writes back only the sampled
clients whose uploads were finite; every other client keeps its momentum bit for bit.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_sim._validation import check_float, fail
from fedjax_sim.algorithms.base import ClientProgram, ClientResult

PyTree = Any


class WorkerMomentumState(NamedTuple):
    """One client's state: the wrapped program's own state and its upload momentum."""

    inner: PyTree
    momentum: PyTree


def with_worker_momentum(program: ClientProgram, beta: float) -> ClientProgram:
    """``program`` whose clients upload ``m_i <- (1 - beta) u_i + beta m_i``.

    ``u_i`` is ``program``'s upload; the momentum starts at zeros shaped like
    ``program.upload_like(params)`` and lives across rounds in the client's state, next
    to ``program``'s own (``WorkerMomentumState(inner, momentum)``; ``inner`` is ``()``
    for a stateless program). Weight and metrics are ``program``'s. With ``beta = 0`` the
    upload is ``u_i`` itself. The recursion runs for every sampled client, also one
    without examples (its ``u_i`` is zero with weight 0, so its momentum decays by
    ``beta``); a client that is not sampled, or whose upload is not finite, keeps its
    momentum (the round does not write its state back).

    To model a Byzantine worker that sends arbitrary vectors, wrap the momentum program in
    the adversary (``adversarial_client(with_worker_momentum(p, beta), ...)``): the attack
    then rewrites what is sent. Wrapping the other way round feeds the attacked uploads
    into the malicious client's momentum.

    Args:
      program: the client program whose uploads are averaged (any algorithm's).
      beta: momentum coefficient, ``0 <= beta < 1`` (the paper uses 0.9 or 0.99).

    Returns:
      The :class:`~fedjax_sim.algorithms.ClientProgram` with the same upload structure.
    """
    if not isinstance(program, ClientProgram):
        fail("program", type(program).__name__, "must be a ClientProgram")
    beta = check_float("beta", beta, min_value=0.0, max_value=1.0, max_exclusive=True)
    inner_init = program.init_state

    def init_state(params):
        inner = () if inner_init is None else inner_init(params)
        momentum = jax.tree.map(jnp.zeros_like, program.upload_like(params))
        return WorkerMomentumState(inner, momentum)

    def update(message, data, key, state: WorkerMomentumState):
        out = program.update(message, data, key, state.inner)
        momentum = jax.tree.map(
            lambda u, m: ((1.0 - beta) * u + beta * m).astype(m.dtype),
            out.upload, state.momentum)
        return ClientResult(momentum, out.weight, out.metrics,
                            WorkerMomentumState(out.state, momentum))

    return ClientProgram(update, init_state=init_state, upload_like=program.upload_like)


__all__ = ["WorkerMomentumState", "with_worker_momentum"]
