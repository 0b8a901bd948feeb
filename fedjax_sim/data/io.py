"""Loading federated datasets from the user's disk (.npz and LEAF JSON); no downloads.

NumPy ``.npz`` layouts:

* **padded** (what :func:`save_npz` writes): ``x`` ``[K, N, ...]`` numeric inputs,
  ``y`` ``[K, N]`` integer labels, ``counts`` ``[K]`` integer numbers of real examples
  (the first ``counts[k]`` slots of client k are real); optional ``num_classes``
  (integer scalar) and ``client_names`` (``[K]`` strings).
* **flat**: ``x`` ``[M, ...]``, ``y`` ``[M]``, ``client_ids`` ``[M]`` (integers or
  strings) naming each example's client; optional ``num_classes``. Clients are ordered by
  sorted id; examples keep their file order within a client; names are ``str(id)``.

LEAF JSON (Caldas et al. 2018, https://leaf.cmu.edu): a UTF-8 file holds
``{"users": [u, ...], "num_samples": [n, ...], "user_data": {u: {"x": [...],
"y": [...]}}}``. ``x`` must be numeric (one number list per example, optionally reshaped
with ``example_shape``); ``y`` must be integral (``3`` or ``3.0``). Text datasets
(Shakespeare, Sent140) need tokenising first. A directory of ``.json`` files is merged
(a user may appear in one file only); ``load_leaf_split`` reads ``root/train`` and
``root/test``.

Guaranteed for any file: a loader returns validated data or raises a one-line
:class:`~fedjax_sim._validation.ConfigError` naming the path's ``field`` (the CLI's
``data_path``), the file, and the offending key or value; nothing else escapes. Nothing
is unpickled (``allow_pickle=False``; object, string, structured and complex members are
refused from their headers, unread). Sizes are checked before they are allocated
(:func:`~fedjax_sim._validation.check_fits`): the arrays an ``.npz`` header declares, a
JSON file's text, the padded ``[K, N, ...]`` arrays. Inputs become float32 and must be
finite; labels are integers in ``[0, num_classes)``, below :data:`MAX_NUM_CLASSES`;
examples have at least one axis and no empty one.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from fedjax_sim._validation import ConfigError, check_fits, check_int, fail
from fedjax_sim.data.federated import (FederatedData, federated_data_from_clients,
                                       make_federated_data, padded_bytes)

__all__ = ["LoadedFederatedData", "LoadedSplit", "MAX_NUM_CLASSES", "check_source_path",
           "load_leaf", "load_leaf_split", "load_npz", "save_npz"]

MAX_NUM_CLASSES = 2**24
"""The most classes a loaded dataset may have: a label ``l`` implies ``l + 1`` classes,
and every class costs a row of the model's output layer and of every logits array."""

# The NumPy dtype kinds each .npz key may hold; other keys are never read.
_NPZ_KINDS = {"x": "biuf", "y": "iu", "counts": "iu", "client_ids": "iuU",
              "client_names": "iuU", "num_classes": "iu"}
_KIND_NAMES = {"b": "bool", "i": "int", "u": "uint", "f": "float", "U": "str"}
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError,
                NotImplementedError, RuntimeError)


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


def check_source_path(path: Any, field: str = "path", *, directory: bool = False) -> Path:
    """The path of a data file (or, with ``directory``, a folder) that exists and can be
    read; one-line errors otherwise. Devices and pipes are refused (reading one could
    block or never end)."""
    if not isinstance(path, (str, os.PathLike)) or not str(path) or "\x00" in str(path):
        fail(field, path, "must name a file")
    p = Path(path)
    try:
        is_dir, exists, is_file = p.is_dir(), p.exists(), p.is_file()
    except OSError as e:  # a name too long, a folder on the way that cannot be searched
        fail(field, str(path), f"cannot be read ({e.strerror or _reason(e)})")
    if is_dir and not directory:
        fail(field, str(path), "is a directory, not a file")
    if not exists:
        fail(field, str(path), "no such file" + (" or directory" if directory else ""))
    if not (is_file or is_dir):
        fail(field, str(path), "is not a regular file")
    if not os.access(p, os.R_OK | (os.X_OK if is_dir else 0)):
        fail(field, str(path), "cannot be read (permission denied)")
    return p


