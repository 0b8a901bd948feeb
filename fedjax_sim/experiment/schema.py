"""One schema for every knob: a field is declared once, with its type, range and help.

A configuration section is a frozen dataclass whose fields are declared with
:func:`option`. From that one declaration come

* the TOML key (the field's name, inside its section's table),
* the command-line flag (``--`` + the flat key with dashes; the flat key is the field's
  name unless the declaration gives another, e.g. ``data.source`` is ``--data``),
* the help text with the allowed values or range,
* the host-side validation of the value alone (type, finiteness, range, choices), which
  gives one line naming the field and the value.

Rules that involve several fields live beside the builder they guard
(:mod:`fedjax_sim.experiment.registry`). ``None`` means "automatic": the builder picks
the value (a field's help says what it picks).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Callable

import numpy as np

from fedjax_sim._validation import ConfigError, fail

FLOAT32_MAX = float(np.finfo(np.float32).max)


def option(default: Any, help: str, *, choices: tuple[str, ...] | Callable[[], tuple] = None,
           low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False, flag: str | None = None,
           zero_is_auto: bool = False) -> Any:
    """Declares a section field.

    Args:
      default: the default (None: automatic).
      help: what the field does (and, for None, what "automatic" picks).
      choices: allowed string values, or a callable returning them (a registry's names).
      low, high: the range of a number; ``low_open``/``high_open`` exclude the ends.
      flag: the flat key (and flag) when it differs from the field's name.
      zero_is_auto: a flat key or flag set to 0 means None (the automatic value): earlier
        versions used 0 as "automatic", and such configs keep working.
    """
    return dataclasses.field(default=default, metadata={
        "help": help, "choices": choices, "low": low, "high": high, "low_open": low_open,
        "high_open": high_open, "flag": flag, "zero_is_auto": zero_is_auto})


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """A declared field, as the loaders, the CLI and the validators see it."""

    section: str
    name: str
    kind: type
    optional: bool
    default: Any
    meta: dict

    @property
    def key(self) -> str:
        """The flat key (and flag without dashes): unique across sections."""
        return self.meta["flag"] or self.name

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    @property
    def path(self) -> str:
        return f"{self.section}.{self.name}" if self.section else self.name

    def choices(self) -> tuple[str, ...] | None:
        c = self.meta["choices"]
        return c() if callable(c) else c

    def describe(self) -> str:
        """The allowed values or range, for ``--help``."""
        kind = {int: "integer", float: "number", bool: "true|false", str: "string",
                tuple: "comma-separated integers"}[self.kind]
        choices = self.choices()
        if choices:
            kind = "|".join(choices)
        lo, hi = self.meta["low"], self.meta["high"]
        if lo is not None or hi is not None:
            left = "(" if self.meta["low_open"] else "["
            right = ")" if self.meta["high_open"] else "]"
            kind += (f" in {left}{'-inf' if lo is None else f'{lo:g}'}, "
                     f"{'inf' if hi is None else f'{hi:g}'}{right}")
        default = "automatic" if self.default is None else _show(self.default)
        return f"{self.meta['help']} ({kind}; default: {default})"

    # ----------------------------------------------------------------- validation

    def coerce(self, value: Any) -> Any:
        """``value`` (from TOML, a flag string or Python) as the field's type, validated."""
        if value is None:
            if not self.optional:
                fail(self.key, value, "must be set (it has no automatic value)")
            return None
        value = _coerce(self.key, self.kind, value)
        self.check(value)
        return value

    def check(self, value: Any) -> None:
        """Range and choice checks of one (typed) value."""
        if value is None:
            return
        choices = self.choices()
        if choices is not None and value not in choices:
            fail(self.key, value, f"must be one of {', '.join(choices)}")
        if self.kind in (int, float):
            _check_range(self, value)
        if self.kind is tuple and any(v < 1 for v in value):
            fail(self.key, value, "must be a non-empty list of positive integers")


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _check_range(spec: FieldSpec, value: float) -> None:
    m = spec.meta
    if spec.kind is float and not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
        fail(spec.key, value, "must be finite (in float32)")
    lo, hi = m["low"], m["high"]
    if lo is not None and (value < lo or (m["low_open"] and value == lo)):
        fail(spec.key, value, f"must be {'>' if m['low_open'] else '>='} {lo:g}")
    if hi is not None and (value > hi or (m["high_open"] and value == hi)):
        fail(spec.key, value, f"must be {'<' if m['high_open'] else '<='} {hi:g}")


def _coerce(name: str, kind: type, value: Any) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        fail(name, value, "must be true or false")
    if kind is int:
        if isinstance(value, bool):
            fail(name, value, "must be an integer")
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                try:
                    as_float = float(value)
                except ValueError:
                    fail(name, value, "must be an integer")
                value = as_float
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, int):
            fail(name, value, "must be an integer")
        return value
    if kind is float:
        if isinstance(value, bool):
            fail(name, value, "must be a number")
        try:
            return float(value)
        except (TypeError, ValueError, OverflowError):
            fail(name, value, "must be a number")
    if kind is tuple:
        if isinstance(value, str):
            parts = [p for p in value.replace(",", " ").split() if p]
        elif isinstance(value, (list, tuple)):
            parts = list(value)
        else:
            fail(name, value, "must be a list of integers")
        try:
            out = tuple(int(p) for p in parts)
        except (TypeError, ValueError):
            fail(name, value, "must be a list of integers")
        if not out:
            fail(name, value, "must be a non-empty list of positive integers")
        return out
    if not isinstance(value, str):
        fail(name, value, "must be a string")
    return value


def _field_kind(hint: Any) -> tuple[type, bool]:
    """``(scalar type, optional)`` of an annotation such as ``float | None``."""
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is tuple:
        return tuple, optional
    return hint, optional


def section_fields(cls: type, section: str) -> tuple[FieldSpec, ...]:
    """The :class:`FieldSpec` of every field of a section dataclass."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.metadata:
            continue
        kind, optional = _field_kind(hints[f.name])
        out.append(FieldSpec(section, f.name, kind, optional, f.default, dict(f.metadata)))
    return tuple(out)


def validate_section(obj: Any) -> None:
    """Checks every declared field of a section instance alone (type, range, choices)."""
    section = getattr(obj, "SECTION", "")
    for spec in section_fields(type(obj), section):
        value = getattr(obj, spec.name)
        coerced = spec.coerce(value)
        if coerced != value or type(coerced) is not type(value):
            object.__setattr__(obj, spec.name, coerced)


def reject_unless(spec_key: str, value: Any, default: Any, applies: bool, where: str) -> None:
    """The generic "this field only applies with ..." rule (a one-line error)."""
    if value != default and not applies:
        raise ConfigError(f"{spec_key}={value!r}: only applies with {where}")
