"""The secure sum: a reducer of the server chain behind which the server sees only a sum.

:func:`secure_sum` is a streaming ``REDUCE`` stage (:mod:`fedjax_sim.server.base`) that
simulates secure aggregation inside the round, with the numerics of a deployment. Every
stage before it runs on the client, inside the chunk; every stage after it sees only
the decoded sum. Per client, in this order (Kairouz, Liu, Steinke 2021):

1. flatten the upload, zero-pad to ``p = 2^ceil(log2 d)``;
2. rotate by a randomised Hadamard transform whose signs all clients of the round share
   (public randomness);
3. clip to L2 norm ``c``;
4. scale by ``gamma`` (:func:`~fedjax_sim.secagg.encoding.choose_scale`: ``k``
   standard deviations of the aggregate, noise included, fit in the ring);
5. round to integers: unbiased stochastic rounding, or, with distributed DP, conditional
   stochastic rounding that retries until the rounded norm is within the inflated bound
   the accounting uses;
6. with distributed DP, add local integer noise: a discrete Gaussian share (Canonne,
   Kamath, Steinke 2020 sampler) or a Skellam share (Agarwal, Kairouz, Liu 2021), of
   variance ``(gamma z c)^2 / m`` (``m`` expected clients);
7. wrap into ``Z_(2^b)`` (``uint32`` words, ``b`` up to 32);
8. optionally mask (pairwise masks with the round's neighbours plus a self mask,
   :mod:`fedjax_sim.secagg.masking`);

then the clients that did not drop out deliver, the server adds mod ``2^b``, removes the
masks it can reconstruct (at least ``t`` surviving neighbours per client, else the round
**aborts**: no model update, nothing revealed), centres, unscales and rotates back.

What is simulated: everything above, bit for bit in the ring, including which clients
drop out (i.i.d. at ``dropout`` or a given set of ids, after the key exchange) and the
threshold rule. **Default mode**: the masks cancel exactly, so the stage sums the
survivors' unmasked ring elements; the result equals the unmasked masked sum exactly
(tests). **full_masking=True** generates every client's pairwise and self masks inside
the chunk and has the server remove them: the same result, at the cost of ``k + 1``
mask vectors per client. Key agreement, encryption and Shamir sharing are modelled by
their cost (the communication ledger) and their threshold semantics.

Threat model: an honest-but-curious server that follows the protocol; it learns the
modular sum of the survivors' encodings and who dropped out, nothing about one upload
(SecAgg+: as long as fewer than ``t`` of a client's neighbours collude with it). Clients
clip and add their noise shares honestly. Distributed DP's guarantee (accounted by
:class:`~fedjax_sim.privacy.distributed.DistributedNoise`) holds against that server
with the survivors' shares only: dropped clients take their noise with them.

What the simulator still knows (the exact sum, the wrapped coordinates, the rounding
error) it reports as ``secagg_*`` metrics: simulator ground truth, not server knowledge.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_sim._chunks import chunked_map
from fedjax_sim._trees import weighted_sum
from fedjax_sim._validation import check_choice, check_float, check_int, fail
from fedjax_sim.comms import Wire, packed_bytes
from fedjax_sim.secagg import masking
from fedjax_sim.secagg.discrete import (conditional_stochastic_round, discrete_gaussian,
                                        skellam)
from fedjax_sim.secagg.encoding import (clip_l2, choose_scale, count_wrapped, decode,
                                        padded_size, rotate, stochastic_round, RingEncoding)
from fedjax_sim.secagg.ring import check_bits, ring_mask, wrap
from fedjax_sim.server.base import CohortUpdates, Counts, Stage, StageKind, stage_key
from fedjax_sim.server.clipping import check_key

PyTree = Any
NOISES = ("none", "ddg", "skellam")
_INT32_SAFE = 2.0**31 - 128
_CLIP_SAFETY = 1.0 - 2.0**-20
_CACHE_FLOATS = 2**17  # floats of rotated updates encoded at once (512 KB)


@dataclasses.dataclass(frozen=True)
class SecureAggregation:
    """The settings of a secure sum (static; validated when built).

    Attributes:
      bits: ``b``, the ring ``Z_(2^b)``, 1 to 32.
      clip_norm: ``c``, each client's L2 bound.
      dim: the upload's number of coordinates ``d``.
      capacity: the most clients in one round (the cohort's static size).
      expected_clients: ``m``, the expected number of clients (local noise, threshold).
      neighbours: ``k``, even; each client masks with ``k`` neighbours (SecAgg+). None:
        every other client (Bonawitz et al. 2017).
      threshold: ``t``, the surviving neighbours a client needs for its masks to be
        removed; None: a majority of its neighbours, ``k // 2 + 1``.
      dropout: i.i.d. probability that a client drops out after the key exchange.
      dropped_ids: population ids that always drop out (instead of, or with, ``dropout``).
      noise: ``"none"``, ``"ddg"`` (distributed discrete Gaussian) or ``"skellam"``.
      noise_multiplier: ``z``: the survivors' shares add up to std ``z c`` (in float
        units) when ``m`` clients survive.
      beta: conditional rounding's parameter (Kairouz et al. 2021; ``exp(-1/2)``).
      k_stddevs: the standard deviations of the aggregate the ring must hold.
      full_masking: generate and remove the masks (else the exact shortcut).
      sum_norm: the L2 bound of the sum of the clipped updates the scale assumes
        (default the worst case, ``capacity * clip_norm``).
      mean: divide the sum by the number of survivors (non-DP FedAvg behind secure
        aggregation); DP chains divide by a fixed expected count instead.
    """

    bits: int
    clip_norm: float
    dim: int
    capacity: int
    expected_clients: float
    neighbours: int | None = None
    threshold: int | None = None
    dropout: float = 0.0
    dropped_ids: tuple[int, ...] = ()
    noise: str = "none"
    noise_multiplier: float = 0.0
    beta: float = math.exp(-0.5)
    k_stddevs: float = 4.0
    full_masking: bool = False
    sum_norm: float | None = None
    mean: bool = False

    def __post_init__(self):
        check_bits(self.bits)
        check_float("clip_norm", self.clip_norm, min_value=0.0, min_exclusive=True)
        check_int("dim", self.dim, min_value=1)
        cap = check_int("cohort_size", self.capacity, min_value=2)
        m = check_float("expected_clients", self.expected_clients, min_value=0.0,
                        min_exclusive=True)
        check_choice("mechanism", self.noise, NOISES)
        z = check_float("noise_multiplier", self.noise_multiplier, min_value=0.0)
        if self.noise != "none" and z <= 0:
            fail("noise_multiplier", z, f"mechanism={self.noise!r} needs noise_multiplier > 0")
        if self.noise == "none" and z > 0:
            fail("noise_multiplier", z, "secure aggregation adds distributed noise only with "
                 "mechanism='ddg' or 'skellam'")
        check_float("beta", self.beta, min_value=0.0, max_value=1.0, max_exclusive=True)
        check_float("dropout", self.dropout, min_value=0.0, max_value=1.0,
                    max_exclusive=True)
        check_float("k_stddevs", self.k_stddevs, min_value=0.0, min_exclusive=True)
        if self.neighbours is not None:
            k = check_int("neighbours", self.neighbours, min_value=2)
            if k % 2:
                fail("neighbours", k, "must be even (a random Harary graph: k/2 on each side)")
            if k >= m:
                fail("neighbours", k, f"must be below the expected cohort {m:g} (leave it "
                     "unset for the complete graph)")
        if self.threshold is not None:
            t = check_int("threshold", self.threshold, min_value=1)
            if t > self.degree:
                fail("threshold", t, f"exceeds the {self.degree} neighbours a client has")
        del cap
        if self.mechanism is not None:
            self.mechanism.check_samplable()  # the int32 samplers draw the shares exactly

    @property
    def degree(self) -> int:
        """The neighbours a client has (the complete graph: the expected cohort less one)."""
        if self.neighbours is not None:
            return self.neighbours
        return max(1, int(round(self.expected_clients)) - 1)

    @property
    def graph_width(self) -> int:
        """The static width of the neighbour lists (even; the complete graph's lists
        hold ``capacity - 1`` rounded up)."""
        if self.neighbours is not None:
            return self.neighbours
        return self.capacity - 1 + (self.capacity - 1) % 2

    @property
    def t(self) -> int:
        return self.threshold if self.threshold is not None else self.degree // 2 + 1

    @property
    def padded(self) -> int:
        return padded_size(self.dim)

    @property
    def scale(self) -> float:
        """``gamma`` (:func:`~fedjax_sim.secagg.encoding.choose_scale` for the capacity)."""
        return choose_scale(self.bits, self.clip_norm, self.dim, self.capacity,
                            k_stddevs=self.k_stddevs, noise_multiplier=self.noise_multiplier,
                            expected_clients=self.expected_clients, sum_norm=self.sum_norm)

    @property
    def mechanism(self):
        """The :class:`~fedjax_sim.privacy.distributed.DistributedNoise` the clients'
        shares make (the ledger's mechanism), or None without noise."""
        if self.noise == "none":
            return None
        from fedjax_sim.privacy.distributed import DistributedNoise
        return DistributedNoise(kind=self.noise, noise_multiplier=self.noise_multiplier,
                                clip_norm=self.clip_norm, bits=self.bits, dim=self.padded,
                                expected_clients=self.expected_clients, scale=self.scale,
                                beta=self.beta)

    @property
    def local_std(self) -> float:
        """Each client's noise share, in ring units: ``gamma z c / sqrt(m)`` (0 without)."""
        return 0.0 if self.mechanism is None else self.mechanism.local_std

    @property
    def norm_bound(self) -> float:
        """The L2 bound of one rounded update in ring units: conditional rounding's
        inflated bound with noise, the worst case ``gamma c + sqrt(p)`` without."""
        if self.mechanism is None:
            return self.scale * self.clip_norm + math.sqrt(self.padded)
        return self.mechanism.l2_sensitivity


class SecAggDiagnostics(NamedTuple):
    """The last round, as the simulator knows it (not what the server learns).

    Attributes:
      survivors: clients whose upload entered the sum.
      dropped: participants that dropped out (or sent a non-finite update).
      wrapped: coordinates of the exact integer sum outside the ring's signed range.
      rounding_error: L2 norm of the sum's rounding error, in the update's units (the
        decoded sum less the noise less the exact sum of the clipped updates).
    """

    survivors: jax.Array
    dropped: jax.Array
    wrapped: jax.Array
    rounding_error: jax.Array


class SecureSumState(NamedTuple):
    """The secure sum's state: its key (split every round), the upload's structure (as
    zero-size arrays) and the last round's diagnostics."""

    key: jax.Array
    template: PyTree
    last: SecAggDiagnostics


class Roster(NamedTuple):
    """A round's protocol: who takes part, the neighbour graph, who drops out."""

    ids: jax.Array
    sampled: jax.Array
    graph: masking.Graph
    dropped: jax.Array
    order: jax.Array


class _Keys(NamedTuple):
    rotation: jax.Array
    graph: jax.Array
    dropout: jax.Array
    masks: jax.Array
    clients: jax.Array


def _keys(state_key: jax.Array) -> _Keys:
    round_key, _ = stage_key(state_key)
    return _Keys(*jax.random.split(round_key, 5))


def _flat(updates: PyTree) -> jax.Array:
    """``[C, d]`` float32: each client's upload flattened."""
    leaves = jax.tree.leaves(updates)
    return jnp.concatenate([x.reshape(x.shape[0], -1).astype(jnp.float32) for x in leaves],
                           axis=1)


def _unflat(vec: jax.Array, template: PyTree) -> PyTree:
    leaves, treedef = jax.tree.flatten(template)
    out, offset = [], 0
    for leaf in leaves:
        shape = leaf.shape[1:]
        size = math.prod(shape)
        out.append(vec[offset:offset + size].reshape(shape).astype(leaf.dtype))
        offset += size
    return jax.tree.unflatten(treedef, out)


def _dropouts(cfg: SecureAggregation, key, ids, participants):
    return masking.dropouts(key, ids, participants, rate=cfg.dropout,
                            dropped_ids=cfg.dropped_ids or None)


def secure_sum(cfg: SecureAggregation, *, key: jax.Array) -> Stage:
    """The secure-sum reducer of ``cfg`` (module docstring).

    Args:
      cfg: the :class:`SecureAggregation` settings.
      key: PRNG key of the protocol (rotation signs, graph, dropout, rounding, noise,
        masks); kept in the state and split every round.

    Returns:
      A streaming ``REDUCE`` stage named ``"secure_sum"``: ``unit_sum`` (every survivor
      counts 1), ``hides_clients``, with the inflated per-client bound (float units) as
      its ``bound``, a distributed-DP ``mechanism`` when noise is on, its ``wire`` (ring
      elements plus the protocol's messages) and its ``secagg_*`` metrics.
    """
    if not isinstance(cfg, SecureAggregation):
        fail("secure", type(cfg).__name__, "must be a SecureAggregation")
    key = check_key("key", key)
    gamma, p, bits = cfg.scale, cfg.padded, cfg.bits
    enc = RingEncoding(bits, cfg.clip_norm, gamma, cfg.dim)
    bound_int = cfg.norm_bound
    local_std = cfg.local_std

    def init(upload):
        d = sum(x.size for x in jax.tree.leaves(upload))
        if d != cfg.dim:
            fail("dim", cfg.dim, f"the upload has {d} coordinates")
        zero = jnp.zeros((), jnp.int32)
        return SecureSumState(key, jax.tree.map(
            lambda x: jnp.zeros((0,) + x.shape, x.dtype), upload),
            SecAggDiagnostics(zero, zero, zero, jnp.zeros((), jnp.float32)))

    def setup(ids, sampled, state):
        k = _keys(state.key)
        graph = masking.neighbour_graph(k.graph, sampled, cfg.graph_width)
        return Roster(ids, sampled, graph, _dropouts(cfg, k.dropout, ids, sampled),
                      jnp.argsort(ids))

    def encode_one(x, client_key, rotation_key):
        round_key, noise_key = jax.random.split(client_key)
        # Clipped a hair inside c, so that ||scaled|| <= gamma c despite float rounding.
        scaled = clip_l2(rotate(x, rotation_key), cfg.clip_norm * _CLIP_SAFETY) * gamma
        if cfg.noise == "none":
            rounded = stochastic_round(scaled, round_key)
        else:
            rounded, accepted = conditional_stochastic_round(
                scaled, round_key, bound_int, input_bound=gamma * cfg.clip_norm)
            rounded = jnp.where(accepted, rounded, 0.0)  # the bound holds unconditionally
        ints = jnp.clip(rounded, -_INT32_SAFE, _INT32_SAFE).astype(jnp.int32)
        if cfg.noise == "ddg":
            noise = discrete_gaussian(noise_key, local_std, (p,))
        elif cfg.noise == "skellam":
            noise = skellam(noise_key, local_std ** 2, (p,))
        else:
            noise = jnp.zeros((p,), jnp.int32)
        # int32 addition wraps mod 2^32, which 2^b divides: the ring value is exact.
        return (wrap(ints + noise, bits), rounded - scaled,
                rounded + noise.astype(jnp.float32))

    def position(roster, ids):
        sorted_ids = roster.ids[roster.order]
        return roster.order[jnp.searchsorted(sorted_ids, ids)]

    def partial(chunk: CohortUpdates, state, roster):
        k = _keys(state.key)
        ids = chunk.client_ids
        if ids is None:
            fail("client_ids", None, "the secure sum keys every client by its id")
        client_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(k.clients, ids)
        # A few clients at a time, so that their rotations stay in a core's cache (the
        # transform is memory-bound: 16 clients of 2^15 floats took 1.8x as long).
        ring, rounding, integers = chunked_map(
            lambda a: encode_one(a[0], a[1], k.rotation), (_flat(chunk.updates), client_keys),
            max(1, _CACHE_FLOATS // p))
        if cfg.full_masking:
            pos = position(roster, ids)
            ring = jax.vmap(lambda u, i: masking.mask_upload(
                u, k.masks, i, roster.ids, roster.graph, bits))(ring, pos)
        survive = chunk.mask & ~_dropouts(cfg, k.dropout, ids, chunk.mask)
        keep = survive[:, None]
        # The float diagnostics are summed as a contraction with the survivors' 0/1
        # weights: XLA:CPU's float reduction over the client axis took 1.6 ms a chunk of
        # 8 x 2^15 (2.5x the whole encoding), the contraction a tenth of that.
        ones = survive.astype(jnp.float32)
        return (jnp.sum(jnp.where(keep, ring, jnp.uint32(0)), axis=0, dtype=jnp.uint32),
                weighted_sum(jnp.where(keep, rounding, 0.0), ones),
                weighted_sum(jnp.where(keep, integers, 0.0), ones))

    def finalize(total, state, roster, arrived):
        k = _keys(state.key)
        ring, rounding, integers = total
        ring = ring & ring_mask(bits)
        participants = roster.sampled
        survivors = participants & arrived & ~roster.dropped
        recovery = masking.check_recovery(roster.graph, participants, survivors, cfg.t)
        if cfg.full_masking:
            ring = masking.unmask(ring, k.masks, roster.ids, roster.graph, participants,
                                  survivors, bits)
        aborted = ~recovery.ok
        n = jnp.sum(survivors.astype(jnp.int32))
        flat = jnp.where(aborted, 0.0, decode(ring, k.rotation, enc))
        if cfg.mean:
            flat = flat / jnp.maximum(n, 1).astype(jnp.float32)
        diag = SecAggDiagnostics(n, jnp.sum((participants & ~survivors).astype(jnp.int32)),
                                 count_wrapped(integers, bits),
                                 (jnp.sqrt(jnp.sum(jnp.square(rounding))) / gamma
                                  ).astype(jnp.float32))
        summed = jnp.where(aborted, 0, n)
        new_state = SecureSumState(stage_key(state.key)[1], state.template, diag)
        return (_unflat(flat, state.template), new_state,
                Counts(summed, summed, aborted))

    def wire(sizes):
        del sizes  # the ring elements: p coordinates of b bits, whatever the leaves
        k = cfg.degree  # protocol_bytes is linear in an even k; average for an odd one
        lo, hi = (masking.protocol_bytes(max(2, k - k % 2), p, bits),
                  masking.protocol_bytes(k + k % 2, p, bits))
        return Wire(packed_bytes(p, bits),
                    (lo.overhead_upload_bytes + hi.overhead_upload_bytes) // 2,
                    (lo.download_bytes + hi.download_bytes) // 2)

    def metrics(state):
        last = state.last
        return {"secagg_survivors": last.survivors, "secagg_dropped": last.dropped,
                "secagg_wrapped": last.wrapped, "secagg_rounding_error": last.rounding_error}

    return Stage("secure_sum", StageKind.REDUCE, init=init, partial=partial,
                 finalize=finalize, setup=setup, hides_clients=True, unit_sum=True,
                 bound=bound_int / gamma, mechanism=cfg.mechanism, wire=wire,
                 metrics=metrics)


__all__ = ["NOISES", "Roster", "SecAggDiagnostics", "SecureAggregation", "SecureSumState",
           "secure_sum"]