def _check_labels(where: str, y: np.ndarray, num_classes: int | None) -> None:
    """``y`` (real labels only, any numeric dtype) are integers in range."""
    if not y.size:
        return
    if y.dtype.kind == "f":
        finite = np.isfinite(y)
        integral = finite & (y == np.floor(np.where(finite, y, 0.0)))
        if not integral.all():
            fail(where, float(y[~integral][0]), "labels must be integers")
    lo, hi = y.min().item(), y.max().item()
    if lo < 0:
        fail(where, lo, "labels must be >= 0")
    if hi >= MAX_NUM_CLASSES:
        fail(where, hi, f"labels must be < MAX_NUM_CLASSES={MAX_NUM_CLASSES} (a label l "
             "means l + 1 classes, each a row of the model and of its logits)")
    if num_classes is not None and hi >= num_classes:
        fail(where, hi, f"labels must be < num_classes={num_classes}")


def _check_finite(where: str, x: np.ndarray, lead: int,
                  mask: np.ndarray | None = None) -> None:
    """The examples of ``x`` (float32, ``lead`` leading axes; only where ``mask``) hold
    no NaN or inf; the error names the first bad example by its index."""
    bad = ~np.isfinite(x.reshape(x.shape[:lead] + (-1,))).all(-1)
    if mask is not None:
        bad &= mask
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        example = x[index].reshape(-1)
        fail(f"{where}[{', '.join(map(str, index))}]",
             float(example[~np.isfinite(example)][0]),
             "inputs must be finite (after conversion to float32)")


def _as_float32(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is refused later
        return x.astype(np.float32)


def _check_example_axes(where: str, shape: tuple[int, ...], lead: int) -> None:
    if len(shape) <= lead:
        fail(f"{where}.shape", shape, "must be " + ("[clients, examples, " if lead == 2
                                                    else "[examples, ") + "features...]")
    if 0 in shape[lead:]:
        fail(f"{where}.shape", shape, "examples must have no empty axis")


def _check_padded_fits(field: str, path: Any, num_clients: int, max_examples: int,
                       example_shape: tuple[int, ...]) -> None:
    check_fits(field, str(path), padded_bytes(num_clients, max_examples, example_shape),
               f"padding {num_clients} clients to {max_examples} examples of shape "
               f"{example_shape}")


def _npy_header(zf: zipfile.ZipFile, name: str) -> tuple[tuple[int, ...], np.dtype]:
    with zf.open(name) as fp:
        version = np.lib.format.read_magic(fp)
        read = (np.lib.format.read_array_header_1_0 if version[0] == 1
                else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read(fp)
    if any(d < 0 for d in shape):
        raise ValueError(f"negative dimension in shape {shape}")
    return tuple(int(d) for d in shape), dtype


def _read_npz(p: Path, field: str, where: str) -> dict[str, np.ndarray]:
    """The known keys of an .npz file, dtypes and sizes checked from headers first."""
    try:
        if p.stat().st_size == 0:
            fail(field, str(p), "is empty")
        if not zipfile.is_zipfile(p):
            fail(field, str(p), "is not a .npz file (not a zip archive)")
        with zipfile.ZipFile(p) as zf:
            members = {n[:-4]: n for n in zf.namelist() if n.endswith(".npy")}
            headers: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
            for key in _NPZ_KINDS:
                if key in members:
                    try:
                        headers[key] = _npy_header(zf, members[key])
                    except ValueError as e:  # a damaged archive is the handler below
                        fail(f"{where}: {key}", "<unreadable>",
                             f"is not a .npy array ({_reason(e)})")
            _check_npz_headers(headers, where, sorted(members)[:20])
            need = sum(math.prod(s) * (d.itemsize + 4 * (k == "x"))
                       for k, (s, d) in headers.items())
            check_fits(field, str(p), need, "loading " + ", ".join(
                f"{k} {list(s)} {d}" for k, (s, d) in headers.items()))
            arrays = {}
            for key in headers:
                with zf.open(members[key]) as fp:
                    arrays[key] = np.lib.format.read_array(fp, allow_pickle=False)
    except ConfigError:
        raise
    except _READ_ERRORS as e:
        fail(field, str(p), f"cannot be read as .npz ({_reason(e)})")
    return arrays


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:120]}" if text else type(e).__name__


