"""JAX's persistent compilation cache: compile a program once per machine, not per run.

A round is one large XLA program; on a 2-core CPU the main job's round took 10-20 s to
compile against 6 s of training. JAX can store compiled executables on disk, keyed by
the program, the backend, the JAX/XLA versions and the XLA flags, and load them in a
later process instead of compiling again. ``fedjax-sim``, the scripts under
``scripts/`` and the notebooks turn it on with :func:`use_compile_cache` before their
first compile:

* directory: ``$FEDJAX_SIM_COMPILE_CACHE`` when it names one, else
  ``$XDG_CACHE_HOME/fedjax_sim/xla`` (``~/.cache/fedjax_sim/xla``);
* off: ``FEDJAX_SIM_COMPILE_CACHE=0`` (or ``off``, ``false``, ``no``), the
  ``--no-compile-cache`` flag of the CLI and of the scripts, or
  ``use_compile_cache(False)``;
* a cache directory the caller already gave JAX (``JAX_COMPILATION_CACHE_DIR`` or
  ``jax.config``) is kept: the test suite sets a fresh one per run, so nothing carries
  over between test runs;
* every program is cached, however fast it compiled (JAX's default skips those under
  1 s, which left the data generation's 30 small programs compiling on every run);
* the directory is bounded to :data:`MAX_CACHE_BYTES`, least recently used entries
  evicted first, when the ``filelock`` package is installed (JAX needs it for the
  bound); otherwise it is unbounded and may be deleted at any time.

A cached executable is the one the compiler produced: loading it changes no result, only
the time to the first round. Compile times that benchmarks report are cold compiles only
when the cache is off or empty; the scripts record the cache directory in their JSON.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import jax

ENV_VAR = "FEDJAX_SIM_COMPILE_CACHE"
"""Environment variable: a directory, or ``0``/``off``/``false``/``no`` to turn it off."""

MAX_CACHE_BYTES = 4 * 2**30
"""Size bound of the default cache directory (when ``filelock`` is installed)."""

_OFF = ("0", "off", "false", "no")


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/fedjax_sim/xla``, or ``~/.cache/fedjax_sim/xla``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"),
                                                            ".cache")
    return os.path.join(base, "fedjax_sim", "xla")


def cache_dir_in_use() -> str | None:
    """The persistent cache directory JAX will use in this process, or None when off."""
    if not jax.config.jax_enable_compilation_cache:
        return None
    return jax.config.jax_compilation_cache_dir or None


def use_compile_cache(enabled: bool = True, path: str | None = None) -> str | None:
    """Turns the persistent compilation cache on (or off) for this process.

    Call it before the first compilation. ``enabled=False`` or ``FEDJAX_SIM_COMPILE_CACHE=0``
    turns the cache off, JAX's own setting included. Otherwise a directory the caller
    already gave JAX is kept; else ``path``, the directory named by the environment
    variable, or :func:`default_cache_dir` is used. A directory that cannot be created
    leaves the cache off with a one-line note on stderr (a run never fails for its cache).

    Returns:
      The directory in use, or None when the cache is off.
    """
    env = os.environ.get(ENV_VAR, "").strip()
    if not enabled or env.lower() in _OFF:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    directory = os.path.abspath(os.path.expanduser(path or env or default_cache_dir()))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        print(f"note: compilation cache off: cannot create {directory!r} ({e.strerror})",
              file=sys.stderr)
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    settings = {"jax_compilation_cache_dir": directory}
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        settings["jax_persistent_cache_min_compile_time_secs"] = 0.0
    if ("JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ
            and importlib.util.find_spec("filelock") is not None):
        settings["jax_compilation_cache_max_size"] = MAX_CACHE_BYTES
    for name, value in settings.items():
        jax.config.update(name, value)
    return directory


__all__ = ["ENV_VAR", "MAX_CACHE_BYTES", "cache_dir_in_use", "default_cache_dir",
           "use_compile_cache"]
