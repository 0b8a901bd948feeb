"""What XLA is asked to optimise for: the round's run time, or a short compile.

Two kinds of program run here, and they want different things from the compiler:

* **The round** runs hundreds of times, so it is compiled for speed with XLA's defaults
  (LLVM ``-O3``, XLA:CPU's MLIR fusion emitters). :func:`round_compiler_options` returns
  them, or with ``lean=True`` (``[engine] lean_compile``, ``--lean-compile``) the
  elemental emitters (``xla_cpu_use_fusion_emitters=False``). Measured on 2 CPU cores
  (BENCHMARKS.md, "Compile time, the compile cache and memory"), the lean round compiles
  13-25% faster and its process peaks 100-180 MiB lower: a cohort-1,000 softmax round's
  peak RSS falls from 451 to 348 MiB. Steady rounds take 0.94-1.06x the default's time; the
  worst case is the MLP on two devices, about 6% slower (1.01-1.09x in six runs). Results
  may differ from the default compile in the last bits: the elemental emitters round
  some transcendental functions differently (the generated data's Gaussian draws
  differed in 18% of their values, by at most 4.8e-7). So lean is not the default.
* **One-off programs** (held-out data generated once, the Bayes accuracy estimate, a
  population materialised on the host, a run's initial params, the leakage reporters'
  ground truth of a few observed rounds) run once or a few times. :func:`one_off_jit`
  compiles them at LLVM ``-O2`` on CPU (:data:`ONE_OFF_CPU_OPTIONS`). At ``-O3`` LLVM
  spends seconds on the Threefry hash inside every ``jax.random`` draw. With
  ``jax.random``'s draws the main job's held-out data compiled in 2.3 s instead of 5.0 s
  and the Bayes estimate in 1.1 s instead of 1.5 s, both running about as fast (the
  generators now draw with :mod:`fedjax_sim.data.draws`, cheaper at either level). Their outputs are bit-identical to the ``-O3`` compile
  (checked by ``tests/test_compile_options.py``): the optimisation level changes how
  fast the code runs, not what it computes.

An optimisation level given in ``XLA_FLAGS`` (``--xla_backend_optimization_level``)
wins over the one-off level: the test suite compiles everything at 0.

Options are applied only on the CPU backend. The GPU and TPU compilers have their own
pipelines and get XLA's defaults. The options are part of the persistent compilation
cache's key (:mod:`fedjax_sim.compile_cache`), so a lean and a default round are cached
apart.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import jax

from fedjax_sim._validation import fail

ONE_OFF_CPU_OPTIONS: dict[str, Any] = {"xla_backend_optimization_level": 2}
"""XLA debug options for programs that run once, on CPU: LLVM ``-O2`` instead of ``-O3``."""

LEAN_CPU_OPTIONS: dict[str, Any] = {"xla_cpu_use_fusion_emitters": False}
"""XLA debug options of a lean round, on CPU: the elemental emitters."""


def _on_cpu(backend: str | None) -> bool:
    return (jax.default_backend() if backend is None else backend) == "cpu"


def round_compiler_options(lean: bool = False, *, backend: str | None = None
                           ) -> dict[str, Any]:
    """The ``compiler_options`` to compile a round with (``Lowered.compile``).

    Args:
      lean: compile for memory and compile time instead of run time (CPU only).
      backend: default: JAX's default backend.
    """
    if not isinstance(lean, bool):
        fail("lean_compile", lean, "must be a bool")
    return dict(LEAN_CPU_OPTIONS) if lean and _on_cpu(backend) else {}


def one_off_options(backend: str | None = None) -> dict[str, Any]:
    """The ``compiler_options`` of a program that runs once: ``{}`` off CPU, or when
    ``XLA_FLAGS`` sets the optimisation level itself."""
    if not _on_cpu(backend) or "xla_backend_optimization_level" in os.environ.get(
            "XLA_FLAGS", ""):
        return {}
    return dict(ONE_OFF_CPU_OPTIONS)


def one_off_jit(fn: Callable | None = None, **jit_kwargs: Any) -> Callable:
    """``jax.jit(fn, **jit_kwargs)`` compiled for a short compile: for programs run once.

    Usable as ``one_off_jit(fn, static_argnames=...)`` or as a decorator, with or
    without arguments. The options are chosen at the first call (when the backend is
    known), the jitted function is built once and reused, and a call inside another
    ``jit`` is inlined into the caller's program as usual (under the caller's options).
    """
    if fn is None:
        return functools.partial(one_off_jit, **jit_kwargs)
    built: dict[str, Callable] = {}

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if "jit" not in built:
            built["jit"] = jax.jit(fn, compiler_options=one_off_options() or None,
                                   **jit_kwargs)
        return built["jit"](*args, **kwargs)

    return call


__all__ = ["LEAN_CPU_OPTIONS", "ONE_OFF_CPU_OPTIONS", "one_off_jit", "one_off_options",
           "round_compiler_options"]
