"""The ``secure`` section of a run: secure aggregation and its distributed-DP mechanisms.

With ``secure.enabled`` (``--secure-aggregation``) the aggregator's clip-and-sum becomes
a secure sum (:func:`fedjax_sim.secagg.secure_sum`): every client clips, rotates,
rounds and wraps its update into ``Z_(2^bits)``, the server learns only the modular sum
of the survivors. What follows the sum stays the aggregator's:

* ``mean``: the sum divided by the survivors (FedAvg's unweighted mean);
* ``dp_fedavg`` with ``mechanism='none'``: the server adds central Gaussian noise to the
  decoded sum (scaled to the sum's bound after rounding) and divides by the expected
  cohort; with ``mechanism='ddg'`` or ``'skellam'`` the clients add the noise as
  discrete shares (distributed DP) and the ledger accounts the survivors' shares;
* ``dp_ftrl``: the tree's noise on the decoded sums, divided by the cohort.

A family of its own (``mechanism`` names the member), so that its rules sit beside
what they guard. Impossible combinations are one-line errors: a reducer that is not a
sum, a server-side norm filter or an omniscient attack (both read every upload), a
compressor (the secure sum encodes the update itself), adaptive clipping (its count
would need a secure sum of its own, which is not modelled), distributed DP without
secure aggregation, too few bits for the cohort, a threshold above the neighbours,
neighbours not below the cohort.
"""

from __future__ import annotations

import math
from typing import Any

import jax

from fedjax_sim._validation import fail
from fedjax_sim.experiment import registry
from fedjax_sim.experiment.registry import Entry, Registry
from fedjax_sim.experiment.sampling import expected_cohort
from fedjax_sim.secagg.secure_sum import SecureAggregation, secure_sum
from fedjax_sim.server.base import Stage

_SECTION = ("bits", "neighbours", "threshold", "dropout", "full_masking", "k_stddevs",
            "beta", "mechanism")


def _check_enabled(cfg: Any) -> None:
    """Every ``secure`` field but ``enabled`` needs ``enabled``; then the rules that
    involve other sections."""
    from fedjax_sim.experiment.config import SecureConfig

    sec, s = cfg.secure, cfg.server
    if not sec.enabled:
        defaults = SecureConfig()
        for name in _SECTION:
            value = getattr(sec, name)
            if value != getattr(defaults, name):
                why = ("distributed DP adds its noise inside secure aggregation"
                       if name == "mechanism" else "it is a setting of secure aggregation")
                fail(name, value, f"only applies with secure_aggregation=true ({why})")
        return
    if registry.family("aggregators")[s.aggregator].meta.secure is None:
        fail("aggregator", s.aggregator, "is not a sum: behind secure aggregation the "
             "server sees only the sum of the updates (use mean, dp_fedavg or dp_ftrl)")
    if s.norm_bound is not None:
        fail("norm_bound", s.norm_bound, "a norm filter checks each update on the server, "
             "which sees only the sum behind secure aggregation")
    for name in ("quantize_bits", "top_k_fraction"):
        if getattr(s, name) is not None:
            fail(name, getattr(s, name), "secure aggregation encodes each update itself "
                 f"(bits={sec.bits} per coordinate); drop the compressor")
    if s.adaptive_clipping:
        fail("adaptive_clipping", True, "not with secure aggregation: the count of "
             "unclipped clients would need a secure sum of its own")
    if s.clip_norm is None:
        fail("clip_norm", None, "secure aggregation needs clip_norm > 0 (each update is "
             "clipped before it is scaled into the ring)")
    attack = registry.family("attacks")[cfg.attack.kind]
    if attack.meta is not None and attack.meta.reads_every_upload:
        fail("attack", cfg.attack.kind, "an omniscient attack reads every client's upload, "
             "which secure aggregation hides")
    if cfg.algorithm.weighting == "examples":
        fail("weighting", "examples", "secure aggregation sums unit-weight updates (every "
             "survivor counts 1); use weighting='uniform' or leave it automatic")
    # The ring, graph and threshold rules are SecureAggregation's own (the cohort: the
    # expected one under Poisson sampling, before the sampler sizes its capacity).
    m = expected_cohort(cfg)
    cohort = cfg.sampling.cohort_size if cfg.sampling.kind != "poisson" else m
    settings = SecureAggregation(bits=sec.bits, clip_norm=s.clip_norm, dim=1,
                                 capacity=math.ceil(cohort), expected_clients=m,
                                 neighbours=sec.neighbours, threshold=sec.threshold,
                                 dropout=sec.dropout, k_stddevs=sec.k_stddevs)
    settings.scale  # noqa: B018 (the scale refuses too few bits for the cohort)


def _check_distributed(cfg: Any) -> None:
    _check_enabled(cfg)
    s = cfg.server
    if s.aggregator != "dp_fedavg":
        fail("mechanism", cfg.secure.mechanism, "distributed DP replaces DP-FedAvg's "
             f"central noise; use aggregator='dp_fedavg' (got {s.aggregator!r})")
    if s.noise_multiplier is None and s.target_epsilon is None:
        fail("mechanism", cfg.secure.mechanism, "needs noise_multiplier > 0 or "
             "target_epsilon > 0 (the survivors' shares add up to std noise_multiplier * "
             "clip_norm)")
    if s.accountant != "rdp":
        fail("accountant", s.accountant, "distributed DP is accounted with its RDP bounds; "
             "use accountant='rdp'")
    if cfg.sampling.kind == "fixed":
        fail("sampling", "fixed", "distributed DP is accounted under Poisson sampling (the "
             "published bounds amplify by Poisson subsampling); use sampling='poisson'")


REGISTRY = Registry("secure", "secure", "mechanism", governed={"beta": None})
REGISTRY.add(Entry("none", None, "no distributed noise (central noise, if any, is the "
                   "server's)", check=_check_enabled))
REGISTRY.add(Entry("ddg", None, "distributed discrete Gaussian (Kairouz et al. 2021)",
                   uses=frozenset({"beta"}), check=_check_distributed))
REGISTRY.add(Entry("skellam", None, "Skellam (Agarwal et al. 2021)",
                   uses=frozenset({"beta"}), check=_check_distributed))


def secure_settings(cfg: Any, *, dim: int, capacity: int,
                    noise_multiplier: float) -> SecureAggregation:
    """The :class:`~fedjax_sim.secagg.SecureAggregation` of ``cfg`` for an upload of
    ``dim`` coordinates and a cohort of at most ``capacity`` clients."""
    sec = cfg.secure
    distributed = sec.mechanism != "none"
    return SecureAggregation(
        bits=sec.bits, clip_norm=cfg.server.clip_norm, dim=dim, capacity=capacity,
        expected_clients=expected_cohort(cfg), neighbours=sec.neighbours,
        threshold=sec.threshold, dropout=sec.dropout, noise=sec.mechanism,
        noise_multiplier=noise_multiplier if distributed else 0.0,
        beta=math.exp(-0.5) if sec.beta is None else sec.beta, k_stddevs=sec.k_stddevs,
        full_masking=sec.full_masking, mean=cfg.server.aggregator == "mean")


def secure_stage(cfg: Any, *, dim: int, capacity: int, noise_multiplier: float,
                 key: jax.Array) -> Stage:
    """The secure-sum reducer of ``cfg`` (keyed by ``key``)."""
    return secure_sum(secure_settings(cfg, dim=dim, capacity=capacity,
                                      noise_multiplier=noise_multiplier), key=key)


__all__ = ["REGISTRY", "secure_settings", "secure_stage"]
