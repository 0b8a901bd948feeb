"""Loading federated datasets from the user's disk (.npz and LEAF JSON); no downloads.

NumPy ``.npz`` layouts (read with ``allow_pickle=False``):

* **padded** (what :func:`save_npz` writes): ``x`` ``[K, N, ...]`` float inputs,
  ``y`` ``[K, N]`` integer labels, ``counts`` ``[K]`` integer numbers of real examples
  (the first ``counts[k]`` slots of client k are real); optional ``num_classes``
  (integer scalar) and ``client_names`` (``[K]`` strings).
* **flat**: ``x`` ``[M, ...]``, ``y`` ``[M]``, ``client_ids`` ``[M]`` (integers or
  strings) naming each example's client; optional ``num_classes``. Clients are ordered by
  sorted id; examples keep their file order within a client; names are ``str(id)``.

LEAF JSON (Caldas et al. 2018, https://leaf.cmu.edu): a file holds
``{"users": [u, ...], "num_samples": [n, ...], "user_data": {u: {"x": [...],
"y": [...]}}}``. ``x`` must be numeric (one number list per example, optionally reshaped
with ``example_shape``); ``y`` must be integral (``3`` or ``3.0``). Text datasets
(Shakespeare, Sent140) need tokenising first. A directory of ``.json`` files is merged
(a user may appear in one file only); ``load_leaf_split`` reads ``root/train`` and
``root/test``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from fedjax_sim._validation import check_int, fail
from fedjax_sim.data.federated import (FederatedData, federated_data_from_clients,
                                       make_federated_data)

__all__ = ["LoadedFederatedData", "LoadedSplit", "load_leaf", "load_leaf_split",
           "load_npz", "save_npz"]


class LoadedFederatedData(NamedTuple):
    """A loaded dataset and its clients' names (client k is ``client_names[k]``)."""

    data: FederatedData
    client_names: list[str]


class LoadedSplit(NamedTuple):
    """LEAF train and test sets over the same clients, in the same order."""

    train: FederatedData
    test: FederatedData
    client_names: list[str]


def save_npz(path: str | os.PathLike, data: FederatedData, *,
             client_names: list[str] | None = None) -> None:
    """Writes ``data`` in the padded .npz layout (see the module docstring).

    Args:
      path: destination file.
      data: the federated dataset.
      client_names: optional ``[K]`` names stored alongside.
    """
    arrays: dict[str, Any] = {"x": np.asarray(data.x), "y": np.asarray(data.y),
                              "counts": np.asarray(data.counts),
                              "num_classes": np.asarray(data.num_classes, np.int64)}
    if client_names is not None:
        if len(client_names) != data.num_clients:
            fail("client_names", f"<{len(client_names)} names>",
                 f"must name all {data.num_clients} clients")
        arrays["client_names"] = np.asarray([str(n) for n in client_names])
    np.savez(path, **arrays)


def load_npz(path: str | os.PathLike, *, num_classes: int | None = None,
             max_examples: int | None = None) -> LoadedFederatedData:
    """Reads a padded or flat .npz federated dataset (see the module docstring).

    Args:
      path: the .npz file.
      num_classes: overrides the stored/inferred label count.
      max_examples: padded size for the flat layout (default: the largest client).

    Returns:
      The dataset and its client names.
    """
    if not Path(path).is_file():
        fail("path", str(path), "no such file")
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    for key in ("x", "y"):
        if key not in arrays:
            fail("npz key", key, f"missing from {path} (keys: {sorted(arrays)})")
    if ("counts" in arrays) == ("client_ids" in arrays):
        fail("npz keys", sorted(arrays), "need exactly one of 'counts' (padded layout) "
             "or 'client_ids' (flat layout)")
    if num_classes is None and "num_classes" in arrays:
        num_classes = arrays["num_classes"].reshape(()).item()
    if num_classes is not None:
        num_classes = check_int("num_classes", num_classes, min_value=1)
    x = arrays["x"]
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    if "counts" in arrays:
        data = make_federated_data(x, arrays["y"], arrays["counts"], num_classes=num_classes)
        names = ([str(n) for n in arrays["client_names"]] if "client_names" in arrays
                 else [str(k) for k in range(data.num_clients)])
        if len(names) != data.num_clients:
            fail("client_names", f"<{len(names)} names>",
                 f"must name all {data.num_clients} clients")
        return LoadedFederatedData(data, names)
    y, ids = arrays["y"], arrays["client_ids"]
    if y.shape != x.shape[:1] or ids.shape != x.shape[:1]:
        fail("y.shape / client_ids.shape", (y.shape, ids.shape),
             f"must both be ({x.shape[0]},) to match x")
    unique, inverse = np.unique(ids, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    split_at = np.cumsum(np.bincount(inverse, minlength=len(unique)))[:-1]
    parts = np.split(order, split_at)
    data = federated_data_from_clients([x[p] for p in parts], [y[p] for p in parts],
                                       num_classes=num_classes, max_examples=max_examples,
                                       dtype=x.dtype)
    return LoadedFederatedData(data, [str(u) for u in unique])


def _leaf_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".json")
        if not files:
            fail("path", str(path), "directory holds no .json files")
        return files
    fail("path", str(path), "no such file or directory")
    raise AssertionError("unreachable")


