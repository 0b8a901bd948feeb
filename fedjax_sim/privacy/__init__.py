"""Client-level differential-privacy accounting (host side, dp-accounting based).

See :mod:`fedjax_sim.privacy.accounting` for the guarantees and their assumptions, and
:mod:`fedjax_sim.server.dp_ftrl` for the DP-FTRL tree-aggregation transform.
"""

from fedjax_sim.privacy.accounting import (ACCOUNTANTS, SAMPLING_KINDS, Accountant,
                                           PrivacyConfig, SamplingSpec,
                                           calibrate_noise_multiplier, dp_event,
                                           dp_ftrl_dp_event, dp_ftrl_epsilon,
                                           effective_noise_multiplier, epsilon_for,
                                           make_dp_accounting_accountant,
                                           poisson_overflow_probability,
                                           privacy_spec_from_transform_infos, tree_depth)

__all__ = ["ACCOUNTANTS", "Accountant", "PrivacyConfig", "SAMPLING_KINDS", "SamplingSpec",
           "calibrate_noise_multiplier", "dp_event", "dp_ftrl_dp_event", "dp_ftrl_epsilon",
           "effective_noise_multiplier", "epsilon_for", "make_dp_accounting_accountant",
           "poisson_overflow_probability", "privacy_spec_from_transform_infos", "tree_depth"]
