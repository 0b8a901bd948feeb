"""Server-side transforms: optax-style pure (init, update) pairs and their chain."""

from fedjax_sim.server.base import (CohortUpdates, ServerTransform, chain, cohort_size,
                                    is_cohort, masked_weights, per_client_l2_norms,
                                    scale_per_client, transform_infos, weighted_mean,
                                    weighted_sum, zero_masked)
from fedjax_sim.server.clipping import (AdaptiveClipState, adaptive_clip, clip_per_client,
                                        current_clip_norm, zero_above_norm)
from fedjax_sim.server.compression import (CompressionState, hadamard_rotate_quantize,
                                           stochastic_quantize, top_k_sparsify)
from fedjax_sim.server.pairwise import bulyan, krum, multi_krum
from fedjax_sim.server.noise import (GaussianNoiseState, dp_fedavg_aggregator,
                                     dp_mean_normalize, effective_noise_multiplier,
                                     gaussian_noise, update_noise_multiplier_for)
from fedjax_sim.server.reducers import (centered_clipping, coordinate_median,
                                        geometric_median, sum_updates, trimmed_mean,
                                        unweighted_mean)

__all__ = ["CohortUpdates", "ServerTransform", "chain", "cohort_size", "is_cohort",
           "masked_weights", "per_client_l2_norms", "scale_per_client", "transform_infos",
           "weighted_mean", "weighted_sum", "zero_masked",
           "AdaptiveClipState", "adaptive_clip", "clip_per_client", "current_clip_norm",
           "zero_above_norm",
           "CompressionState", "hadamard_rotate_quantize", "stochastic_quantize",
           "top_k_sparsify",
           "bulyan", "krum", "multi_krum",
           "GaussianNoiseState", "dp_fedavg_aggregator", "dp_mean_normalize",
           "effective_noise_multiplier", "gaussian_noise", "update_noise_multiplier_for",
           "centered_clipping", "coordinate_median", "geometric_median", "sum_updates",
           "trimmed_mean", "unweighted_mean"]
