"""Poisoning attacks of a run: the registry and the adversary it builds.

An attack entry builds an :class:`AdversaryPlan` once the data is known: a wrapper of the
algorithm's client program (:func:`fedjax_sim.poisoning.adversarial_client`), an optional
colluding ``COHORT`` stage to put first in the chain (the omniscient attacks), the
backdoor's trigger and target for evaluation, and the honest-versus-malicious
diagnostics observer. The adversary is ``num_malicious`` (or ``round(malicious_fraction *
num_clients)``) clients chosen by :func:`~fedjax_sim.poisoning.malicious_by_permutation`
from the run's seed.

Automatic strength fields: ``boost`` (model_replacement) is ``expected_cohort /
server_lr`` (Bagdasaryan's n / eta); ``attack_norm`` (constrain_scale) the server's
``clip_norm``; ``attack_strength`` 1 (sign_flip scale, gaussian std), Baruch et al.'s z
(ALIE), 0.5 (IPM epsilon); ``trigger_value`` 1.0 for images (pixels in [0, 1]), 3.0 for
tabular features; ``target_label`` 0; ``poison_fraction`` 0.5; ``trigger_size`` 3.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from fedjax_sim import poisoning as P
from fedjax_sim._validation import fail
from fedjax_sim.algorithms.base import ClientProgram
from fedjax_sim.experiment.registry import Entry, Registry
from fedjax_sim.experiment.sampling import expected_cohort
from fedjax_sim.observers import Observer
from fedjax_sim.server.base import Stage


@dataclasses.dataclass(frozen=True)
class AdversaryPlan:
    """What an attack entry decided (all None / 0 for an honest run).

    Attributes:
      wrap: ``ClientProgram -> ClientProgram`` (the adversarial clients' behaviour).
      cohort_stage: a colluding stage to chain first (omniscient attacks), or None.
      trigger: the backdoor trigger, or None.
      target_label: the backdoor target, or None.
      num_malicious: the adversary's size.
      is_malicious: the predicate on population ids, or None.
      observer: the poisoning diagnostics observer, or None.
    """

    wrap: Callable[[ClientProgram], ClientProgram] | None = None
    cohort_stage: Stage | None = None
    trigger: P.attacks.Trigger | None = None
    target_label: int | None = None
    num_malicious: int = 0
    is_malicious: Callable[[Any], Any] | None = None
    observer: Observer | None = None


@dataclasses.dataclass(frozen=True)
class AttackContext:
    """What an attack builder needs to know about the run."""

    num_clients: int
    num_classes: int
    example_shape: tuple[int, ...]


def make_trigger(cfg: Any, example_shape: tuple[int, ...]) -> P.attacks.Trigger:
    """The config's trigger: a corner square for images ``[H, W, C]``, else leading features."""
    a = cfg.attack
    size = a.trigger_size or 3
    if len(example_shape) == 3:
        if size > min(example_shape[:2]):
            fail("trigger_size", size,
                 f"exceeds the image size {example_shape[0]}x{example_shape[1]}")
        return P.pixel_trigger(size, 1.0 if a.trigger_value is None else a.trigger_value)
    features = example_shape[-1]
    if size > features:
        fail("trigger_size", size, f"exceeds the {features} input features")
    return P.feature_trigger(tuple(range(size)), 3.0 if a.trigger_value is None
                             else a.trigger_value)


def _adversary(cfg: Any, ctx: AttackContext):
    a = cfg.attack
    m = P.malicious_count(ctx.num_clients, num_malicious=a.num_malicious,
                          malicious_fraction=None if a.num_malicious else
                          a.malicious_fraction)
    return m, P.malicious_by_permutation(ctx.num_clients, m, seed=cfg.seed)


def _staged(make_attack: Callable[[Any, AttackContext, Any], Any], backdoor: bool = False):
    """A builder for attacks that wrap the client program (no server-side half)."""

    def build(cfg: Any, ctx: AttackContext) -> AdversaryPlan:
        m, is_malicious = _adversary(cfg, ctx)
        trigger = target = None
        if backdoor:
            target = cfg.attack.target_label or 0
            if target >= ctx.num_classes:
                fail("target_label", target, f"must be < num_classes={ctx.num_classes}")
            trigger = make_trigger(cfg, ctx.example_shape)
        attack = make_attack(cfg, ctx, trigger)
        return AdversaryPlan(
            wrap=lambda program: P.adversarial_client(program, attack, is_malicious),
            trigger=trigger, target_label=target, num_malicious=m,
            is_malicious=is_malicious, observer=P.poisoning_diagnostics(is_malicious))

    return build


def _omniscient(kind: str):
    def build(cfg: Any, ctx: AttackContext) -> AdversaryPlan:
        m, is_malicious = _adversary(cfg, ctx)
        strength = cfg.attack.attack_strength
        stage = P.omniscient_attack(kind, is_malicious, z=strength,
                                    epsilon=strength or 0.5)
        return AdversaryPlan(cohort_stage=stage, num_malicious=m, is_malicious=is_malicious,
                             observer=P.poisoning_diagnostics(is_malicious))

    return build


def _poison_fraction(cfg: Any) -> float:
    return 0.5 if cfg.attack.poison_fraction is None else cfg.attack.poison_fraction


def _target(cfg: Any) -> int:
    return cfg.attack.target_label or 0


def _check_adversary(cfg: Any) -> None:
    a, n = cfg.attack, cfg.data.num_clients
    m, frac = a.num_malicious, a.malicious_fraction
    if (m is None) == (frac is None):
        fail("num_malicious", m, f"attack={a.kind!r} needs exactly one of num_malicious > 0 "
             f"and malicious_fraction > 0 (got malicious_fraction={frac!r})")
    if m is not None and m > n:
        fail("num_malicious", m, f"must be <= num_clients={n}")
    if frac is not None and round(frac * n) < 1:
        fail("malicious_fraction", frac, f"makes no client of num_clients={n} malicious")


def _check_omniscient(cfg: Any) -> None:
    _check_adversary(cfg)
    a, n = cfg.attack, cfg.data.num_clients
    if (a.num_malicious or 0) >= n or a.malicious_fraction == 1.0:
        fail("attack", a.kind, "an omniscient attack imitates honest clients; leave at "
             "least one client honest")


def _check_constrain_scale(cfg: Any) -> None:
    _check_adversary(cfg)
    if cfg.attack.attack_norm is None and cfg.server.clip_norm is None:
        fail("attack_norm", None, "constrain_scale needs a norm to scale to: set "
             "attack_norm > 0 (or clip_norm > 0 to use the server's bound)")


def _boost(cfg: Any) -> float:
    return cfg.attack.boost or expected_cohort(cfg) / (cfg.algorithm.server_lr or 1.0)


@dataclasses.dataclass(frozen=True)
class AttackMeta:
    """Facts about an attack: ``reads_every_upload`` for the omniscient ones (a stage on
    the server reading the honest uploads, impossible behind secure aggregation)."""

    reads_every_upload: bool = False


_ADVERSARY = frozenset({"num_malicious", "malicious_fraction"})
_BACKDOOR = _ADVERSARY | {"target_label", "poison_fraction", "trigger_size", "trigger_value"}
REGISTRY = Registry("attacks", "attack", "attack", governed={
    k: None for k in _BACKDOOR | {"boost", "attack_norm", "attack_strength"}})
REGISTRY.add(Entry("none", lambda cfg, ctx: AdversaryPlan(), "an honest run"))
REGISTRY.add(Entry("label_flip", _staged(lambda cfg, ctx, t: P.label_flip(ctx.num_classes)),
                   "malicious clients train on labels y -> K - 1 - y", uses=_ADVERSARY,
                   check=_check_adversary))
REGISTRY.add(Entry("backdoor", _staged(lambda cfg, ctx, t: P.backdoor(
    t, _target(cfg), poison_fraction=_poison_fraction(cfg)), backdoor=True),
    "train on triggered examples relabelled target_label", uses=_BACKDOOR,
    check=_check_adversary))
REGISTRY.add(Entry("model_replacement", _staged(lambda cfg, ctx, t: P.model_replacement(
    t, _target(cfg), _boost(cfg), poison_fraction=_poison_fraction(cfg)), backdoor=True),
    "a backdoored update scaled by boost", uses=_BACKDOOR | {"boost"},
    check=_check_adversary))
REGISTRY.add(Entry("constrain_scale", _staged(lambda cfg, ctx, t: P.constrain_and_scale(
    t, _target(cfg), cfg.attack.attack_norm or cfg.server.clip_norm,
    poison_fraction=_poison_fraction(cfg)), backdoor=True),
    "a backdoored update scaled to attack_norm", uses=_BACKDOOR | {"attack_norm"},
    check=_check_constrain_scale))
REGISTRY.add(Entry("sign_flip", _staged(lambda cfg, ctx, t: P.sign_flip(
    cfg.attack.attack_strength or 1.0)), "send -strength times the honest update",
    uses=_ADVERSARY | {"attack_strength"}, check=_check_adversary))
REGISTRY.add(Entry("gaussian", _staged(lambda cfg, ctx, t: P.gaussian_noise_attack(
    cfg.attack.attack_strength or 1.0)), "send N(0, strength^2) noise",
    uses=_ADVERSARY | {"attack_strength"}, check=_check_adversary))
REGISTRY.add(Entry("alie", _omniscient("alie"), "A Little Is Enough (omniscient)",
                   uses=_ADVERSARY | {"attack_strength"}, check=_check_omniscient,
                   meta=AttackMeta(reads_every_upload=True)))
REGISTRY.add(Entry("ipm", _omniscient("ipm"), "inner-product manipulation (omniscient)",
                   uses=_ADVERSARY | {"attack_strength"}, check=_check_omniscient,
                   meta=AttackMeta(reads_every_upload=True)))


def build_adversary(cfg: Any, ctx: AttackContext) -> AdversaryPlan:
    """The adversary ``cfg.attack`` describes (an empty plan for an honest run)."""
    return REGISTRY[cfg.attack.kind].build(cfg, ctx)


__all__ = ["AdversaryPlan", "AttackContext", "REGISTRY", "build_adversary", "make_trigger"]
