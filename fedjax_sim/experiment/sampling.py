"""Samplers of a run: who takes part in each round (the registry).

A builder gets the configuration, the population size and, for DP runs with Poisson
sampling, the overflow tail the privacy plan allows (a truncated Poisson cohort breaks
the Poisson analysis, so the capacity is chosen to make it negligible).
"""

from __future__ import annotations

from typing import Any

from fedjax_sim._validation import fail
from fedjax_sim.experiment.registry import Entry, Registry
from fedjax_sim.sampling import (CyclicSampler, FixedSizeSampler, PoissonSampler, Sampler,
                                 poisson_capacity)


def expected_cohort(cfg: Any) -> float:
    """Expected clients per round: ``cohort_size``, or ``sampling_rate * num_clients``."""
    s = cfg.sampling
    if s.kind == "poisson":
        return s.sampling_rate * cfg.data.num_clients
    return float(s.cohort_size)


def _check_cohort(cfg: Any) -> None:
    if cfg.sampling.cohort_size > cfg.data.num_clients:
        fail("cohort_size", cfg.sampling.cohort_size,
             f"exceeds num_clients={cfg.data.num_clients}")


def _fixed(cfg: Any, num_clients: int, overflow_tail: float | None) -> Sampler:
    _check_population(cfg, num_clients)
    return FixedSizeSampler(num_clients, cfg.sampling.cohort_size)


def _cyclic(cfg: Any, num_clients: int, overflow_tail: float | None) -> Sampler:
    _check_population(cfg, num_clients)
    return CyclicSampler(num_clients, cfg.sampling.cohort_size, seed=cfg.seed)


def _poisson(cfg: Any, num_clients: int, overflow_tail: float | None) -> Sampler:
    rate = cfg.sampling.sampling_rate
    if overflow_tail is None:  # The sampler's default: overflow below 1e-10 per round.
        return PoissonSampler(num_clients, rate)
    return PoissonSampler(num_clients, rate,
                          max_cohort=poisson_capacity(num_clients, rate, overflow_tail))


def _check_population(cfg: Any, num_clients: int) -> None:
    if cfg.sampling.cohort_size > num_clients:
        fail("cohort_size", cfg.sampling.cohort_size, f"exceeds num_clients={num_clients}")


REGISTRY = Registry("samplers", "sampling", "sampling", governed={"sampling_rate": None})
REGISTRY.add(Entry("fixed", _fixed, "exactly cohort_size distinct clients, uniformly",
                   check=_check_cohort))
REGISTRY.add(Entry("poisson", _poisson, "each client independently with sampling_rate",
                   uses=frozenset({"sampling_rate"})))
REGISTRY.add(Entry("cyclic", _cyclic, "round r trains the r-th block of cohort_size "
                   "clients of one fixed permutation", check=_check_cohort))


def build_sampler(cfg: Any, num_clients: int, overflow_tail: float | None = None) -> Sampler:
    """The sampler ``cfg.sampling`` names over a population of ``num_clients``."""
    return REGISTRY[cfg.sampling.kind].build(cfg, num_clients, overflow_tail)


__all__ = ["REGISTRY", "build_sampler", "expected_cohort"]
