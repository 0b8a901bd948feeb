"""Privacy attack lab: what an honest server, a malicious server and a malicious client recover.

* Honest-but-curious server (:mod:`~fedjax_sim.attacks.inversion`,
  :mod:`~fedjax_sim.attacks.analytic`, :mod:`~fedjax_sim.attacks.labels`): DLG, Inverting
  Gradients, closed-form recovery through a dense layer, iDLG and count-based label
  recovery, on FedSGD gradients and multi-step FedAvg deltas, vmapped over victims.
* Malicious server (:mod:`~fedjax_sim.attacks.imprint`): the "Robbing the Fed" imprint
  block (dense and sparse), on one client's update or on a secure-aggregation sum; inside
  a run (:mod:`~fedjax_sim.attacks.malicious_server`), written into the run's own first
  dense layer in spy rounds whose update the server discards.
* Malicious client (:mod:`~fedjax_sim.attacks.malicious_client`): model replacement
  installs an imprint; two consecutive global models reveal the next cohort's examples
  (unless the server's norm bound, clipping or DP noise stops the installation).
* Scoring (:mod:`~fedjax_sim.attacks.metrics`), what the attacker sees of a round of the
  simulator under its defences (:func:`~fedjax_sim.attacks.updates.observe_victims`),
  ready-made digits experiments (:mod:`~fedjax_sim.attacks.lab`) and image grids
  (:mod:`~fedjax_sim.attacks.plots`).
"""

from fedjax_sim.attacks.analytic import closed_form_attack
from fedjax_sim.attacks.imprint import (ImprintConfig, bin_edges_from_data, bin_edges_gaussian,
                                        expected_recovery_rate, imprint_attack,
                                        make_imprint_model, measure, measurement_direction,
                                        predicted_recovery_rate, read_off_bins)
from fedjax_sim.attacks.inversion import (DLG_DEFAULTS, IG_DEFAULTS, InversionConfig,
                                          Reconstruction, dlg_attack,
                                          inverting_gradients_attack)
from fedjax_sim.attacks.labels import (estimate_label_counts, idlg_label, recover_labels)
from fedjax_sim.attacks.malicious_client import (MaliciousClientConfig, MaliciousClientResult,
                                                 ReadOff, imprint_target_params,
                                                 malicious_client_attack,
                                                 malicious_client_rounds,
                                                 read_off_next_round, replacement_update)
from fedjax_sim.attacks.malicious_server import Imprint, make_imprint, spy_server
from fedjax_sim.attacks.metrics import (evaluate_reconstruction, evaluate_victims,
                                        label_count_accuracy, match_reconstructions, mse,
                                        psnr, ssim)
from fedjax_sim.attacks.updates import (LocalTraining, Observed, defence_chain,
                                        local_gaussian_noise, observe_victims, simulate_update,
                                        victim_updates)

__all__ = ["DLG_DEFAULTS", "IG_DEFAULTS", "Imprint", "ImprintConfig", "InversionConfig",
           "LocalTraining",
           "MaliciousClientConfig", "MaliciousClientResult", "Observed", "ReadOff",
           "Reconstruction", "bin_edges_from_data", "bin_edges_gaussian", "closed_form_attack",
           "defence_chain", "dlg_attack", "estimate_label_counts", "evaluate_reconstruction",
           "evaluate_victims", "expected_recovery_rate", "idlg_label", "imprint_attack",
           "imprint_target_params", "inverting_gradients_attack", "label_count_accuracy",
           "local_gaussian_noise", "make_imprint", "make_imprint_model",
           "malicious_client_attack",
           "malicious_client_rounds", "match_reconstructions", "measure", "measurement_direction",
           "mse", "observe_victims", "predicted_recovery_rate", "psnr", "read_off_bins",
           "read_off_next_round", "recover_labels", "replacement_update", "simulate_update",
           "spy_server", "ssim", "victim_updates"]

# The ready-made experiments, the sweep and the plots, as ``fedjax_sim.attacks.lab`` etc.
# for scripts and notebooks that import only the package face (``import fedjax_sim as fs``).
from fedjax_sim.attacks import lab, plots, sweep  # noqa: E402,F401
