"""From an :class:`~fedjax_sim.config.ExperimentConfig` to the pieces a poisoned run needs.

``build_poisoning`` turns the ``attack`` fields into: the one-client function for
``make_round(client_update=...)``, an optional colluding server stage to put first in the
chain (omniscient attacks), and the trigger/target for logging backdoor success. The
adversary is ``num_malicious`` (or ``round(malicious_fraction * num_clients)``) clients
chosen by :func:`~fedjax_sim.poisoning.malicious_by_permutation` from the run's seed.

Defaults of the strength fields (0 in the config means "default"):

* ``boost`` (model_replacement): ``expected_cohort / server_lr`` (Bagdasaryan's n / eta;
  the server learning rate defaults to 1 for SGD servers);
* ``attack_norm`` (constrain_scale): the server's ``clip_norm``;
* ``attack_strength``: sign_flip scale 1, gaussian std 1, ALIE's z from Baruch et al.'s
  formula, IPM epsilon 0.5;
* ``trigger_value``: 1.0 for images (pixels in [0, 1]), 3.0 for tabular features.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from fedjax_sim._validation import fail
from fedjax_sim.client_update import ClientUpdateFn
from fedjax_sim.poisoning import attacks as A
from fedjax_sim.poisoning.omniscient import omniscient_attack
from fedjax_sim.server.base import ServerTransform


@dataclasses.dataclass(frozen=True)
class PoisoningPlan:
    """What :func:`build_poisoning` decided (all None / 0 without an attack).

    Attributes:
      client_update: the adversarial one-client function, or None (honest run).
      server_stage: the colluding per-client stage to chain first, or None.
      trigger: the backdoor trigger (backdoor attacks), else None.
      target_label: the backdoor target (backdoor attacks), else None.
      num_malicious: the adversary's size.
      is_malicious: the predicate on population ids, or None.
    """

    client_update: ClientUpdateFn | None = None
    server_stage: ServerTransform | None = None
    trigger: A.Trigger | None = None
    target_label: int | None = None
    num_malicious: int = 0
    is_malicious: Callable[[Any], Any] | None = None


def make_trigger(cfg: Any, example_shape: tuple[int, ...]) -> A.Trigger:
    """The config's trigger: a corner square for images ``[H, W, C]``, else leading features."""
    if len(example_shape) == 3:
        if cfg.trigger_size > min(example_shape[:2]):
            fail("trigger_size", cfg.trigger_size,
                 f"exceeds the image size {example_shape[0]}x{example_shape[1]}")
        return A.pixel_trigger(cfg.trigger_size, cfg.trigger_value or 1.0)
    features = example_shape[-1]
    if cfg.trigger_size > features:
        fail("trigger_size", cfg.trigger_size, f"exceeds the {features} input features")
    return A.feature_trigger(tuple(range(cfg.trigger_size)), cfg.trigger_value or 3.0)


def build_poisoning(cfg: Any, *, honest_update: ClientUpdateFn, num_clients: int,
                    num_classes: int, example_shape: tuple[int, ...]) -> PoisoningPlan:
    """Builds the attack ``cfg`` describes around ``honest_update``.

    Args:
      cfg: the validated ExperimentConfig.
      honest_update: the algorithm's honest one-client function.
      num_clients: the population size.
      num_classes: the task's number of classes (for label flipping and target checks).
      example_shape: one input's shape (picks the trigger kind).

    Returns:
      The :class:`PoisoningPlan`.
    """
    if cfg.attack == "none":
        return PoisoningPlan()
    m = A.malicious_count(num_clients, num_malicious=cfg.num_malicious or None,
                          malicious_fraction=None if cfg.num_malicious else
                          cfg.malicious_fraction)
    is_malicious = A.malicious_by_permutation(num_clients, m, seed=cfg.seed)
    trigger, target, stage = None, None, None
    strength = cfg.attack_strength
    if cfg.attack in ("backdoor", "model_replacement", "constrain_scale"):
        if cfg.target_label >= num_classes:
            fail("target_label", cfg.target_label, f"must be < num_classes={num_classes}")
        trigger, target = make_trigger(cfg, example_shape), cfg.target_label
    if cfg.attack == "label_flip":
        attack = A.label_flip(num_classes)
    elif cfg.attack == "backdoor":
        attack = A.backdoor(trigger, target, poison_fraction=cfg.poison_fraction)
    elif cfg.attack == "model_replacement":
        boost = cfg.boost or cfg.expected_cohort / (cfg.server_lr or 1.0)
        attack = A.model_replacement(trigger, target, boost,
                                     poison_fraction=cfg.poison_fraction)
    elif cfg.attack == "constrain_scale":
        attack = A.constrain_and_scale(trigger, target, cfg.attack_norm or cfg.clip_norm,
                                       poison_fraction=cfg.poison_fraction)
    elif cfg.attack == "sign_flip":
        attack = A.sign_flip(strength or 1.0)
    elif cfg.attack == "gaussian":
        attack = A.gaussian_noise_attack(strength or 1.0)
    else:  # alie / ipm: the client half tags, the server stage forges.
        attack = A.tag_for_server
        stage = omniscient_attack(cfg.attack, z=strength or None, epsilon=strength or 0.5)
    return PoisoningPlan(
        client_update=A.make_adversarial_client_update(honest_update, attack, is_malicious),
        server_stage=stage, trigger=trigger, target_label=target, num_malicious=m,
        is_malicious=is_malicious)
