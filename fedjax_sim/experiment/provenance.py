"""Where a run's results come from: versions, commit, command line, devices, seed.

:func:`provenance` is recorded in every ``summary.json`` so that a figure can be traced
back to the code and the machine that produced it.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from typing import Any

PACKAGES = ("fedjax-sim", "jax", "jaxlib", "flax", "optax", "numpy", "dp-accounting",
            "orbax-checkpoint")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """The commit of the checkout the package runs from (with ``+dirty`` when it has
    uncommitted changes to the package), or None outside a git checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                                text=True, timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--", ".."], cwd=here,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def provenance(seed: int) -> dict[str, Any]:
    """Versions, Python, git commit, the exact command line, the devices and the seed."""
    import jax

    devices = jax.devices()
    return {
        "versions": {p: _version(p) for p in PACKAGES},
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "command_line": list(sys.argv),
        "devices": {"backend": jax.default_backend(), "count": len(devices),
                    "kinds": sorted({d.device_kind for d in devices})},
        "host": {"machine": platform.machine(), "system": platform.system(),
                 "cpu_count": os.cpu_count()},
        "seed": seed,
    }


__all__ = ["git_commit", "provenance"]