def _check_npz_headers(headers: dict, where: str, keys: list[str]) -> None:
    """Keys, dtypes and shapes of an .npz from its headers alone."""
    for key in ("x", "y"):
        if key not in headers:
            fail(f"{where}: key", key, f"is missing (keys: {keys})")
    if ("counts" in headers) == ("client_ids" in headers):
        fail(f"{where}: keys", keys, "need exactly one of 'counts' (padded layout) "
             "or 'client_ids' (flat layout)")
    for key, (_, dtype) in headers.items():
        if dtype.kind not in _NPZ_KINDS[key] or dtype.fields is not None:
            fail(f"{where}: {key}.dtype", str(dtype), (
                "holds Python objects, which are never unpickled; " if dtype.kind == "O"
                else "") + f"must be {'/'.join(_KIND_NAMES[k] for k in _NPZ_KINDS[key])}")
    x_shape = headers["x"][0]
    padded = "counts" in headers
    _check_example_axes(f"{where}: x", x_shape, 2 if padded else 1)
    if x_shape[0] == 0:
        fail(f"{where}: x.shape", x_shape, f"holds no {'clients' if padded else 'examples'}")
    lead = x_shape[:2] if padded else x_shape[:1]
    expect = {"y": lead, "counts": x_shape[:1], "client_ids": x_shape[:1],
              "client_names": x_shape[:1]}
    for key, shape in expect.items():
        if key in headers and headers[key][0] != shape:
            fail(f"{where}: {key}.shape", headers[key][0], f"must be {shape} to match "
                 f"x.shape={x_shape}")
    if "num_classes" in headers and math.prod(headers["num_classes"][0]) != 1:
        fail(f"{where}: num_classes.shape", headers["num_classes"][0],
             "must hold one integer")


def load_npz(path: str | os.PathLike, *, num_classes: int | None = None,
             max_examples: int | None = None, field: str = "path") -> LoadedFederatedData:
    """Reads a padded or flat .npz federated dataset (see the module docstring).

    Args:
      path: the .npz file.
      num_classes: overrides the stored/inferred label count.
      max_examples: padded size for the flat layout (default: the largest client).
      field: the name errors give the path (the CLI's ``data_path``/``test_path``).

    Returns:
      The dataset and its client names.
    """
    p = check_source_path(path, field)
    where = f"{field}={str(path)!r}"
    arrays = _read_npz(p, field, where)
    if num_classes is None and "num_classes" in arrays:
        num_classes = arrays["num_classes"].reshape(()).item()
    if num_classes is not None:
        num_classes = check_int(f"{where}: num_classes", num_classes, min_value=1,
                                max_value=MAX_NUM_CLASSES)
    x, y = _as_float32(arrays["x"]), arrays["y"]
    if "counts" in arrays:
        counts = arrays["counts"]
        if counts.size and (counts.min() < 0 or counts.max() > x.shape[1]):
            bad = counts[(counts < 0) | (counts > x.shape[1])][0]
            fail(f"{where}: counts", bad.item(), f"must lie in [0, {x.shape[1]}]")
        mask = np.arange(x.shape[1])[None, :] < counts[:, None]
        _check_labels(f"{where}: y", y[mask], num_classes)
        _check_finite(f"{where}: x", x, 2, mask)
        data = make_federated_data(x, y, counts.astype(np.int64), num_classes=num_classes)
        names = ([str(n) for n in arrays["client_names"]] if "client_names" in arrays
                 else [str(k) for k in range(data.num_clients)])
        return LoadedFederatedData(data, names)
    ids = arrays["client_ids"]
    _check_labels(f"{where}: y", y, num_classes)
    _check_finite(f"{where}: x", x, 1)
    unique, inverse, sizes = np.unique(ids, return_inverse=True, return_counts=True)
    _check_padded_fits(field, path, len(unique), max(int(sizes.max()), max_examples or 0),
                       x.shape[1:])
    order = np.argsort(inverse.reshape(-1), kind="stable")
    parts = np.split(order, np.cumsum(sizes)[:-1])
    data = federated_data_from_clients(
        [x[q] for q in parts], [y[q].astype(np.int64) for q in parts],
        num_classes=num_classes, max_examples=max_examples, dtype=np.float32)
    return LoadedFederatedData(data, [str(u) for u in unique])


def _leaf_files(path: Any, field: str) -> list[Path]:
    p = check_source_path(path, field, directory=True)
    files = [p] if p.is_file() else sorted(
        q for q in p.iterdir() if q.suffix == ".json" and q.is_file())
    if not files:
        fail(field, str(path), "directory holds no .json files")
    return files


