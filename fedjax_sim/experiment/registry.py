"""Families of builders: name -> builder plus the metadata other code needs.

Each family (data sources, models, samplers, algorithms, aggregators, attacks, secure
aggregation's distributed-DP mechanisms) is a
:class:`Registry` defined in its own module of :mod:`fedjax_sim.experiment`; adding a
member is writing its builder and one :class:`Entry`. An entry declares

* ``build``: the builder (its signature is the family's);
* ``uses``: the flat keys of its section it reads. The rule "a field only applies with
  the members that use it" is derived from these declarations (a field set away from
  its default while the chosen member does not use it is a one-line error listing the
  members that do), so no name list is typed twice;
* ``check``: the member's cross-field rules, host-side and cheap, run by
  :func:`fedjax_sim.experiment.config.check_config` when a configuration is made, before
  any data is built;
* ``meta``: family-specific typed facts (a reducer's minimum cohort, a server's
  plain-SGD step, ...).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Mapping

from fedjax_sim._validation import ConfigError, fail

# family -> (module defining it, its registry's name there)
FAMILIES = {
    "data": "fedjax_sim.experiment.data",
    "models": "fedjax_sim.experiment.models",
    "samplers": "fedjax_sim.experiment.sampling",
    "algorithms": "fedjax_sim.experiment.algorithms",
    "aggregators": "fedjax_sim.experiment.server",
    "attacks": "fedjax_sim.experiment.attacks",
    "secure": "fedjax_sim.experiment.secure",
}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One member of a family (see the module docstring)."""

    name: str
    build: Callable[..., Any]
    help: str = ""
    uses: frozenset[str] = frozenset()
    check: Callable[[Any], None] | None = None
    meta: Any = None


class Registry:
    """A family: entries by name, the section field that picks one, the fields it governs.

    Args:
      family: the family's name (a key of :data:`FAMILIES`).
      section: the configuration section.
      kind_key: the flat key of the field that names the member (``"aggregator"``).
      governed: flat keys of the section subject to the "only applies with" rule, with an
        optional reason replacing the generic one.
    """

    def __init__(self, family: str, section: str, kind_key: str,
                 governed: Mapping[str, str | None] | None = None):
        self.family, self.section, self.kind_key = family, section, kind_key
        self.governed = dict(governed or {})
        self._entries: dict[str, Entry] = {}

    def add(self, entry: Entry) -> Entry:
        if entry.name in self._entries:
            raise AssertionError(f"{self.family}: {entry.name!r} registered twice")
        unknown = set(entry.uses) - set(self.governed)
        if unknown:
            raise AssertionError(f"{self.family}.{entry.name} uses ungoverned {unknown}")
        self._entries[entry.name] = entry
        return entry

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __getitem__(self, name: str) -> Entry:
        if name not in self._entries:
            fail(self.kind_key, name, f"must be one of {', '.join(self._entries)}")
        return self._entries[name]

    def selected(self, cfg: Any, fields: Mapping[str, Any]) -> Entry:
        """The entry ``cfg`` picks (``fields``: the schema's fields by flat key)."""
        spec = fields[self.kind_key]
        return self[getattr(getattr(cfg, spec.section), spec.name)]

    def users(self, key: str) -> tuple[str, ...]:
        return tuple(n for n, e in self._entries.items() if key in e.uses)

    def check(self, cfg: Any, fields: Mapping[str, Any]) -> None:
        """The "only applies with" rule of the governed fields, then the entry's own
        checks (``fields``: the schema's fields by flat key)."""
        entry = self.selected(cfg, fields)
        for key, reason in self.governed.items():
            spec = fields[key]
            value = getattr(getattr(cfg, spec.section), spec.name)
            if value == spec.default or key in entry.uses:
                continue
            if reason is None:
                users = self.users(key)
                reason = (f"only applies with {self.kind_key} in {', '.join(users)}"
                          if users else "is not used")
            raise ConfigError(f"{key}={value!r}: {reason.format(cfg=cfg, entry=entry)}")
        if entry.check is not None:
            entry.check(cfg)


def family(name: str) -> Registry:
    """The registry of a family, importing its module on first use."""
    if name not in FAMILIES:
        fail("family", name, f"must be one of {', '.join(FAMILIES)}")
    return getattr(importlib.import_module(FAMILIES[name]), "REGISTRY")


CHECK_ORDER = ("data", "models", "samplers", "algorithms", "aggregators", "attacks",
               "secure")
"""The order in which the families' rules run (the first error is the one reported)."""


__all__ = ["CHECK_ORDER", "Entry", "FAMILIES", "Registry", "family"]