def _read_leaf_users(path: Path, example_shape: tuple[int, ...] | None
                     ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Parses one LEAF JSON file into ``{user: (x, y)}`` with validated arrays."""
    try:
        with open(path) as f:
            blob = json.load(f)
    except json.JSONDecodeError as e:
        fail(str(path), f"<line {e.lineno}>", f"is not valid JSON: {e.msg}")
    if not isinstance(blob, dict):
        fail(str(path), type(blob).__name__, "top level must be a JSON object")
    for key in ("users", "user_data"):
        if key not in blob:
            fail(f"{path}: key", key, "is missing")
    users, user_data = blob["users"], blob["user_data"]
    if not isinstance(users, list) or not all(isinstance(u, str) for u in users):
        fail(f"{path}: users", users if not isinstance(users, list) else "<list>",
             "must be a list of strings")
    if not isinstance(user_data, dict):
        fail(f"{path}: user_data", type(user_data).__name__, "must be an object")
    num_samples = blob.get("num_samples")
    if num_samples is not None and (not isinstance(num_samples, list)
                                    or len(num_samples) != len(users)):
        fail(f"{path}: num_samples", "<list>" if isinstance(num_samples, list)
             else num_samples, f"must be a list of {len(users)} counts")
    out = {}
    for i, user in enumerate(users):
        where = f"{path}: user_data[{user!r}]"
        if user in out:
            fail(f"{path}: users", user, "is listed twice")
        entry = user_data.get(user)
        if not isinstance(entry, dict) or "x" not in entry or "y" not in entry:
            fail(where, "<missing>" if entry is None else "<malformed>",
                 "must be an object with keys 'x' and 'y'")
        try:
            x = np.asarray(entry["x"], dtype=np.float32)
        except (TypeError, ValueError):
            fail(f"{where}.x", "<non-numeric or ragged>",
                 "must be a list of equal-length numeric examples")
        try:
            y_raw = np.asarray(entry["y"], dtype=np.float64)
        except (TypeError, ValueError):
            fail(f"{where}.y", "<non-numeric>", "must be a list of integer labels")
        if y_raw.ndim != 1 or len(x) != len(y_raw):
            fail(f"{where}.y", f"<{y_raw.size} labels>", f"must match x ({len(x)} examples)")
        if y_raw.size and (np.any(y_raw != np.round(y_raw)) or y_raw.min() < 0):
            bad = y_raw[(y_raw != np.round(y_raw)) | (y_raw < 0)][0]
            fail(f"{where}.y", float(bad), "labels must be non-negative integers")
        if num_samples is not None and num_samples[i] != len(y_raw):
            fail(f"{path}: num_samples[{i}]", num_samples[i],
                 f"disagrees with {len(y_raw)} examples of user {user!r}")
        if example_shape is not None:
            if len(x) == 0:
                x = x.reshape((0,) + example_shape)
            elif int(np.prod(x.shape[1:])) != int(np.prod(example_shape)):
                fail("example_shape", example_shape,
                     f"does not fit {where}.x examples of shape {x.shape[1:]}")
            x = x.reshape((len(x),) + example_shape)
        out[user] = (x, y_raw.astype(np.int32))
    return out


def _read_leaf_dir(path: str | os.PathLike, example_shape: tuple[int, ...] | None
                   ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    users: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    origin: dict[str, Path] = {}
    for file in _leaf_files(Path(path)):
        for user, xy in _read_leaf_users(file, example_shape).items():
            if user in users:
                fail(f"{file}: users", user, f"already appears in {origin[user]}")
            users[user], origin[user] = xy, file
    if not users:
        fail("path", str(path), "holds no users")
    return users


def _to_federated(users: dict[str, tuple[np.ndarray, np.ndarray]], names: list[str],
                  num_classes: int | None, max_examples: int | None) -> FederatedData:
    shapes = {users[u][0].shape[1:] for u in names if len(users[u][0])}
    if len(shapes) > 1:
        fail("x", f"<example shapes {sorted(shapes)}>", "all users must share one shape")
    shape = shapes.pop() if shapes else (0,)
    xs = [users[u][0] if len(users[u][0]) else np.zeros((0,) + shape, np.float32)
          for u in names]
    return federated_data_from_clients(xs, [users[u][1] for u in names],
                                       num_classes=num_classes, max_examples=max_examples)


def _check_example_shape(example_shape: Any) -> tuple[int, ...] | None:
    if example_shape is None:
        return None
    shape = tuple(example_shape)
    for d in shape:
        check_int("example_shape", d, min_value=1)
    return shape


def load_leaf(path: str | os.PathLike, *, num_classes: int | None = None,
              max_examples: int | None = None,
              example_shape: tuple[int, ...] | None = None) -> LoadedFederatedData:
    """Reads a LEAF JSON file or a directory of them into a :class:`FederatedData`.

    Args:
      path: a ``.json`` file or a directory of ``.json`` files.
      num_classes: label count (default ``max(label) + 1``).
      max_examples: padded client size (default: the largest client).
      example_shape: reshape each flat example to this (e.g. ``(28, 28, 1)``).

    Returns:
      The dataset, clients in file order, and their user names.
    """
    users = _read_leaf_dir(path, _check_example_shape(example_shape))
    names = list(users)
    return LoadedFederatedData(_to_federated(users, names, num_classes, max_examples), names)


def load_leaf_split(root: str | os.PathLike, *, num_classes: int | None = None,
                    max_examples: int | None = None,
                    example_shape: tuple[int, ...] | None = None) -> LoadedSplit:
    """Reads LEAF ``root/train`` and ``root/test`` over the same users.

    Clients follow the training users' order; a training user absent from the test set
    gets zero test examples; a test user absent from the training set is an error.

    Args:
      root: directory holding ``train/`` and ``test/`` (files or directories of .json).
      num_classes: label count (default: ``max(label) + 1`` over train and test).
      max_examples: padded client size of both sets (default: each set's largest).
      example_shape: reshape each flat example to this.

    Returns:
      ``LoadedSplit(train, test, client_names)``.
    """
    example_shape = _check_example_shape(example_shape)
    train = _read_leaf_dir(Path(root) / "train", example_shape)
    test = _read_leaf_dir(Path(root) / "test", example_shape)
    extra = [u for u in test if u not in train]
    if extra:
        fail("test users", extra[0], "do not appear in the training set")
    names = list(train)
    if num_classes is None:
        labels = [y for _, y in list(train.values()) + list(test.values()) if y.size]
        num_classes = int(max(y.max() for y in labels)) + 1 if labels else None
    shape = next((x.shape[1:] for x, _ in train.values() if len(x)), (0,))
    for u in names:
        test.setdefault(u, (np.zeros((0,) + shape, np.float32), np.zeros(0, np.int32)))
    return LoadedSplit(train=_to_federated(train, names, num_classes, max_examples),
                       test=_to_federated(test, names, num_classes, max_examples),
                       client_names=names)