def _parse_json(path: Path, field: str) -> Any:
    # Its text, then the parsed values (a float's text is a few bytes, its object 32).
    check_fits(field, str(path), 2 * path.stat().st_size, "parsing this JSON file")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except UnicodeDecodeError as e:
        fail(field, str(path), f"is not UTF-8 text (byte {e.start}); LEAF files are JSON")
    except json.JSONDecodeError as e:
        fail(field, str(path), f"is not valid JSON (line {e.lineno} column {e.colno}: "
             f"{e.msg})")
    except (ValueError, RecursionError) as e:  # digits past int_max_str_digits; nesting
        fail(field, str(path), f"is not valid JSON ({_reason(e)})")
    except OSError as e:
        fail(field, str(path), f"cannot be read ({e.strerror or _reason(e)})")


def _numeric(where: str, value: Any, what: str) -> np.ndarray:
    """A JSON list (of lists) of numbers as an array; anything else is refused."""
    try:
        a = np.asarray(value)
        if a.dtype.kind == "O" and all(type(v) in (int, float) for v in a.ravel()):
            a = a.astype(np.float64)  # integers beyond int64: as floats
    except (TypeError, ValueError, OverflowError):
        fail(where, "<non-numeric or ragged>", f"must be {what}")
    if a.dtype.kind not in "iuf":
        kind = {"U": "strings", "b": "booleans"}.get(a.dtype.kind, "non-numbers")
        fail(where, f"<{kind}>", f"must be {what}")
    return a


