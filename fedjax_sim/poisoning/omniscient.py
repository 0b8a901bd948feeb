"""Omniscient attacks as a colluding per-client server stage: ALIE and IPM.

A Little Is Enough (Baruch et al. 2019) and inner-product manipulation (Xie et al. 2020)
assume the adversary knows the round's honest updates. One client inside ``vmap`` cannot
see the others, so the simulator models the attack in two halves:

1. the malicious clients run :func:`~fedjax_sim.poisoning.attacks.tag_for_server`: honest
   training, upload tagged with a negative weight;
2. :func:`omniscient_attack`, placed FIRST in the server chain, reads the tag, restores
   the weight, and overwrites the tagged rows from the untagged (honest) rows' statistics.

Every defence after it therefore sees exactly what it would see if the adversary had
computed the rows itself with knowledge of the honest updates (the threat model of both
papers). Masked (padding / non-finite) clients are untouched and stay at weight 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_sim._validation import check_choice, check_float
from fedjax_sim.server.base import CohortUpdates, ServerTransform, zero_masked
from fedjax_sim.server.clipping import require_cohort


def baruch_z(n: jax.Array, m: jax.Array) -> jax.Array:
    """ALIE's z_max for ``n`` clients of which ``m`` are malicious (Baruch et al. 2019).

    ``s = floor(n / 2 + 1) - m`` honest clients must be "recruited"; ``z`` is the normal
    quantile ``Phi^-1((n - s) / n)``, clamped to ``[0, 3]``.
    """
    n = n.astype(jnp.float32)
    s = jnp.floor(n / 2 + 1) - m.astype(jnp.float32)
    p = jnp.clip((n - s) / jnp.maximum(n, 1.0), 0.5, 0.99865)
    return jax.scipy.special.ndtri(p)


def omniscient_attack(kind: str, *, z: float | None = None, epsilon: float = 0.1,
                      signed: bool = True) -> ServerTransform:
    """The server-side half of ALIE (``kind="alie"``) or IPM (``kind="ipm"``).

    ALIE: every tagged row becomes ``mu - z * sigma * sign(mu)`` (``signed=True``) or
    ``mu - z * sigma`` (``signed=False``, the formula as printed), with ``mu, sigma`` the
    per-coordinate mean and standard deviation of the honest rows and ``z`` from
    :func:`baruch_z` when None. The signed form moves every coordinate against the honest
    direction, which is what makes the aggregate's inner product with the honest mean
    negative; the unsigned form only shifts each coordinate down.

    IPM: every tagged row becomes ``-epsilon * mu``.

    Threat model: colluding, omniscient clients (they know all honest updates of the
    round and the aggregation rule); the rows stay within the honest spread, so distance
    and norm based defences do not single them out.

    Args:
      kind: ``"alie"`` or ``"ipm"``.
      z: ALIE's deviation in standard deviations (None: Baruch's z_max of the round).
      epsilon: IPM's scale (> 0).
      signed: ALIE's direction (see above).

    Returns:
      A per-client transform ``CohortUpdates -> CohortUpdates``.
    """
    check_choice("attack", kind, ("alie", "ipm"))
    if z is not None:
        z = check_float("z", z, min_value=0.0)
    epsilon = check_float("epsilon", epsilon, min_value=0.0, min_exclusive=True)

    def init(params):
        del params
        return ()

    def update(value, state):
        require_cohort(f"omniscient_attack({kind})", value)
        tagged = value.mask & (value.weights < 0)
        honest = value.mask & ~tagged
        cohort = zero_masked(CohortUpdates(value.updates, jnp.abs(value.weights), value.mask))
        n_h = jnp.sum(honest).astype(jnp.float32)
        n_t = jnp.sum(tagged)
        zz = baruch_z(jnp.sum(value.mask), n_t) if z is None else jnp.float32(z)

        def forge(u):
            hm = honest.reshape(honest.shape + (1,) * (u.ndim - 1))
            x = jnp.where(hm, u, 0.0).astype(jnp.float32)
            mu = jnp.sum(x, 0) / jnp.maximum(n_h, 1.0)
            var = jnp.sum(jnp.where(hm, jnp.square(x - mu), 0.0), 0) / jnp.maximum(n_h, 1.0)
            sigma = jnp.sqrt(var)
            if kind == "ipm":
                row = -epsilon * mu
            else:
                row = mu - zz * sigma * (jnp.sign(mu) if signed else 1.0)
            tm = tagged.reshape(tagged.shape + (1,) * (u.ndim - 1))
            return jnp.where(tm, row[None].astype(u.dtype), u)

        return CohortUpdates(jax.tree.map(forge, cohort.updates), cohort.weights,
                             cohort.mask), state

    return ServerTransform(init, update, {"name": f"omniscient_{kind}"})
