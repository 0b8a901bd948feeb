"""CPU set-up shared by the benchmark scripts; must run before JAX starts its backends.

``--cores N`` pins the process to its first N allowed CPU cores (Linux), so that the
engine and the centralised baseline run on the same cores: XLA:CPU sizes its thread pool
from the cores the process may use, so on a 2-core machine a one-device engine runs its
batched client updates on one thread while the centralised GEMMs use both, unless both
are pinned. ``--devices`` (any value) asks for one XLA host device per allowed core
(:func:`fedjax_sim.use_every_cpu_core`).

Importing ``fedjax_sim`` imports JAX but does not start its backends (they start on the
first device query or computation), so both settings still take effect here;
``tests/test_benchmark_scripts.py`` checks that.
"""

from __future__ import annotations

import os
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