def _read_leaf_users(path: Path, example_shape: tuple[int, ...] | None, field: str
                     ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Parses one LEAF JSON file into ``{user: (x, y)}`` with validated arrays."""
    blob = _parse_json(path, field)
    at = f"{field}={str(path)!r}"
    if not isinstance(blob, dict):
        fail(f"{at}: top level", type(blob).__name__, "must be a JSON object")
    for key in ("users", "user_data"):
        if key not in blob:
            fail(f"{at}: key", key, "is missing")
    users, user_data = blob["users"], blob["user_data"]
    if not isinstance(users, list) or not all(isinstance(u, str) for u in users):
        fail(f"{at}: users", f"<{type(users).__name__}>", "must be a list of strings")
    if not isinstance(user_data, dict):
        fail(f"{at}: user_data", type(user_data).__name__, "must be an object")
    num_samples = blob.get("num_samples")
    if num_samples is not None and (not isinstance(num_samples, list)
                                    or len(num_samples) != len(users)):
        fail(f"{at}: num_samples", f"<{type(num_samples).__name__}>",
             f"must be a list of {len(users)} counts")
    out = {}
    for i, user in enumerate(users):
        where = f"{at}: user_data[{user!r}]"
        if user in out:
            fail(f"{at}: users", user, "is listed twice")
        entry = user_data.get(user)
        if not isinstance(entry, dict) or "x" not in entry or "y" not in entry:
            fail(where, "<missing>" if entry is None else "<malformed>",
                 "must be an object with keys 'x' and 'y'")
        x = _numeric(f"{where}.x", entry["x"], "a list of equal-length numeric examples")
        y = _numeric(f"{where}.y", entry["y"], "a list of integer labels")
        if y.ndim != 1 or len(x) != len(y):
            fail(f"{where}.y", f"<{y.size} labels>", f"must match x ({len(x)} examples)")
        if len(x) and example_shape is None:
            _check_example_axes(f"{where}.x", x.shape, 1)
        x = _as_float32(x)
        _check_finite(f"{where}.x", x, 1)
        _check_labels(f"{where}.y", y, None)
        if num_samples is not None and num_samples[i] != len(y):
            fail(f"{at}: num_samples[{i}]", num_samples[i],
                 f"disagrees with {len(y)} examples of user {user!r}")
        if example_shape is not None:
            if len(x) == 0:
                x = x.reshape((0,) + example_shape)
            elif math.prod(x.shape[1:]) != math.prod(example_shape):
                fail("example_shape", example_shape,
                     f"does not fit {where}.x examples of shape {x.shape[1:]}")
            x = x.reshape((len(x),) + example_shape)
        out[user] = (x, y.astype(np.int32))
    return out


def _read_leaf_dir(path: Any, example_shape: tuple[int, ...] | None, field: str
                   ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    users: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    origin: dict[str, Path] = {}
    for file in _leaf_files(path, field):
        for user, xy in _read_leaf_users(file, example_shape, field).items():
            if user in users:
                fail(f"{field}={str(file)!r}: users", user,
                     f"already appears in {origin[user]}")
            users[user], origin[user] = xy, file
    if not users:
        fail(field, str(path), "holds no users")
    return users


def _to_federated(users: dict[str, tuple[np.ndarray, np.ndarray]], names: list[str],
                  num_classes: int | None, max_examples: int | None, field: str,
                  path: Any) -> FederatedData:
    at = f"{field}={str(path)!r}"
    shapes = {users[u][0].shape[1:] for u in names if len(users[u][0])}
    if len(shapes) > 1:
        fail(f"{at}: x", f"<example shapes {sorted(shapes)}>", "users must share one shape")
    if not shapes:
        fail(at, "<no examples>", "every user has zero examples")
    shape, largest = shapes.pop(), max(len(users[u][1]) for u in names)
    _check_padded_fits(field, path, len(names), max(largest, max_examples or 0), shape)
    if num_classes is not None:
        num_classes = check_int(f"{at}: num_classes", num_classes, min_value=1,
                                max_value=MAX_NUM_CLASSES)
        for u in names:
            _check_labels(f"{at}: user_data[{u!r}].y", users[u][1], num_classes)
    xs = [users[u][0] if len(users[u][0]) else np.zeros((0,) + shape, np.float32)
          for u in names]
    return federated_data_from_clients(xs, [users[u][1] for u in names],
                                       num_classes=num_classes, max_examples=max_examples)


def _check_example_shape(example_shape: Any) -> tuple[int, ...] | None:
    return None if example_shape is None else tuple(
        check_int("example_shape", d, min_value=1) for d in example_shape)


def load_leaf(path: str | os.PathLike, *, num_classes: int | None = None,
              max_examples: int | None = None,
              example_shape: tuple[int, ...] | None = None,
              field: str = "path") -> LoadedFederatedData:
    """Reads a LEAF JSON file or a directory of them into a :class:`FederatedData`.

    Args:
      path: a ``.json`` file or a directory of ``.json`` files.
      num_classes: label count (default ``max(label) + 1``).
      max_examples: padded client size (default: the largest client).
      example_shape: reshape each flat example to this (e.g. ``(28, 28, 1)``).
      field: the name errors give the path (the CLI's ``data_path``/``test_path``).

    Returns:
      The dataset, clients in file order, and their user names.
    """
    users = _read_leaf_dir(path, _check_example_shape(example_shape), field)
    names = list(users)
    return LoadedFederatedData(
        _to_federated(users, names, num_classes, max_examples, field, path), names)


def load_leaf_split(root: str | os.PathLike, *, num_classes: int | None = None,
                    max_examples: int | None = None,
                    example_shape: tuple[int, ...] | None = None,
                    field: str = "path") -> LoadedSplit:
    """Reads LEAF ``root/train`` and ``root/test`` over the same users.

    Clients follow the training users' order; a training user absent from the test set
    gets zero test examples; a test user absent from the training set is an error.

    Args:
      root: directory holding ``train/`` and ``test/`` (files or directories of .json).
      num_classes: label count (default: ``max(label) + 1`` over train and test).
      max_examples: padded client size of both sets (default: each set's largest).
      example_shape: reshape each flat example to this.
      field: the name errors give the paths.

    Returns:
      ``LoadedSplit(train, test, client_names)``.
    """
    example_shape = _check_example_shape(example_shape)
    check_source_path(root, field, directory=True)
    train = _read_leaf_dir(Path(root) / "train", example_shape, field)
    test = _read_leaf_dir(Path(root) / "test", example_shape, field)
    extra = [u for u in test if u not in train]
    if extra:
        fail(f"{field}={str(root)!r}: test users", extra[0],
             "do not appear in the training set")
    names = list(train)
    if num_classes is None:
        labels = [y for _, y in list(train.values()) + list(test.values()) if y.size]
        num_classes = int(max(y.max() for y in labels)) + 1 if labels else None
    shape = next((x.shape[1:] for x, _ in train.values() if len(x)), (0,))
    for u in names:
        test.setdefault(u, (np.zeros((0,) + shape, np.float32), np.zeros(0, np.int32)))
    return LoadedSplit(
        train=_to_federated(train, names, num_classes, max_examples, field,
                            Path(root) / "train"),
        test=_to_federated(test, names, num_classes, max_examples, field,
                           Path(root) / "test"),
        client_names=names)
