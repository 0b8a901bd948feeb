"""Facts about the host machine the simulator runs on: cores and device memory.

The one home of "how many cores may this process use" (the CLI and the benchmark
scripts split the CPU into one XLA device per core) and "how much memory does a device
have" (the round refuses per-client state that would not fit).
"""

from __future__ import annotations

import os

import jax


def usable_cores() -> int:
    """The number of CPU cores this process may run on (its affinity mask on Linux)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def device_memory_bytes(device: jax.Device | None = None) -> int | None:
    """The memory one device may allocate: an accelerator's ``bytes_limit``, or the host's
    physical memory for a CPU device (None when unknown)."""
    device = jax.devices()[0] if device is None else device
    try:
        stats = device.memory_stats() or {}
    except Exception:  # CPU devices and some plugins do not report memory statistics.
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def format_bytes(n: float) -> str:
    """``1234567`` -> ``"1.2 MB"`` (decimal units)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.3g} TB"


def use_every_cpu_core() -> None:
    """Splits the host CPU into one XLA device per usable core, unless the user chose.

    With one device, XLA:CPU splits each chunk's small batched matmuls over the cores;
    on a 2-core VM that made the MLP round 1.6x slower than one pinned core
    (BENCHMARKS.md). With one device per core, the cohort is sharded over all of them
    and each core trains its own slice of clients. Takes effect only before JAX starts
    its backends; ``XLA_FLAGS=--xla_force_host_platform_device_count=1`` keeps one device.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" in flags:
        return
    cores = usable_cores()
    if cores > 1:
        os.environ["XLA_FLAGS"] = (
            f"{flags} --xla_force_host_platform_device_count={cores}".strip())
