"""A run's output folder: checked before anything is built, written as strict JSON.

* :func:`prepare_output` runs before the data is built: the folder must be writable and
  either new or empty, or the run must be resumed from it (``--resume``) or allowed to
  replace it (``--overwrite``). Reusing a folder never mixes two runs silently.
* :func:`strict_json` turns a row or a summary into strict JSON: a non-finite number
  (NaN, infinity) becomes ``null`` and its key is listed in the row's ``nonfinite``
  field, so ``metrics.jsonl`` never holds the non-JSON tokens ``NaN``/``Infinity``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Any

import numpy as np

from fedjax_sim._validation import fail

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
MODEL = "model"
RUN_FILES = (METRICS, SUMMARY, CHECKPOINTS, MODEL)


def check_output(output: Any) -> None:
    """The rules between the fields of the ``output`` section (cheap, no file access)."""
    if output.dir is None:
        for name in ("resume", "overwrite"):
            if getattr(output, name):
                fail(name, True, "needs an output folder (--output DIR, or --resume DIR)")
        if output.checkpoint_every:
            fail("checkpoint_every", output.checkpoint_every,
                 "needs an output folder (--output DIR) to write checkpoints into")
    if output.resume and output.overwrite:
        fail("overwrite", True, "not with resume: resuming keeps the folder's run")


def prepare_output(path: str | None, *, resume: bool, overwrite: bool) -> None:
    """Checks (and creates) the output folder; one-line ConfigErrors name ``output``.

    Runs before anything is built: the folder must be writable, and new or empty unless
    ``resume`` (it must then hold checkpoints) or ``overwrite`` (the earlier run's files
    are removed; other files are left alone).
    """
    if path is None:
        return
    if os.path.exists(path) and not os.path.isdir(path):
        fail("output", path, "exists and is not a directory")
    if resume:
        if not os.path.isdir(os.path.join(path, CHECKPOINTS)):
            fail("resume", path, "holds no checkpoint to resume from (run with "
                 "--checkpoint-every N to write them)")
    elif os.path.isdir(path) and os.listdir(path):
        if not overwrite:
            fail("output", path, "is not empty: pass --resume to continue the run it holds "
                 "or --overwrite to replace it")
        for name in RUN_FILES:
            target = os.path.join(path, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            elif os.path.exists(target):
                os.remove(target)
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".fedjax_sim_write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        fail("output", path, f"is not writable ({e.strerror})")


def _clean(value: Any, path: str, nonfinite: list[str]) -> Any:
    if isinstance(value, (np.generic,)):
        value = value.item()
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        nonfinite.append(path)
        return None
    if isinstance(value, dict):
        return {k: _clean(v, f"{path}.{k}" if path else str(k), nonfinite)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v, f"{path}[{i}]", nonfinite) for i, v in enumerate(value)]
    return value


def strict_json(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with every non-finite float replaced by ``None``; when there was any,
    the key ``nonfinite`` lists their paths (``"update_norm"``, ``"privacy.epsilon"``)."""
    nonfinite: list[str] = []
    out = _clean(record, "", nonfinite)
    if nonfinite:
        out["nonfinite"] = nonfinite
    return out


def dumps(record: dict[str, Any], **kwargs) -> str:
    """Strict JSON text of ``record`` (``allow_nan=False``: a slip raises, never writes)."""
    return json.dumps(strict_json(record), allow_nan=False, **kwargs)


def read_rows(path: str) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (an incomplete last line, from a kill, is dropped)."""
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):
                break
            rows.append(json.loads(line))
    return rows


def truncate_rows(path: str, rounds: int) -> list[dict[str, Any]]:
    """Keeps the first ``rounds`` rows of a ``metrics.jsonl`` (those a checkpoint covers),
    rewriting the file atomically; returns them."""
    rows = [r for r in read_rows(path) if r.get("round", 0) <= rounds]
    if len(rows) != rounds:
        fail("resume", os.path.dirname(path), f"{METRICS} holds {len(rows)} rows for the "
             f"checkpoint's {rounds} rounds")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row, allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return rows


__all__ = ["CHECKPOINTS", "METRICS", "MODEL", "SUMMARY", "check_output", "dumps",
           "prepare_output",
           "read_rows", "strict_json", "truncate_rows"]
