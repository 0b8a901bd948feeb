"""Train/test bundles returned by the dataset builders."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from fedjax_sim.data.federated import FederatedData


class FederatedSplit(NamedTuple):
    """Federated training data plus per-client held-out test data.

    Attributes:
      train: the training population; client k of ``train`` is client k of ``test``.
      test: held-out examples of the same clients (a client may hold zero of them).
    """

    train: FederatedData
    test: FederatedData


class CentralTestSplit(NamedTuple):
    """Federated training data plus one pooled (centralised) test set.

    Attributes:
      train: the training population.
      test_x: ``[M, ...]`` float32 test inputs.
      test_y: ``[M]`` int32 test labels.
    """

    train: FederatedData
    test_x: np.ndarray
    test_y: np.ndarray
