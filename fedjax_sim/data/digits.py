"""scikit-learn's bundled handwritten digits, partitioned into clients (no download).

``sklearn.datasets.load_digits``: 1797 greyscale 8x8 images of the digits 0-9 with
pixel values 0..16 (UCI optical recognition of handwritten digits, test part). A small,
real, offline image dataset for tests, notebooks and CPU-sized experiments.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedjax_sim._validation import check_choice, check_float, check_int
from fedjax_sim.data.partition import PARTITIONERS, partition_dataset
from fedjax_sim.data.partition import partition_by_name
from fedjax_sim.data.split import CentralTestSplit

__all__ = ["DIGITS_NUM_CLASSES", "digits_federated", "digits_train_test", "load_digits_arrays"]

DIGITS_NUM_CLASSES = 10


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as images.

    Returns:
      ``x`` float32 ``[1797, 8, 8, 1]`` in ``[0, 1]`` and ``y`` int32 ``[1797]``.
    """
    from sklearn.datasets import load_digits  # imported lazily: sklearn is slow to load

    bunch = load_digits()
    x = (np.asarray(bunch.images, np.float32) / 16.0)[..., None]
    return x, np.asarray(bunch.target, np.int32)


def digits_train_test(*, seed: int, test_fraction: float = 0.2
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A seeded, label-stratified train/test split of the digits.

    Args:
      seed: seed of the split (non-negative int).
      test_fraction: fraction of each class held out, in ``(0, 1)``.

    Returns:
      ``train_x, train_y, test_x, test_y`` (inputs ``[n, 8, 8, 1]`` float32, labels int32).
    """
    seed = check_int("seed", seed, min_value=0)
    test_fraction = check_float("test_fraction", test_fraction, min_value=0.0,
                                max_value=1.0, min_exclusive=True, max_exclusive=True)
    x, y = load_digits_arrays()
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), bool)
    for c in range(DIGITS_NUM_CLASSES):
        idx = rng.permutation(np.flatnonzero(y == c))
        test[idx[:int(round(test_fraction * len(idx)))]] = True
    return x[~test], y[~test], x[test], y[test]


def digits_federated(num_clients: int, *, seed: int, partition: str = "dirichlet",
                     alpha: float = 0.5, shards_per_client: int = 2, sigma: float = 1.0,
                     min_examples: int = 1, test_fraction: float = 0.2,
                     max_examples: int | None = None) -> CentralTestSplit:
    """Digits training set partitioned into clients, plus the pooled test set.

    The train/test split and the partition use independent seeds derived from ``seed``.

    Args:
      num_clients: number of clients.
      seed: non-negative int seed of the whole construction.
      partition: ``"dirichlet"``, ``"iid"``, ``"shards"`` or ``"quantity"``.
      alpha: Dirichlet concentration (``dirichlet`` only).
      shards_per_client: shards per client (``shards`` only).
      sigma: log-normal size spread (``quantity`` only).
      min_examples: least examples per client (``dirichlet`` only).
      test_fraction: fraction of each class held out for the test set.
      max_examples: padded client size (default: the largest client).

    Returns:
      ``CentralTestSplit(train, test_x, test_y)``.
    """
    check_choice("partition", partition, PARTITIONERS)
    seed = check_int("seed", seed, min_value=0)
    split_seed, partition_seed = (int(s) for s in
                                  np.random.SeedSequence(seed).generate_state(2))
    train_x, train_y, test_x, test_y = digits_train_test(seed=split_seed,
                                                         test_fraction=test_fraction)
    settings: dict[str, Any] = {
        "dirichlet": {"alpha": alpha, "min_examples": min_examples},
        "iid": {},
        "shards": {"shards_per_client": shards_per_client},
        "quantity": {"sigma": sigma},
    }[partition]
    parts = partition_by_name(partition, train_y, num_clients, seed=partition_seed, **settings)
    train = partition_dataset(train_x, train_y, parts, num_classes=DIGITS_NUM_CLASSES,
                              max_examples=max_examples)
    return CentralTestSplit(train=train, test_x=test_x, test_y=test_y)
