"""Poisoning lab: malicious clients inside the vmapped round, and what defences buy."""

from fedjax_sim.poisoning.attacks import (ATTACK_NAMES, Attack, backdoor, constrain_and_scale,
                                          feature_trigger, gaussian_noise_attack, label_flip,
                                          make_adversarial_client_update,
                                          malicious_by_permutation, malicious_count,
                                          model_replacement, pixel_trigger, sign_flip,
                                          StagedAttack, tag_for_server)
from fedjax_sim.poisoning.metrics import (aggregate_alignment, alignment,
                                          backdoor_success_rate, honest_mean,
                                          main_task_accuracy)
from fedjax_sim.poisoning.omniscient import baruch_z, omniscient_attack

__all__ = ["ATTACK_NAMES", "Attack", "backdoor", "constrain_and_scale", "feature_trigger",
           "gaussian_noise_attack", "label_flip", "make_adversarial_client_update",
           "malicious_by_permutation", "malicious_count", "model_replacement",
           "pixel_trigger", "sign_flip", "StagedAttack", "tag_for_server",
           "aggregate_alignment", "alignment", "backdoor_success_rate", "honest_mean",
           "main_task_accuracy", "baruch_z", "omniscient_attack"]
