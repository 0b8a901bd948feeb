"""Host-side input validation with one-line messages that name the field and value.

Every public entry point validates on the host before anything is traced; nothing here
runs inside jit.
"""

from __future__ import annotations

import math
from typing import Any, Iterable


class ConfigError(ValueError):
    """A bad configuration value; the message names the field and the offending value."""


def fail(field: str, value: Any, why: str) -> None:
    """Raises ConfigError with the uniform one-line message."""
    raise ConfigError(f"{field}={value!r}: {why}")


def check_int(field: str, value: Any, *, min_value: int | None = None,
              max_value: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int,)) and not (
            hasattr(value, "dtype") and getattr(value, "ndim", 1) == 0
            and str(value.dtype).startswith(("int", "uint"))):
        fail(field, value, "must be an integer")
    value = int(value)
    if min_value is not None and value < min_value:
        fail(field, value, f"must be >= {min_value}")
    if max_value is not None and value > max_value:
        fail(field, value, f"must be <= {max_value}")
    return value


def check_float(field: str, value: Any, *, min_value: float | None = None,
                max_value: float | None = None, min_exclusive: bool = False,
                max_exclusive: bool = False) -> float:
    if isinstance(value, bool):
        fail(field, value, "must be a number")
    try:
        out = float(value)
    except (TypeError, ValueError):
        fail(field, value, "must be a number")
    if not math.isfinite(out):
        fail(field, value, "must be finite")
    if min_value is not None and (out < min_value or (min_exclusive and out == min_value)):
        fail(field, value, f"must be {'>' if min_exclusive else '>='} {min_value}")
    if max_value is not None and (out > max_value or (max_exclusive and out == max_value)):
        fail(field, value, f"must be {'<' if max_exclusive else '<='} {max_value}")
    return out


def check_choice(field: str, value: Any, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        fail(field, value, f"must be one of {', '.join(choices)}")
    return value


def check_fits(field: str, value: Any, need_bytes: int, what: str, *,
               budget_bytes: int | None = None) -> int:
    """Refuses ``need_bytes`` (an estimate, from below, of what ``what`` allocates) when
    it exceeds ``budget_bytes`` (default: one device's memory,
    :func:`fedjax_sim._host.device_memory_bytes`; nothing is refused when that is unknown).

    Called before the allocation it guards, so a size that cannot fit is a one-line
    ConfigError naming ``field=value`` and the estimated bytes, never an out-of-memory
    crash minutes later. Returns ``need_bytes``.
    """
    from fedjax_sim import _host  # imports JAX; most users of this module need not

    if budget_bytes is None:
        budget_bytes = _host.device_memory_bytes()
    if budget_bytes is not None and need_bytes > budget_bytes:
        fail(field, value, f"{what} needs >= {_host.format_bytes(need_bytes)} "
             f"({need_bytes} bytes), over the {_host.format_bytes(budget_bytes)} of "
             "one device")
    return need_bytes
