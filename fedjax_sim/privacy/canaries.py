"""Canary clients for empirical privacy auditing inside a run.

Andrew et al., "One-shot Empirical Privacy Estimation for Federated Learning" (ICLR 2024):
``m`` canaries, each a random unit direction ``c_j`` in the upload space; each is
independently *inserted* with probability 1/2 (Steinke, Nasr and Jagielski, NeurIPS 2023,
need that coin) or held out. An inserted canary is a client of the population: whenever
the sampler picks it, it uploads ``norm * c_j`` instead of training (``norm`` is the
clip norm, so clipping leaves it as it is: the strongest update DP-FedAvg admits). A
held-out canary never takes part. After training, the auditor compares the model's
movement along inserted and held-out directions (:mod:`fedjax_sim.privacy.auditing`).

What this module guarantees: direction ``j`` is a pure function of ``(key, j)``
(:func:`fedjax_sim.privacy.auditing.canary_direction`), so the client program and the
host-side auditor draw the same vector without a table; canary clients' training
metrics are excluded from the round's (their ``num_examples`` is 0) and their weight is 1
(every client counts 1 in DP-FedAvg's sum). Canaries change training by construction
(they are clients); the audit of a run is of that run, canaries included.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from fedjax_sim._validation import check_float, check_int, fail
from fedjax_sim.algorithms.base import ClientProgram, ClientResult
from fedjax_sim.privacy.auditing import canary_direction, canary_inclusion

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Canaries:
    """The run's canaries.

    Attributes:
      key: the directions' key.
      inserted: ``[m]`` bool, which canaries take part in training.
      client_ids: ``[m_inserted]`` sorted population ids of the inserted canaries (canary
        ``j``'s client is ``client_ids[rank of j among the inserted]``).
      norm: the norm of a canary's upload (the clip norm).
    """

    key: jax.Array
    inserted: np.ndarray
    client_ids: np.ndarray
    norm: float

    @property
    def num(self) -> int:
        return int(len(self.inserted))

    @property
    def inserted_index(self) -> np.ndarray:
        """Canary index of each inserted client, aligned with ``client_ids``."""
        return np.flatnonzero(self.inserted).astype(np.int32)


def make_canaries(key: jax.Array, num: int, num_clients: int, norm: float, *,
                  seed: int) -> Canaries:
    """``num`` canaries, each inserted with probability 1/2, the inserted ones played by
    distinct random clients of a population of ``num_clients`` (seeded by ``seed``)."""
    num = check_int("canaries", num, min_value=2)
    num_clients = check_int("num_clients", num_clients, min_value=1)
    norm = check_float("clip_norm", norm, min_value=0.0, min_exclusive=True)
    inserted = canary_inclusion(seed, num)
    k = int(inserted.sum())
    if min(k, num - k) < 2:
        fail("canaries", num, f"the inclusion coins of seed {seed} inserted {k} of {num}; "
             "each group needs 2 (use more canaries)")
    if k > num_clients:
        fail("canaries", num, f"{k} inserted canaries exceed the {num_clients} clients")
    rng = np.random.default_rng([seed, 0xCA7A])
    ids = np.sort(rng.choice(num_clients, size=k, replace=False)).astype(np.int32)
    return Canaries(key, inserted, ids, norm)


def canary_client(program: ClientProgram, canaries: Canaries,
                  upload_like: PyTree) -> ClientProgram:
    """``program`` where the inserted canaries' clients upload ``norm * c_j``.

    Under vmap the branch is a select: every client of a chunk draws a direction (its
    cost is one ``[params]`` Gaussian draw per client per round) and honest clients keep
    their own result bit for bit.

    Args:
      program: the client program (any algorithm whose upload has a fixed shape).
      canaries: from :func:`make_canaries`.
      upload_like: a pytree shaped like one upload (arrays or ShapeDtypeStructs).
    """
    flat, unravel = ravel_pytree(jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype), upload_like))
    dim = int(flat.shape[0])
    ids = jnp.asarray(canaries.client_ids, jnp.int32)
    index = jnp.asarray(canaries.inserted_index, jnp.int32)
    norm = jnp.float32(canaries.norm)
    key = canaries.key

    def update(message, data, key_c, state=()):
        out = program.update(message, data, key_c, state)
        if ids.shape[0] == 0:
            return out
        pos = jnp.clip(jnp.searchsorted(ids, data.client_id), 0, ids.shape[0] - 1)
        is_canary = (ids[pos] == data.client_id) & (data.client_id >= 0)
        direction = unravel(norm * canary_direction(key, index[pos], dim))
        upload = jax.tree.map(lambda c, u: jnp.where(is_canary, c.astype(u.dtype), u),
                              direction, out.upload)
        weight = jnp.where(is_canary, jnp.float32(1.0), out.weight)
        metrics = dict(out.metrics)
        metrics["num_examples"] = jnp.where(is_canary, 0.0,
                                            metrics.get("num_examples", out.weight))
        return ClientResult(upload, weight, metrics, out.state)

    return dataclasses.replace(program, update=update)


def flat_params(params: PyTree) -> jax.Array:
    """The params as one float32 vector (the space the canaries live in for FedAvg)."""
    return ravel_pytree(params)[0].astype(jnp.float32)


__all__ = ["Canaries", "canary_client", "flat_params", "make_canaries"]
