"""Who takes part in a round, as far as privacy accounting is concerned.

A :class:`SamplingSpec` is the accounting view of a sampler
(:mod:`fedjax_sim.sampling`): every sampler reports its own (``sampler.spec``), so the
ledger never re-types the cohort size or the rate. The neighbouring relation follows from
the kind:

* ``poisson`` (rate q): add/remove one client;
* ``fixed`` (m of n, uniformly without replacement): replace one client (n is public);
* ``cyclic`` (round r trains the r-th block of m clients of a fixed order): replace one
  client's contribution with zero ("special"), the relation of DP-FTRL's tree
  aggregation; there is no amplification by sampling.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fedjax_sim._validation import check_choice, check_float, check_int, fail

SAMPLING_KINDS = ("poisson", "fixed", "cyclic")


@dataclasses.dataclass(frozen=True)
class SamplingSpec:
    """How a round's cohort is drawn. Build it with :meth:`poisson`, :meth:`fixed` or
    :meth:`cyclic`.

    Attributes:
      kind: ``"poisson"``, ``"fixed"`` or ``"cyclic"``.
      rate: Poisson inclusion probability q in (0, 1] (``None`` otherwise).
      cohort_size: the cohort size m of fixed-size and cyclic schedules.
      population_size: population size n; required for fixed and cyclic, optional for
        Poisson (informational, e.g. for the overflow probability).
    """

    kind: str
    rate: float | None = None
    cohort_size: int | None = None
    population_size: int | None = None

    def __post_init__(self):
        check_choice("sampling.kind", self.kind, SAMPLING_KINDS)
        if self.population_size is not None:
            check_int("sampling.population_size", self.population_size, min_value=1)
        if self.kind == "poisson":
            if self.rate is None:
                fail("sampling.rate", self.rate, "Poisson sampling needs a rate q in (0, 1]")
            check_float("sampling.rate", self.rate, min_value=0.0, max_value=1.0,
                        min_exclusive=True)
            if self.cohort_size is not None:
                fail("sampling.cohort_size", self.cohort_size,
                     "Poisson sampling has no fixed cohort size (use kind='fixed')")
        else:
            if self.rate is not None:
                fail("sampling.rate", self.rate,
                     f"{self.kind} sampling takes cohort_size and population_size, not a "
                     "rate")
            if self.cohort_size is None:
                fail("sampling.cohort_size", self.cohort_size,
                     f"{self.kind} sampling needs a cohort size m >= 1")
            if self.population_size is None:
                fail("sampling.population_size", self.population_size,
                     f"{self.kind} sampling needs the population size n")
            m = check_int("sampling.cohort_size", self.cohort_size, min_value=1)
            if m > self.population_size:
                fail("sampling.cohort_size", m,
                     f"must be <= population_size={self.population_size}")
            object.__setattr__(self, "cohort_size", m)
        if self.rate is not None:
            object.__setattr__(self, "rate", float(self.rate))
        if self.population_size is not None:
            object.__setattr__(self, "population_size", int(self.population_size))

    @classmethod
    def poisson(cls, rate: float, *, population_size: int | None = None) -> "SamplingSpec":
        """Poisson sampling: each client joins a round independently with probability ``rate``."""
        return cls("poisson", rate=rate, population_size=population_size)

    @classmethod
    def fixed(cls, cohort_size: int, population_size: int) -> "SamplingSpec":
        """Uniform fixed-size sampling of ``cohort_size`` clients out of ``population_size``."""
        return cls("fixed", cohort_size=cohort_size, population_size=population_size)

    @classmethod
    def cyclic(cls, cohort_size: int, population_size: int) -> "SamplingSpec":
        """A fixed cyclic order: round r trains the r-th block of ``cohort_size`` clients."""
        return cls("cyclic", cohort_size=cohort_size, population_size=population_size)

    @property
    def sampling_probability(self) -> float:
        """A client's chance to be in a given round: q, or m / n."""
        if self.kind == "poisson":
            return float(self.rate)
        return self.cohort_size / self.population_size

    @property
    def expected_cohort(self) -> float:
        """Expected clients per round: m, or q n (Poisson with a known population)."""
        if self.kind != "poisson":
            return float(self.cohort_size)
        if self.population_size is None:
            fail("sampling.population_size", None, "the expected Poisson cohort needs n")
        return self.rate * self.population_size

    @property
    def rounds_per_pass(self) -> int:
        """A cyclic schedule's no-repeat window, ``floor(n / m)`` rounds (see
        :func:`fedjax_sim.privacy.cyclic_rounds_per_pass`)."""
        if self.kind != "cyclic":
            fail("sampling", self.kind, "only a cyclic schedule has passes")
        return self.population_size // self.cohort_size

    @property
    def neighboring_relation(self) -> Any:
        """The dp-accounting ``NeighboringRelation`` of this schedule (module docstring)."""
        import dp_accounting

        rel = dp_accounting.NeighboringRelation
        return {"poisson": rel.ADD_OR_REMOVE_ONE, "fixed": rel.REPLACE_ONE,
                "cyclic": rel.REPLACE_SPECIAL}[self.kind]

    @property
    def adjacency(self) -> str:
        """The neighbouring relation in words."""
        return {"poisson": "add/remove one client", "fixed": "replace one client",
                "cyclic": "replace one client with zero (special)"}[self.kind]

    def describe(self) -> str:
        if self.kind == "poisson":
            return f"poisson(q={self.rate:g})"
        return f"{self.kind}(m={self.cohort_size}, n={self.population_size})"


__all__ = ["SAMPLING_KINDS", "SamplingSpec"]
