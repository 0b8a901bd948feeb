"""Checkpoints of a run and its final model, with orbax.

A checkpoint holds everything a run needs to continue exactly where it stopped:

* the whole :class:`~fedjax_sim.rounds.ServerState`: global params, the server program's
  state, the server chain's state (noise keys, clip norms, tree noise), every client's
  persistent state and the round counter;
* the number of rounds, which is also the privacy ledger's position (it records one
  round per round) and the RNG position (round ``r`` uses ``fold_in(rounds_key, r)``);
* the number of ``metrics.jsonl`` rows it covers, and the configuration it was made
  with, so that ``--resume`` can refuse a different configuration.

Saves are atomic: orbax writes each checkpoint into a temporary folder and renames it
when complete, so a process killed during a save leaves the previous checkpoint usable
(the incomplete one is ignored and cleaned up). The last two are kept.

The final model of a successful run is saved in ``DIR/model`` and loads back with::

    params = fedjax_sim.load_params("DIR")
"""

from __future__ import annotations

import os
from typing import Any

import jax

from fedjax_sim._validation import fail
from fedjax_sim.experiment.outputs import MODEL

STATE, META = "state", "meta"


def _ocp():
    import orbax.checkpoint as ocp
    return ocp


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _plain(tree: Any) -> Any:
    """Typed PRNG keys as their raw ``uint32`` data (what orbax stores)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


class RunCheckpoints:
    """The checkpoints of one run, in ``directory`` (see the module docstring)."""

    def __init__(self, directory: str, *, max_to_keep: int = 2):
        ocp = _ocp()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False,
            cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                              item_names=(STATE, META))

    def latest_round(self) -> int | None:
        """The round of the newest complete checkpoint, or None."""
        return self._manager.latest_step()

    def save(self, rounds: int, state: Any, meta: dict[str, Any]) -> None:
        """Saves the state after ``rounds`` rounds and its metadata (JSON)."""
        ocp = _ocp()
        self._manager.save(rounds, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_plain(state)), meta=ocp.args.JsonSave(meta)))
        self._manager.wait_until_finished()

    def read_meta(self) -> dict[str, Any]:
        """The newest checkpoint's metadata alone (cheap: no arrays are read)."""
        ocp = _ocp()
        step = self.latest_round()
        if step is None:
            fail("resume", os.path.dirname(self._manager.directory),
                 "holds no complete checkpoint")
        restored = self._manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))
        return dict(restored.meta)

    def restore(self, template: Any) -> tuple[Any, dict[str, Any]]:
        """The newest checkpoint's state (shaped, typed and placed like ``template``, e.g.
        a fresh ``round.init(key)``) and its metadata."""
        ocp = _ocp()
        step = self.latest_round()
        if step is None:
            fail("resume", os.path.dirname(self._manager.directory),
                 "holds no complete checkpoint")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _plain(template))
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        state = jax.tree.map(
            lambda t, x: jax.random.wrap_key_data(x, impl=jax.random.key_impl(t))
            if _is_key(t) else x, template, restored.state)
        return state, dict(restored.meta)

    def close(self) -> None:
        self._manager.close()


def config_differences(saved: dict[str, Any], current: dict[str, Any],
                       ignore: tuple[str, ...] = ("output",)) -> list[str]:
    """``section.field`` paths where two configurations (``cfg.to_dict()``) differ."""
    out = []
    for section in sorted(set(saved) | set(current)):
        if section in ignore:
            continue
        a, b = saved.get(section), current.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{section}.{k} ({a.get(k)!r} in the checkpoint, {b.get(k)!r} now)"
                    for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            out.append(f"{section} ({a!r} in the checkpoint, {b!r} now)")
    return out


def save_params(directory: str, params: Any) -> str:
    """Saves a model's params into ``directory/model`` (atomically) as host arrays, so
    that they load back on any machine and device count; returns that path."""
    ocp = _ocp()
    path = os.path.join(os.path.abspath(directory), MODEL)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, jax.device_get(_plain(params)), force=True)
    return path


def load_params(directory: str) -> Any:
    """The params a successful run saved, as NumPy arrays: ``load_params("runs/x")`` (or
    ``.../model``); ``model.apply(params, x)`` takes them as they are."""
    ocp = _ocp()
    path = os.path.abspath(directory)
    if os.path.isdir(os.path.join(path, MODEL)):
        path = os.path.join(path, MODEL)
    if not os.path.isfile(os.path.join(path, "_METADATA")):
        fail("directory", directory, "holds no saved model (a run's output folder, or its "
             "model folder)")
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(path)


__all__ = ["RunCheckpoints", "config_differences", "load_params", "save_params"]
