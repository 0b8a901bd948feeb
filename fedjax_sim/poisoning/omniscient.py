"""Omniscient attacks as a colluding ``COHORT`` stage of the server chain: ALIE and IPM.

A Little Is Enough (Baruch et al. 2019) and inner-product manipulation (Xie et al. 2020)
assume the adversary knows the round's honest updates. One client inside ``vmap`` cannot
see the others, so the simulator models the colluding adversary as a stage placed FIRST
in the chain (before any defence): :func:`omniscient_attack` finds the malicious rows by
the clients' population ids, hands the honest rows to the forging rule as an explicit
argument (``forge(honest, num_malicious)``) and overwrites the malicious rows with its
result. The malicious clients themselves train honestly (their own upload is discarded).

Every defence after it therefore sees exactly what it would see if the adversary had
computed the rows itself with knowledge of the honest updates (the threat model of both
papers). Masked (padding / non-finite) clients are untouched and stay at weight 0. The
stage reads the whole cohort, so a chain containing it does not stream.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from fedjax_sim._trees import expand_to
from fedjax_sim._validation import check_choice, check_float, fail
from fedjax_sim.server.base import CohortUpdates, Stage, StageKind

PyTree = Any


def baruch_z(n: jax.Array, m: jax.Array) -> jax.Array:
    """ALIE's z_max for ``n`` clients of which ``m`` are malicious (Baruch et al. 2019).

    ``s = floor(n / 2 + 1) - m`` honest clients must be "recruited"; ``z`` is the normal
    quantile ``Phi^-1((n - s) / n)``, clamped to ``[0, 3]``.
    """
    n = n.astype(jnp.float32)
    s = jnp.floor(n / 2 + 1) - m.astype(jnp.float32)
    p = jnp.clip((n - s) / jnp.maximum(n, 1.0), 0.5, 0.99865)
    return jax.scipy.special.ndtri(p)


def honest_statistics(honest: CohortUpdates) -> tuple[PyTree, PyTree]:
    """Per-coordinate mean and standard deviation of the rows with ``honest.mask``."""
    n = jnp.maximum(jnp.sum(honest.mask).astype(jnp.float32), 1.0)

    def moments(u):
        hm = expand_to(honest.mask, u)
        x = jnp.where(hm, u, 0.0).astype(jnp.float32)
        mu = jnp.sum(x, 0) / n
        var = jnp.sum(jnp.where(hm, jnp.square(x - mu[None]), 0.0), 0) / n
        return mu, jnp.sqrt(var)

    stats = jax.tree.map(moments, honest.updates)
    is_pair = lambda t: isinstance(t, tuple)  # noqa: E731
    return (jax.tree.map(lambda t: t[0], stats, is_leaf=is_pair),
            jax.tree.map(lambda t: t[1], stats, is_leaf=is_pair))


def alie_forge(z: float | None = None, signed: bool = True
               ) -> Callable[[CohortUpdates, jax.Array], PyTree]:
    """ALIE's row from the honest uploads: ``mu - z * sigma * sign(mu)`` (``signed``) or
    ``mu - z * sigma`` (the formula as printed), ``z`` from :func:`baruch_z` when None."""

    def forge(honest: CohortUpdates, num_malicious: jax.Array) -> PyTree:
        mu, sigma = honest_statistics(honest)
        n = jnp.sum(honest.mask) + num_malicious
        zz = baruch_z(n, num_malicious) if z is None else jnp.float32(z)
        return jax.tree.map(lambda m, s: m - zz * s * (jnp.sign(m) if signed else 1.0),
                            mu, sigma)

    return forge


def ipm_forge(epsilon: float) -> Callable[[CohortUpdates, jax.Array], PyTree]:
    """IPM's row from the honest uploads: ``-epsilon * mu``."""

    def forge(honest: CohortUpdates, num_malicious: jax.Array) -> PyTree:
        mu, _ = honest_statistics(honest)
        return jax.tree.map(lambda m: -epsilon * m, mu)

    return forge


def omniscient_attack(kind: str, is_malicious: Callable[[jax.Array], jax.Array], *,
                      z: float | None = None, epsilon: float = 0.1,
                      signed: bool = True) -> Stage:
    """The colluding server-side stage of ALIE (``kind="alie"``) or IPM (``kind="ipm"``).

    ALIE: every malicious row becomes ``mu - z * sigma * sign(mu)`` (``signed=True``) or
    ``mu - z * sigma`` (``signed=False``, the formula as printed), with ``mu, sigma`` the
    per-coordinate mean and standard deviation of the honest rows and ``z`` from
    :func:`baruch_z` when None. The signed form moves every coordinate against the honest
    direction, which is what makes the aggregate's inner product with the honest mean
    negative; the unsigned form only shifts each coordinate down.

    IPM: every malicious row becomes ``-epsilon * mu``.

    Threat model: colluding, omniscient clients (they know all honest updates of the
    round and the aggregation rule); the rows stay within the honest spread, so distance
    and norm based defences do not single them out.

    Args:
      kind: ``"alie"`` or ``"ipm"``.
      is_malicious: the adversary's predicate on population ids.
      z: ALIE's deviation in standard deviations (None: Baruch's z_max of the round).
      epsilon: IPM's scale (> 0).
      signed: ALIE's direction (see above).

    Returns:
      A ``COHORT`` stage (put it first in the chain). It needs the cohort's client ids.
    """
    check_choice("attack", kind, ("alie", "ipm"))
    if z is not None:
        z = check_float("z", z, min_value=0.0)
    epsilon = check_float("epsilon", epsilon, min_value=0.0, min_exclusive=True)
    forge = alie_forge(z, signed) if kind == "alie" else ipm_forge(epsilon)

    def apply(cohort: CohortUpdates, state):
        if cohort.client_ids is None:
            fail("client_ids", None, f"omniscient_attack({kind}) finds the malicious rows "
                 "by client id; the cohort carries none")
        malicious = cohort.mask & is_malicious(cohort.client_ids)
        honest = cohort._replace(mask=cohort.mask & ~malicious)
        row = forge(honest, jnp.sum(malicious))
        updates = jax.tree.map(
            lambda u, r: jnp.where(expand_to(malicious, u), r[None].astype(u.dtype), u),
            cohort.updates, row)
        return cohort._replace(updates=updates), state

    return Stage(f"omniscient_{kind}", StageKind.COHORT, apply=apply)
