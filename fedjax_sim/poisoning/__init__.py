"""Poisoning lab: malicious clients inside the vmapped round, and what defences buy."""

from fedjax_sim.poisoning.attacks import (ATTACK_NAMES, Attack, StagedAttack, adversarial_client,
                                          backdoor, constrain_and_scale, feature_trigger,
                                          gaussian_noise_attack, label_flip,
                                          malicious_by_permutation, malicious_count,
                                          model_replacement, pixel_trigger, sign_flip)
from fedjax_sim.poisoning.metrics import (aggregate_alignment, alignment, backdoor_evaluator,
                                          backdoor_success_rate, honest_mean,
                                          main_task_accuracy, poisoning_diagnostics)
from fedjax_sim.poisoning.omniscient import (alie_forge, baruch_z, honest_statistics,
                                             ipm_forge, omniscient_attack)

__all__ = ["ATTACK_NAMES", "Attack", "StagedAttack", "adversarial_client", "backdoor",
           "constrain_and_scale", "feature_trigger", "gaussian_noise_attack", "label_flip",
           "malicious_by_permutation", "malicious_count", "model_replacement",
           "pixel_trigger", "sign_flip",
           "aggregate_alignment", "alignment", "backdoor_evaluator", "backdoor_success_rate",
           "honest_mean", "main_task_accuracy", "poisoning_diagnostics",
           "alie_forge", "baruch_z", "honest_statistics", "ipm_forge", "omniscient_attack"]
