"""Pairwise masking of secure aggregation, simulated exactly and vectorised over the cohort.

The masking layer of SecAgg (Bonawitz et al. 2017, "Practical Secure Aggregation for
Privacy-Preserving Machine Learning") with the sparse neighbour graph of SecAgg+ (Bell et
al. 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead"). Each
participant ``u`` uploads, in the ring ``Z_(2^b)`` of :mod:`fedjax_sim.secagg.ring`,

    y_u = x_u + PRG(b_u) + sum_{v in N(u), v > u} PRG(s_uv) - sum_{v in N(u), v < u} PRG(s_uv)

(``>``/``<`` compare population ids: the lower id adds a pair's mask, the higher subtracts
it). Summed over a set of survivors ``S`` the pairwise masks between survivors cancel; the
server removes every survivor's self mask ``PRG(b_u)`` and, for each dropped participant
``d``, the masks its surviving neighbours put on for it. The result is the modular sum of
the survivors' encodings, bit for bit.

What is simulated (computed, exactly):
  * mask generation: every mask is a Threefry counter-mode stream under a key folded
    from the round's key, a domain tag and population ids (never positions; ids must be
    distinct among the participants), reduced mod ``2^b``; so a mask is uniform over
    ``Z_(2^b)`` and a client's masks do not depend on where in the cohort, or in which
    chunk, it is processed;
  * cancellation and the server's removal (:func:`unmask`), in ``uint32`` wrap-around;
  * the neighbour graph (:func:`neighbour_graph`, SecAgg+'s random Harary graph);
  * dropout after the key-sharing phase (:func:`dropouts`) and the threshold semantics
    of reconstruction (:func:`check_recovery`): the round aborts exactly when the real
    protocol could not reconstruct a secret it needs.
What is modelled by cost and threshold semantics only (:func:`protocol_bytes`): the key
agreement (X25519 Diffie-Hellman giving ``s_uv``; here a seed folded from the two ids),
the Shamir sharing of ``b_u`` and of the pairwise secret key (here the server simply
knows the seeds once :func:`check_recovery` says ``t`` shares would reach it; see
:mod:`fedjax_sim.secagg.shamir` for the sharing itself), the authenticated encryption of
shares (AES-GCM) and, in the actively secure variant, the signatures and the
consistency-check round. The simulator's seeds are not secret from the simulator: this
module reproduces the protocol's arithmetic and its failure modes, not its cryptography.
A client in ``survivors`` is assumed to answer the unmasking round too (one dropout
event per client per round).

Threat model: an honest-but-curious server and semi-honest clients (they follow the
protocol; the server may collude with a fraction ``gamma`` of them). Every single masked
upload is uniform over ``Z_(2^b)`` (the self mask alone makes it so); the server learns
the sum of the survivors' inputs and, by the masking, nothing else about honest inputs
as long as the masking graph restricted to the honest survivors is connected (each
connected component would reveal its own sum). Bell et al. choose the degree ``k =
O(log n)`` so that the random Harary graph stays connected after removing a ``delta``
fraction of dropouts and a ``gamma`` fraction of corrupted clients, except with
probability ``2^-sigma``; against a server that may lie about who dropped
(semi-malicious) they take ``t`` above half the neighbourhood (so honest neighbours never
hand over ``t`` shares of both secrets of one client) and guarantee that every sum the
server learns covers at least ``alpha * n`` honest clients (their abstract: with
``n = 10^4``, 5% corrupt and 5% dropouts, each input is summed with at least 5000
others). With ``k >= n - 1`` the graph is complete and this is the original protocol of
Bonawitz et al., whose server aborts when fewer than ``t`` clients survive.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_sim._threefry import stream_bits
from fedjax_sim._validation import check_float, check_int, fail
from fedjax_sim.secagg.ring import check_bits, ring_mask, ring_sum

# Domain tags folded into the round key before any id, so the self masks, the pairwise
# masks and the dropout draws are independent streams even under one key.
_SELF_TAG, _PAIR_TAG, _DROP_TAG = 0x5E1F, 0x9A18, 0xD809


class Graph(NamedTuple):
    """Who shares masks with whom: ``neighbours [C, k]`` positions (-1 where absent, the
    absent entries last) and ``degree [C]`` (0 for non-participants)."""

    neighbours: jax.Array
    degree: jax.Array


class Recovery(NamedTuple):
    """Whether the server can finish the round (``ok``, scalar bool), and each position's
    number of surviving neighbours ``[C] int32`` (0 for non-participants)."""

    ok: jax.Array
    surviving_neighbours: jax.Array


def check_degree(k: int, field: str = "k") -> int:
    """``k`` as an even int ``>= 2`` (one-line ConfigError naming ``field`` else)."""
    k = check_int(field, k, min_value=2)
    if k % 2:
        fail(field, k, "must be even (a Harary graph joins each slot to k/2 on each side)")
    return k


def check_threshold(threshold: int, k: int, field: str = "threshold") -> int:
    """``threshold`` as an int in ``[1, k]`` (a secret is split into ``k`` shares)."""
    return check_int(field, threshold, min_value=1, max_value=check_degree(k))


def _check_cohort(name: str, x: jax.Array, dtype) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim != 1 or x.dtype != dtype:
        raise TypeError(f"{name}: expects a [C] {jnp.dtype(dtype).name} array, got "
                        f"{x.dtype}{list(x.shape)}")
    return x


def neighbour_graph(key: jax.Array, participants: jax.Array, k: int) -> Graph:
    """SecAgg+'s random Harary graph ``H(n, k)`` over the ``n`` participants (n traced).

    A uniformly random permutation puts the participants on slots ``0..n-1``; slot ``s``
    is joined to slots ``s +- 1, ..., s +- k/2 (mod n)``. For ``n > k`` these ``k`` slots
    are distinct and differ from ``s`` (``j + j' <= k < n``), so the graph is ``k``-regular,
    symmetric, without loops or duplicates. For ``n <= k + 1`` (``k >= n - 1``) it is the
    complete graph among the participants (degree ``n - 1``): slot ``s`` lists
    ``s + 1, ..., s + n - 1 (mod n)``; ``n = k + 1`` gives the same graph both ways.
    Non-participants have no neighbours and are in nobody's list.

    Args:
      key: the round's graph key (the server's randomness, public to the clients).
      participants: ``[C]`` bool.
      k: the degree, even, ``>= 2``, static.

    Returns:
      A :class:`Graph` of positions.
    """
    k = check_degree(k)
    participants = _check_cohort("neighbour_graph", participants, jnp.bool_)
    cap = participants.shape[0]
    n = jnp.sum(participants, dtype=jnp.int32)
    perm = jax.random.permutation(key, cap).astype(jnp.int32)
    # Participants first, in the random order of ``perm``: ``order[slot] = position``.
    order = perm[jnp.argsort((~participants[perm]).astype(jnp.int32), stable=True)]
    slot = jnp.zeros((cap,), jnp.int32).at[order].set(jnp.arange(cap, dtype=jnp.int32))
    half = jnp.arange(1, k // 2 + 1, dtype=jnp.int32)
    harary = jnp.concatenate([half, -half])                  # n > k: k distinct offsets
    complete = jnp.arange(1, k + 1, dtype=jnp.int32)         # n <= k: offsets 1..n-1
    regular = n > k
    offsets = jnp.where(regular, harary, complete)
    valid = regular | (complete <= n - 1)
    nb_slot = jnp.mod(slot[:, None] + offsets[None, :], jnp.maximum(n, 1))
    ok = valid[None, :] & participants[:, None]
    neighbours = jnp.where(ok, order[nb_slot], -1)
    return Graph(neighbours, jnp.sum(ok, axis=1, dtype=jnp.int32))


def dropouts(key: jax.Array, ids: jax.Array, participants: jax.Array, *, rate: float = 0.0,
             dropped_ids: Iterable[int] | None = None) -> jax.Array:
    """Which participants drop out after sharing keys, before their masked input arrives.

    A participant drops with probability ``rate``, i.i.d., keyed by
    ``fold_in(fold_in(key, tag), id)`` (so the draw follows the client, not its position),
    or when its population id is in ``dropped_ids`` (static: under ``jax.jit`` pass a
    tuple as a static argument); both may be given (union). Padding and non-participants
    never drop. ``rate`` must lie in ``[0, 1)``.

    Returns:
      ``[C]`` bool, True = dropped.
    """
    rate = check_float("rate", rate, min_value=0.0, max_value=1.0,
                       max_exclusive=True)
    ids = _check_cohort("dropouts", ids, jnp.int32)
    participants = _check_cohort("dropouts", participants, jnp.bool_)
    dropped = jnp.zeros(ids.shape, jnp.bool_)
    if rate > 0.0:
        tagged = jax.random.fold_in(key, _DROP_TAG)
        u = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(tagged, i)))(ids)
        dropped = u < jnp.float32(rate)
    if dropped_ids is not None:
        listed = sorted({check_int("dropped_ids", i, min_value=0) for i in dropped_ids})
        if listed:
            dropped = dropped | jnp.isin(ids, jnp.asarray(listed, jnp.int32))
    return dropped & participants & (ids >= 0)


def check_recovery(graph: Graph, participants: jax.Array, survivors: jax.Array,
                   threshold: int) -> Recovery:
    """Whether the server can reconstruct every secret it needs, with threshold ``t``.

    Each participant's secrets are Shamir-shared ``t``-out-of-``k`` among its neighbours:
    the server needs ``t`` shares of a survivor's self-mask seed and of a dropped client's
    pairwise secret key, and only surviving neighbours answer. So the round completes iff
    every participant (survivor or dropped, as in Flower's SecAgg+ workflow) has at least
    ``t`` surviving neighbours, and at least ``t`` clients survive overall (Bonawitz et al.
    abort whenever fewer than ``t`` clients answer a round; with participants present
    this is implied by the first condition, and it makes a round without survivors, or
    without participants, abort). Otherwise the round aborts and nothing is released.
    """
    t = check_threshold(threshold, graph.neighbours.shape[1])
    participants = _check_cohort("check_recovery", participants, jnp.bool_)
    survivors = _check_cohort("check_recovery", survivors, jnp.bool_) & participants
    nb = graph.neighbours
    alive = (nb >= 0) & survivors[jnp.maximum(nb, 0)]
    count = jnp.where(participants, jnp.sum(alive, axis=1, dtype=jnp.int32), 0)
    enough = jnp.all(~participants | (count >= t))
    total = jnp.sum(survivors, dtype=jnp.int32)
    return Recovery(enough & (total >= t), count)


def _stream(key: jax.Array, stream: jax.Array, p: int, bits: int) -> jax.Array:
    """``p`` uniform words of ``Z_(2^b)``: Threefry-2x32 in counter mode on the counters
    ``(i, stream)`` (:func:`fedjax_sim._threefry.stream_bits`: the same hash as
    ``jax.random``, unrolled into one fused kernel; it compiles about a quarter faster
    here). Other PRNG implementations fall back to ``jax.random.bits``."""
    return stream_bits(key, jnp.asarray(stream).astype(jnp.uint32), p) & ring_mask(bits)


def _pair_bits(pair_key: jax.Array, id_a: jax.Array, id_b: jax.Array, p: int,
               bits: int) -> jax.Array:
    lo, hi = jnp.minimum(id_a, id_b), jnp.maximum(id_a, id_b)
    return _stream(jax.random.fold_in(pair_key, lo), hi, p, bits)


def pair_mask(key: jax.Array, id_a: jax.Array, id_b: jax.Array, p: int,
              bits: int) -> jax.Array:
    """The mask ``PRG(s_ab)`` of the pair ``{a, b}``: ``[p]`` uint32, uniform over
    ``Z_(2^b)``, symmetric in ``(a, b)``: stream ``max(a, b)`` under the key
    ``fold_in(key', min(a, b))``, ``key'`` the round key folded with a pairwise-domain
    tag. The client with the lower id adds it, the other subtracts it."""
    p = check_int("p", p, min_value=1)
    return _pair_bits(jax.random.fold_in(key, _PAIR_TAG), id_a, id_b, p, check_bits(bits))


def self_mask(key: jax.Array, client_id: jax.Array, p: int, bits: int) -> jax.Array:
    """The self mask ``PRG(b_u)`` of client ``client_id``: ``[p]`` uint32 over
    ``Z_(2^b)``."""
    p = check_int("p", p, min_value=1)
    return _stream(jax.random.fold_in(key, _SELF_TAG), client_id, p, check_bits(bits))


def _signed_pair_sum(key: jax.Array, own_id: jax.Array, other_ids: jax.Array,
                     include: jax.Array, p: int, bits: int) -> jax.Array:
    """``sum_j +-PRG(s_(own, j))`` over the included ``j`` (+ when ``own`` is lower), mod
    ``2^32``; a loop over the ``k`` neighbours keeps one ``[p]`` vector live."""
    pair_key = jax.random.fold_in(key, _PAIR_TAG)  # hoisted out of the loop

    def body(j, acc):
        m = _pair_bits(pair_key, own_id, other_ids[j], p, bits)
        signed = jnp.where(own_id < other_ids[j], m, jnp.uint32(0) - m)
        return acc + jnp.where(include[j], signed, jnp.uint32(0))

    return jax.lax.fori_loop(0, other_ids.shape[0], body, jnp.zeros((p,), jnp.uint32))


def client_mask(key: jax.Array, position: jax.Array, ids: jax.Array, graph: Graph, p: int,
                bits: int) -> jax.Array:
    """The total mask of the client at ``position``: its self mask plus its signed
    pairwise masks with every neighbour, ``[p]`` uint32 mod ``2^b``. Vmappable over
    ``position``; depends on the client's id and its neighbours' ids, not on positions."""
    b = check_bits(bits)
    nb = graph.neighbours[position]
    own = ids[position]
    pairs = _signed_pair_sum(key, own, ids[jnp.maximum(nb, 0)], nb >= 0, p, b)
    return (self_mask(key, own, p, b) + pairs) & ring_mask(b)


def mask_upload(encoded: jax.Array, key: jax.Array, position: jax.Array, ids: jax.Array,
                graph: Graph, bits: int) -> jax.Array:
    """What the client at ``position`` uploads: its ``[p]`` uint32 encoding plus
    :func:`client_mask`, mod ``2^b``."""
    encoded = jnp.asarray(encoded)
    if encoded.ndim != 1 or encoded.dtype != jnp.uint32:
        raise TypeError(f"mask_upload: expects [p] uint32 ring elements, got "
                        f"{encoded.dtype}{list(encoded.shape)}")
    mask = client_mask(key, position, ids, graph, encoded.shape[0], bits)
    return (encoded + mask) & ring_mask(bits)


def unmask(masked_sum: jax.Array, key: jax.Array, ids: jax.Array, graph: Graph,
           participants: jax.Array, survivors: jax.Array, bits: int) -> jax.Array:
    """The server's removal of the masks from the modular sum of the survivors' uploads.

    Subtracts every survivor's self mask and, for each dropped participant ``d`` and each
    surviving neighbour ``j`` of ``d``, the pairwise mask ``j`` put on for ``d``; what is
    left is the modular sum of the survivors' encodings, exactly. That is the sum the
    real server obtains only when :func:`check_recovery` is ``ok``; the caller aborts
    the round otherwise (the simulator's arithmetic itself does not need the shares).

    Vectorised over the cohort: memory ``O(C p)`` words, like the uploads themselves.

    Args:
      masked_sum: ``[p]`` uint32, the sum mod ``2^b`` of the survivors' uploads.
      key: the round's masking key (as given to :func:`mask_upload`).
      ids, graph, participants, survivors: ``[C]`` population ids, the graph, and two
        ``[C]`` bool masks (survivors outside the participants are ignored).
      bits: the ring's width ``b``.

    Returns:
      ``[p]`` uint32 mod ``2^b``.
    """
    b = check_bits(bits)
    masked_sum = jnp.asarray(masked_sum)
    if masked_sum.ndim != 1 or masked_sum.dtype != jnp.uint32:
        raise TypeError(f"unmask: expects a [p] uint32 sum, got "
                        f"{masked_sum.dtype}{list(masked_sum.shape)}")
    p = masked_sum.shape[0]
    ids = _check_cohort("unmask", ids, jnp.int32)
    participants = _check_cohort("unmask", participants, jnp.bool_)
    survivors = _check_cohort("unmask", survivors, jnp.bool_) & participants
    dropped = participants & ~survivors

    def removal(position):
        # What survivor ``position`` added that does not cancel in the sum: its self mask
        # and its signed masks with dropped neighbours (exactly the masks the server
        # reconstructs from the dropped clients' secret keys).
        nb = graph.neighbours[position]
        safe = jnp.maximum(nb, 0)
        own = ids[position]
        pairs = _signed_pair_sum(key, own, ids[safe], (nb >= 0) & dropped[safe], p, b)
        return jnp.where(survivors[position], self_mask(key, own, p, b) + pairs,
                         jnp.uint32(0))

    cap = ids.shape[0]
    total = ring_sum(jax.vmap(removal)(jnp.arange(cap, dtype=jnp.int32)), b)
    return (masked_sum - total) & ring_mask(b)


# --- Communication cost of SecAgg+ (modelled, not simulated) -----------------------------

PUBLIC_KEY_BYTES = 32
"""An X25519 public key (RFC 7748); each client advertises two: ``c^PK`` for encrypting
shares and ``s^PK`` for the pairwise masks (Bonawitz et al. 2017, round 0; Flower's
SecAgg+ sends ``pk1``, ``pk2``)."""
ID_BYTES = 8
"""A client id on the wire (Flower's SecAgg+ packs node ids as 8-byte integers)."""
SHARE_BYTES = 32
"""One Shamir share of a 32-byte secret (the 256-bit self-mask seed ``b_u``, or the
X25519 secret key ``s^SK``): one element of a field of at least 256 bits; the share's
x-coordinate is the recipient's id, already addressed."""
AEAD_OVERHEAD_BYTES = 28
"""AES-GCM's 12-byte nonce (the 96-bit IV of NIST SP 800-38D) and 16-byte tag."""
SHARE_PLAINTEXT_BYTES = 2 * ID_BYTES + 2 * SHARE_BYTES
"""``u || v || share(s_u^SK) || share(b_u)`` (Bonawitz et al. 2017, round 1): 80 bytes."""
SHARE_CIPHERTEXT_BYTES = SHARE_PLAINTEXT_BYTES + AEAD_OVERHEAD_BYTES
"""108 bytes."""


class ProtocolCost(NamedTuple):
    """Per-client bytes of one round of SecAgg+ (all four protocol rounds together).

    ``upload_bytes`` includes ``masked_input_bytes`` (``ceil(p b / 8)``, the packed
    masked vector); ``download_bytes`` counts what the server sends the client for the
    protocol (not the model broadcast)."""

    upload_bytes: int
    download_bytes: int
    masked_input_bytes: int

    @property
    def overhead_upload_bytes(self) -> int:
        """The upload beyond the masked input: keys, shares and unmasking."""
        return self.upload_bytes - self.masked_input_bytes


def protocol_bytes(k: int, padded_dim: int, bits: int) -> ProtocolCost:
    """Per-client upload and download bytes of SecAgg+ with ``k`` neighbours.

    The four rounds of Bonawitz et al. 2017 over the neighbourhood of Bell et al. 2020,
    every client assumed to survive (an upper bound for the unmasking round):

    * AdvertiseKeys: upload 2 public keys (``2 * 32``); download each neighbour's id and
      2 public keys (``k * (8 + 64)``).
    * ShareKeys: upload one AES-GCM ciphertext per neighbour with its destination id
      (``k * (108 + 8)``); download the ``k`` ciphertexts addressed to the client with
      their source ids (``k * (108 + 8)``).
    * MaskedInputCollection: upload ``ceil(p b / 8)`` bytes; download the survivor list
      restricted to the neighbourhood (``k * 8``).
    * Unmasking: upload, per neighbour, its id and one share (of ``b_v`` if it survived,
      of ``s_v^SK`` if it dropped): ``k * (8 + 32)``.

    Constants: :data:`PUBLIC_KEY_BYTES` (32, X25519), :data:`ID_BYTES` (8),
    :data:`SHARE_BYTES` (32), :data:`AEAD_OVERHEAD_BYTES` (28, AES-GCM nonce + tag).
    Not counted: signatures and the consistency-check round of the actively secure
    variant (this simulator's threat model is semi-honest), transport framing, and the
    model broadcast. Key agreement, encryption and secret sharing are modelled only by
    these sizes (and by :func:`check_recovery`'s threshold), never computed.
    """
    k = check_degree(k)
    p = check_int("padded_dim", padded_dim, min_value=1)
    b = check_bits(bits)
    masked = (p * b + 7) // 8  # ceil(p b / 8), exactly
    per_ciphertext = SHARE_CIPHERTEXT_BYTES + ID_BYTES
    upload = (2 * PUBLIC_KEY_BYTES + k * per_ciphertext + masked
              + k * (ID_BYTES + SHARE_BYTES))
    download = (k * (ID_BYTES + 2 * PUBLIC_KEY_BYTES) + k * per_ciphertext + k * ID_BYTES)
    return ProtocolCost(int(upload), int(download), int(masked))


__all__ = ["AEAD_OVERHEAD_BYTES", "Graph", "ID_BYTES", "PUBLIC_KEY_BYTES", "ProtocolCost",
           "Recovery", "SHARE_BYTES", "SHARE_CIPHERTEXT_BYTES", "SHARE_PLAINTEXT_BYTES",
           "check_degree", "check_recovery", "check_threshold", "client_mask", "dropouts",
           "mask_upload", "neighbour_graph", "pair_mask", "protocol_bytes", "self_mask",
           "unmask"]
