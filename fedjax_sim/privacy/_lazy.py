"""dp-accounting and SciPy's special functions, imported on first use.

Importing dp-accounting (which imports ``scipy.stats``) took 1.8 s of the CLI's start-up
and about 50 MB of resident memory on a 2-core VM, and a run without DP never uses it:
the privacy modules reach it through these proxies, which import the real module at the
first attribute access (after that, one dictionary lookup per access).
"""

from __future__ import annotations

import importlib
from typing import Any


class LazyModule:
    """A module imported when one of its attributes is first read."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


dp_accounting = LazyModule("dp_accounting")
rdp_lib = LazyModule("dp_accounting.rdp.rdp_privacy_accountant")
pld_lib = LazyModule("dp_accounting.pld.privacy_loss_distribution")
scipy_special = LazyModule("scipy.special")

__all__ = ["LazyModule", "dp_accounting", "pld_lib", "rdp_lib", "scipy_special"]
