"""Client-level differential privacy: mechanisms, ledgers and calibration (host side).

* :mod:`~fedjax_sim.privacy.schedule`: :class:`SamplingSpec`, the accounting view of a
  sampler (Poisson, fixed-size, cyclic) and its neighbouring relation;
* :mod:`~fedjax_sim.privacy.mechanisms`: the typed mechanisms noise stages carry
  (:class:`GaussianSumNoise`, :class:`TreeAggregationNoise`);
* :mod:`~fedjax_sim.privacy.ledger`: :func:`ledger_for`, a run's ledger read from its
  server chain;
* :mod:`~fedjax_sim.privacy.accounting` (sampled Gaussian rounds) and
  :mod:`~fedjax_sim.privacy.dp_ftrl_accounting` (tree aggregation): the ledgers,
  epsilon and noise calibration on top of dp-accounting;
* :mod:`~fedjax_sim.privacy.distributed`: distributed DP behind secure aggregation
  (:class:`DistributedNoise`: discrete Gaussian or Skellam shares, accounted with their
  RDP bounds and the survivors of each round).
"""

from fedjax_sim.privacy.accounting import (ACCOUNTANTS, Accountant, PrivacyConfig,
                                           calibrate_noise_multiplier, dp_event,
                                           effective_noise_multiplier, epsilon_for,
                                           make_dp_accounting_accountant,
                                           poisson_overflow_probability,
                                           update_noise_multiplier_for)
from fedjax_sim.privacy.distributed import (DistributedAccountant, DistributedNoise,
                                            calibrate_distributed, expected_survivors)
from fedjax_sim.privacy.dp_ftrl_accounting import (DP_FTRL_PARTICIPATION, DPFTRLAccountant,
                                                   calibrate_dp_ftrl_noise_multiplier,
                                                   cyclic_rounds_per_pass, dp_ftrl_dp_event,
                                                   dp_ftrl_epsilon, dp_ftrl_participation,
                                                   tree_depth)
from fedjax_sim.privacy.ledger import ledger_for
from fedjax_sim.privacy.mechanisms import GaussianSumNoise, TreeAggregationNoise
from fedjax_sim.privacy.schedule import SAMPLING_KINDS, SamplingSpec

__all__ = ["ACCOUNTANTS", "Accountant", "DP_FTRL_PARTICIPATION", "DPFTRLAccountant",
           "DistributedAccountant", "DistributedNoise", "calibrate_distributed",
           "expected_survivors",
           "GaussianSumNoise", "PrivacyConfig", "SAMPLING_KINDS", "SamplingSpec",
           "TreeAggregationNoise", "calibrate_dp_ftrl_noise_multiplier",
           "calibrate_noise_multiplier", "cyclic_rounds_per_pass", "dp_event",
           "dp_ftrl_dp_event", "dp_ftrl_epsilon", "dp_ftrl_participation",
           "effective_noise_multiplier", "epsilon_for", "ledger_for",
           "make_dp_accounting_accountant", "poisson_overflow_probability", "tree_depth",
           "update_noise_multiplier_for"]
