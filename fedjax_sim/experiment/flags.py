"""Command-line flags made from schema fields, and a parser whose errors are one line.

Every subcommand (``run``, ``privacy``, ``attack``) builds its flags here from declared
fields (:mod:`fedjax_sim.experiment.schema`), so a knob shared by two subcommands has one
declaration: the same flag, help, range and validation.
"""

from __future__ import annotations

import argparse
from typing import Any, Iterable, Sequence

from fedjax_sim.experiment.schema import FieldSpec


class ArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit status 2, and which
    accepts no abbreviated flags."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"fedjax-sim {self.prog.split()[-1]}: error: {message}\n")


def add_field_flags(parser: Any, specs: Iterable[FieldSpec], *,
                    flags: dict[str, Sequence[str]] | None = None) -> None:
    """Adds one ``--flag`` per field; the raw string is validated later by the field.

    Args:
      parser: a parser or argument group.
      specs: the fields.
      flags: optional extra option strings per flat key (aliases).
    """
    for spec in specs:
        names = [spec.flag, *(flags or {}).get(spec.key, ())]
        extra = {}
        if spec.kind is bool:  # ``--flag`` alone means true; ``--flag false`` also works.
            extra = {"nargs": "?", "const": "true"}
        parser.add_argument(*names, dest=spec.key, default=None,
                            metavar=spec.kind.__name__.upper() if spec.kind is not tuple
                            else "LIST", help=spec.describe(), **extra)


def given(args: argparse.Namespace, specs: Iterable[FieldSpec]) -> dict[str, Any]:
    """``{flat key: raw value}`` of the fields whose flag was given."""
    return {s.key: getattr(args, s.key) for s in specs
            if getattr(args, s.key, None) is not None}




def add_compile_cache_flag(parser: Any) -> None:
    """``--no-compile-cache``: compile without JAX's persistent cache
    (:mod:`fedjax_sim.compile_cache`; also ``FEDJAX_SIM_COMPILE_CACHE=0``)."""
    parser.add_argument("--no-compile-cache", action="store_true",
                        help="compile without the persistent compilation cache "
                             "(default: on, in ~/.cache/fedjax_sim/xla; "
                             "FEDJAX_SIM_COMPILE_CACHE=0 also turns it off)")


__all__ = ["ArgumentParser", "add_compile_cache_flag", "add_field_flags", "given"]
