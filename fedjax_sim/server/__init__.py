"""Server-side transforms: optax-style pure (init, update) pairs and their chain."""

from fedjax_sim.server.base import (CohortUpdates, ServerTransform, chain, is_cohort,
                                    masked_weights, per_client_l2_norms, scale_per_client,
                                    transform_infos, weighted_mean, weighted_sum)

__all__ = ["CohortUpdates", "ServerTransform", "chain", "is_cohort", "masked_weights",
           "per_client_l2_norms", "scale_per_client", "transform_infos", "weighted_mean",
           "weighted_sum"]
