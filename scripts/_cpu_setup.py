"""Set-up shared by the scripts: CPU cores and devices, the compile cache, the device record
and the process's resident memory (:func:`peak_rss_mib`, :func:`current_rss_mib`).

CPU pinning and devices (:func:`configure_cpu`) must run before JAX starts its backends;
the persistent compilation cache (:func:`compile_cache`) before the first compilation.

``--cores N`` pins the process to its first N allowed CPU cores (Linux), so that the
engine and the centralised baseline run on the same cores: XLA:CPU sizes its thread pool
from the cores the process may use, so on a 2-core machine a one-device engine runs its
batched client updates on one thread while the centralised GEMMs use both, unless both
are pinned. ``--devices`` (any value) asks for one XLA host device per allowed core
(:func:`fedjax_sim.use_every_cpu_core`).

Importing ``fedjax_sim`` imports JAX but does not start its backends (they start on the
first device query or computation), so both settings still take effect here;
``tests/test_benchmark_scripts.py`` checks that.

Every script that compiles JAX programs accepts ``--no-compile-cache``
(:func:`add_compile_cache_flag`) and calls :func:`compile_cache` before its first
compilation: JAX's persistent cache is on by default (``fedjax_sim.use_compile_cache``:
``~/.cache/fedjax_sim/xla``, or ``$FEDJAX_SIM_COMPILE_CACHE``; ``=0`` turns it off), so
compile times in a benchmark's JSON are cold compiles only when its ``compile_cache`` field
is null or the cache was empty. :func:`device_record` gives the backend and device fields
that the benchmark records carry, so a record says what it ran on (CPU, GPU or TPU).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys

import fedjax_sim as fs


def configure_cpu(argv: list[str]) -> None:
    """Applies ``--cores N`` (0 = leave as is) and ``--devices`` from ``argv``."""
    if "--cores" in argv:
        i = argv.index("--cores")
        value = argv[i + 1] if i + 1 < len(argv) else ""
        cores = fs.usable_cores()
        if not value.isdigit() or int(value) > cores:
            sys.exit(f"error: --cores={value!r}: must be an integer in 0..{cores} "
                     "(the cores this process may use)")
        if int(value) > 0:
            if not hasattr(os, "sched_setaffinity"):
                sys.exit(f"error: --cores={value}: pinning needs Linux (sched_setaffinity)")
            os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:int(value)])
    if "--devices" in argv:  # after pinning: one device per core left to the process
        fs.use_every_cpu_core()


def add_compile_cache_flag(parser: argparse.ArgumentParser) -> None:
    """Adds ``--no-compile-cache`` (read by :func:`compile_cache`)."""
    parser.add_argument("--no-compile-cache", action="store_true",
                        help="compile without the persistent compilation cache (default: "
                             "on, in ~/.cache/fedjax_sim/xla; FEDJAX_SIM_COMPILE_CACHE=0 "
                             "also turns it off)")


def compile_cache(args: argparse.Namespace) -> str | None:
    """Turns the persistent compilation cache on, or off when the parsed ``args`` say
    ``--no-compile-cache``; call it before the first compilation. Returns the directory
    in use (None: off), for the script's JSON."""
    return fs.use_compile_cache(not args.no_compile_cache)


def device_record() -> dict:
    """``backend``, ``device_kind`` and ``device_count`` of this process (starts JAX's
    backends: call it after :func:`configure_cpu`)."""
    import jax  # here, so that importing this module starts nothing

    return {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
            "device_count": jax.device_count()}


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (Linux: ``ru_maxrss`` is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mib() -> float:
    """Resident memory of this process now, in MiB (Linux: ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
