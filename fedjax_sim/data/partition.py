"""Host-side partitioners that split a pooled dataset into clients.

Every partitioner is a pure NumPy function of its arguments and an explicit integer
``seed`` (``np.random.default_rng(seed)``; no global RNG). It returns one index array per
client into the pooled dataset; each client's indices are in random order (so that local
batches are not sorted by label). :func:`partition_dataset` turns the indices into a
padded :class:`~fedjax_sim.data.federated.FederatedData`.

Schemes:

* ``iid``: a random permutation cut into near-equal parts.
* ``dirichlet``: label skew. For every class, the class's examples are split over the
  clients with proportions drawn from ``Dir(alpha * 1_K)`` (Hsu et al. 2019, "Measuring
  the Effects of Non-Identical Data Distribution"; the implementation follows Yurochkin
  et al. 2019 / Li et al. 2021 "NIID-Bench", including its balancing step: a client that
  already holds ``num_examples / num_clients`` examples receives no more). Small ``alpha``
  gives few classes per client; large ``alpha`` approaches IID.
* ``shards``: McMahan et al. 2017's pathological non-IID split: sort by label, cut into
  ``num_clients * shards_per_client`` shards, give each client ``shards_per_client``.
* ``quantity``: quantity skew. Client sizes proportional to ``LogNormal(0, sigma)``
  draws (every client gets at least one example); labels IID.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from fedjax_sim._validation import check_choice, check_float, check_int, fail
from fedjax_sim.data.federated import FederatedData, federated_data_from_clients

__all__ = [
    "PARTITIONERS",
    "dirichlet_partition",
    "iid_partition",
    "partition_by_name",
    "partition_dataset",
    "quantity_skew_partition",
    "shard_partition",
]


def _check_seed(seed: Any) -> int:
    return check_int("seed", seed, min_value=0)


def _check_labels(labels: Any) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        fail("labels.shape", labels.shape, "must be one-dimensional [num_examples]")
    if labels.size == 0:
        fail("labels", "<0 examples>", "must hold at least one example")
    if not np.issubdtype(labels.dtype, np.integer):
        fail("labels.dtype", str(labels.dtype), "must be an integer dtype")
    if labels.min() < 0:
        fail("labels", int(labels.min()), "labels must be >= 0")
    return labels


def _check_num_clients(num_clients: Any, num_examples: int) -> int:
    num_clients = check_int("num_clients", num_clients, min_value=1)
    if num_clients > num_examples:
        fail("num_clients", num_clients, f"must be <= num_examples={num_examples}")
    return num_clients


def _shuffled_parts(rng: np.random.Generator, parts: list[np.ndarray]) -> list[np.ndarray]:
    return [rng.permutation(np.asarray(p, dtype=np.int64)) for p in parts]


def iid_partition(num_examples: int, num_clients: int, *, seed: int) -> list[np.ndarray]:
    """Splits ``range(num_examples)`` uniformly at random into near-equal clients.

    Args:
      num_examples: size of the pooled dataset.
      num_clients: number of clients K (``1 <= K <= num_examples``).
      seed: seed of the NumPy generator.

    Returns:
      K disjoint int64 index arrays covering every example; sizes differ by at most one.
    """
    num_examples = check_int("num_examples", num_examples, min_value=1)
    num_clients = _check_num_clients(num_clients, num_examples)
    rng = np.random.default_rng(_check_seed(seed))
    return list(np.array_split(rng.permutation(num_examples), num_clients))


def dirichlet_partition(labels: Any, num_clients: int, alpha: float, *, seed: int,
                        min_examples: int = 1, max_retries: int = 100,
                        balance: bool = True) -> list[np.ndarray]:
    """Label-skewed split: each class spread over clients with ``Dir(alpha)`` proportions.

    The whole draw is repeated until every client holds at least ``min_examples``
    examples; after ``max_retries`` failed draws a ConfigError says which knob to turn.

    Args:
      labels: ``[M]`` non-negative integer labels of the pooled dataset.
      num_clients: number of clients K.
      alpha: Dirichlet concentration (> 0); smaller means more skew.
      seed: seed of the NumPy generator.
      min_examples: least number of examples per client (``K * min_examples <= M``).
      max_retries: number of draws before giving up.
      balance: apply the NIID-Bench balancing step (clients holding ``M / K`` examples
        or more receive nothing further).

    Returns:
      K disjoint int64 index arrays covering every example.
    """
    labels = _check_labels(labels)
    num_examples = labels.shape[0]
    num_clients = _check_num_clients(num_clients, num_examples)
    alpha = check_float("alpha", alpha, min_value=0.0, min_exclusive=True)
    min_examples = check_int("min_examples", min_examples, min_value=0)
    if num_clients * min_examples > num_examples:
        fail("min_examples", min_examples,
             f"num_clients * min_examples exceeds num_examples={num_examples}")
    max_retries = check_int("max_retries", max_retries, min_value=1)
    rng = np.random.default_rng(_check_seed(seed))
    classes = np.unique(labels)
    for _ in range(max_retries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        sizes = np.zeros(num_clients, dtype=np.int64)
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            p = rng.dirichlet(np.full(num_clients, alpha))
            if balance:
                p = p * (sizes < num_examples / num_clients)
            total = p.sum()
            # Tiny alpha can underflow every proportion to zero; fall back to uniform.
            p = p / total if total > 0 else np.full(num_clients, 1.0 / num_clients)
            cuts = (np.cumsum(p) * len(idx)).astype(np.int64)[:-1]
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].append(chunk)
                sizes[k] += len(chunk)
        if sizes.min() >= min_examples:
            return _shuffled_parts(rng, [np.concatenate(p) for p in parts])
    fail("min_examples", min_examples,
         f"no Dirichlet draw gave every client this many examples in {max_retries} tries "
         f"(alpha={alpha}, num_clients={num_clients}); lower it or raise alpha")
    raise AssertionError("unreachable")


def shard_partition(labels: Any, num_clients: int, shards_per_client: int, *,
                    seed: int) -> list[np.ndarray]:
    """McMahan et al. 2017 pathological non-IID split by label-sorted shards.

    Examples are sorted by label (ties broken at random), cut into
    ``num_clients * shards_per_client`` contiguous shards of near-equal size, and each
    client receives ``shards_per_client`` shards chosen at random, so a client sees at
    most about ``shards_per_client`` distinct labels (one more where a shard straddles
    a label boundary).

    Args:
      labels: ``[M]`` non-negative integer labels.
      num_clients: number of clients K.
      shards_per_client: shards per client (``K * shards_per_client <= M``).
      seed: seed of the NumPy generator.

    Returns:
      K disjoint int64 index arrays covering every example.
    """
    labels = _check_labels(labels)
    num_examples = labels.shape[0]
    num_clients = _check_num_clients(num_clients, num_examples)
    shards_per_client = check_int("shards_per_client", shards_per_client, min_value=1)
    num_shards = num_clients * shards_per_client
    if num_shards > num_examples:
        fail("shards_per_client", shards_per_client,
             f"num_clients * shards_per_client = {num_shards} exceeds "
             f"num_examples={num_examples}")
    rng = np.random.default_rng(_check_seed(seed))
    shuffled = rng.permutation(num_examples)
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    shards = np.array_split(by_label, num_shards)
    order = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return _shuffled_parts(rng, [np.concatenate([shards[s] for s in row]) for row in order])


def quantity_skew_partition(num_examples: int, num_clients: int, *, seed: int,
                            sigma: float = 1.0) -> list[np.ndarray]:
    """Quantity-skewed split: log-normal client sizes, IID labels.

    Client k receives ``1 + n_k`` examples where the remaining ``M - K`` examples are
    shared in proportion to ``w_k ~ LogNormal(0, sigma)`` (largest-remainder rounding).

    Args:
      num_examples: size M of the pooled dataset.
      num_clients: number of clients K (``K <= M``).
      seed: seed of the NumPy generator.
      sigma: log-normal shape (>= 0); 0 gives near-equal sizes, larger is more skewed.

    Returns:
      K disjoint int64 index arrays covering every example, each non-empty.
    """
    num_examples = check_int("num_examples", num_examples, min_value=1)
    num_clients = _check_num_clients(num_clients, num_examples)
    sigma = check_float("sigma", sigma, min_value=0.0)
    rng = np.random.default_rng(_check_seed(seed))
    weights = rng.lognormal(0.0, sigma, size=num_clients)
    share = weights / weights.sum() * (num_examples - num_clients)
    extra = np.floor(share).astype(np.int64)
    leftover = (num_examples - num_clients) - int(extra.sum())
    extra[np.argsort(extra - share, kind="stable")[:leftover]] += 1
    sizes = 1 + extra
    return list(np.split(rng.permutation(num_examples), np.cumsum(sizes)[:-1]))


PARTITIONERS: dict[str, Callable[..., list[np.ndarray]]] = {
    "iid": iid_partition,
    "dirichlet": dirichlet_partition,
    "shards": shard_partition,
    "quantity": quantity_skew_partition,
}


def partition_by_name(name: str, labels: Any, num_clients: int, *, seed: int,
              **kwargs: Any) -> list[np.ndarray]:
    """Runs the partitioner ``PARTITIONERS[name]`` on a labelled pooled dataset.

    Args:
      name: one of ``iid``, ``dirichlet`` (needs ``alpha``), ``shards`` (needs
        ``shards_per_client``), ``quantity`` (takes ``sigma``).
      labels: ``[M]`` integer labels (the label-blind schemes use only ``M``).
      num_clients: number of clients.
      seed: seed of the NumPy generator.
      **kwargs: scheme-specific settings, passed through.

    Returns:
      One int64 index array per client.
    """
    check_choice("partition", name, PARTITIONERS)
    labels = _check_labels(labels)
    if name in ("iid", "quantity"):
        return PARTITIONERS[name](labels.shape[0], num_clients, seed=seed, **kwargs)
    return PARTITIONERS[name](labels, num_clients, seed=seed, **kwargs)


def partition_dataset(x: Any, y: Any, parts: list[Any], *, num_classes: int | None = None,
                      max_examples: int | None = None) -> FederatedData:
    """Gathers a pooled dataset into a padded :class:`FederatedData` by client indices.

    Args:
      x: ``[M, ...]`` pooled inputs.
      y: ``[M]`` pooled integer labels.
      parts: one integer index array per client (e.g. from a partitioner).
      num_classes: label count; defaults to ``max(y) + 1`` over the whole pool.
      max_examples: padded client size; defaults to the largest client (a larger client
        is an error, never silently truncated).

    Returns:
      The federated dataset, client k holding ``x[parts[k]], y[parts[k]]``.
    """
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim < 1 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        fail("y.shape", y.shape, f"must be ({x.shape[0] if x.ndim else '?'},) to match x")
    if len(parts) == 0:
        fail("parts", "<0 clients>", "must hold at least one client")
    if y.size and num_classes is None:
        num_classes = int(y.max()) + 1
    if num_classes is not None:
        num_classes = check_int("num_classes", num_classes, min_value=1)
    index_arrays = []
    for k, part in enumerate(parts):
        part = np.asarray(part)
        if part.ndim != 1 or (part.size and not np.issubdtype(part.dtype, np.integer)):
            fail(f"parts[{k}]", f"<{part.dtype} {part.shape}>",
                 "must be a one-dimensional integer index array")
        if part.size and (part.min() < 0 or part.max() >= x.shape[0]):
            bad = part[(part < 0) | (part >= x.shape[0])][0]
            fail(f"parts[{k}]", int(bad), f"index out of range [0, {x.shape[0]})")
        index_arrays.append(part.astype(np.int64))
    dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32
    return federated_data_from_clients([x[p] for p in index_arrays],
                                       [y[p] for p in index_arrays],
                                       num_classes=num_classes, max_examples=max_examples,
                                       dtype=dtype)
