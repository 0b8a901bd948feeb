"""The privacy ledger of a run, read from the server chain that runs.

:func:`ledger_for` looks at the typed stages of a chain (:mod:`fedjax_sim.server.base`):
the one stage that carries a DP ``mechanism``, the reducer before it, and the clipping
bound the stages before the reducer declare. From these and the sampler's
:class:`~fedjax_sim.privacy.SamplingSpec` it builds the mechanism's ledger
(:class:`~fedjax_sim.privacy.Accountant` for sampled Gaussian rounds,
:class:`~fedjax_sim.privacy.DPFTRLAccountant` for tree aggregation). Every ledger has
``record_round()``, ``epsilon(delta)``, ``rounds``, ``noise_multiplier``, ``ledger()``
(the composed dp-accounting event) and ``summary()`` (the guarantee in words).

What it checks (each a one-line :class:`~fedjax_sim.ConfigError` naming the chain):

* exactly one stage adds DP noise, after the reducer (or fused into it);
* the reducer is a unit-weight sum (``sum_updates()``): the sensitivity of anything else
  (a weighted mean, a median, Krum) is not the clip bound;
* a stage before the reducer (or the reducer itself, as the secure sum does) bounds each
  client, with a fixed bound for noise scaled to a fixed sensitivity (adaptive
  clipping's bound moves with the data), and no stage after the last bound can raise a
  client's norm again (a quantiser).

It reads the chain by its stages' declared properties and imports nothing from
:mod:`fedjax_sim.server`.
"""

from __future__ import annotations

from typing import Any

from fedjax_sim._validation import fail
from fedjax_sim.privacy.schedule import SamplingSpec


def _stages(transform: Any) -> tuple:
    return tuple(getattr(transform, "stages", (transform,)))


def _client_bound(pre: tuple, names: list[str]) -> float | str | None:
    """The per-client bound the stages before the reducer leave: a float, ``"state"``
    (adaptive) or None; raises if a later stage may break it."""
    bound, last = None, None
    for i, s in enumerate(pre):
        if s.bound is not None:
            if s.bound == "state" or bound == "state":
                bound = "state"
            else:
                bound = s.bound if bound is None else min(bound, s.bound)
            last = i
    if last is not None:
        for s in pre[last + 1:]:
            if not s.preserves_bound:
                fail("server_chain", names, f"{s.name!r} comes after the clipping and may "
                     "raise a client's norm above the bound; put it before the clipping")
    return bound


def ledger_for(transform: Any, sampling: SamplingSpec, *, accountant: str = "rdp",
               delta: float | None = None):
    """The privacy ledger of ``transform`` (a chain or a stage) run under ``sampling``.

    Args:
      transform: the server chain that runs.
      sampling: the sampler's :class:`SamplingSpec` (``sampler.spec``).
      accountant: ``"rdp"`` or ``"pld"`` (sampled Gaussian only).
      delta: the default delta of ``epsilon()``.

    Returns:
      The mechanism's ledger, or None when no stage adds DP noise (no formal guarantee).
    """
    stages = _stages(transform)
    names = [s.name for s in stages]
    noisy = [i for i, s in enumerate(stages) if s.mechanism is not None]
    if not noisy:
        return None
    if len(noisy) > 1:
        fail("server_chain", names, "more than one stage adds DP noise ("
             f"{', '.join(names[i] for i in noisy)}); the ledger cannot tell which to account")
    at = noisy[0]
    noise = stages[at]
    reducer = next((i for i, s in enumerate(stages) if s.kind.value == "reduce"), None)
    if reducer is None or at < reducer:
        fail("server_chain", names, f"{noise.name!r} adds noise before any reducer; DP "
             "noise goes on the sum of the clipped uploads")
    fused = at == reducer
    if not stages[reducer].unit_sum:
        fail("server_chain", names, f"{noise.name!r} needs an unweighted sum before it "
             f"(sum_updates); the sensitivity of {names[reducer]!r} is not the clip bound")
    bound = _client_bound(stages[:reducer], names)
    own = stages[reducer].bound
    if bound is None and isinstance(own, float):  # a reducer that bounds each client
        bound = own  # itself (the secure sum clips and rounds inside the protocol)
    if fused:
        bound = None
    elif bound == "state":
        fail("server_chain", names, "adaptive clipping has no fixed bound, so noise scaled "
             "to a fixed sensitivity cannot be accounted against it (use "
             "dp_fedavg_aggregator(adaptive=True), which scales the noise with the bound)")
    elif bound is None:
        fail("server_chain", names, "no stage bounds a client's contribution "
             "(clip_per_client, zero_above_norm); without it the noise gives no DP")
    return noise.mechanism.ledger(sampling, accountant=accountant, delta=delta, bound=bound)


__all__ = ["ledger_for"]
