"""Server-side stages: typed optax-style pure (init, apply) pairs and their chain."""

from fedjax_sim.server.base import (Chain, CohortUpdates, ServerTransform, Stage, StageKind,
                                    as_chain, chain, client_stage, cohort_size, is_cohort,
                                    masked_weights, zero_masked)
from fedjax_sim.server.clipping import (AdaptiveClipState, ClipDiagnostics, adaptive_clip,
                                        clip_diagnostics, clip_per_client, zero_above_norm)
from fedjax_sim.server.compression import (CompressionState, hadamard_rotate_quantize,
                                           stochastic_quantize, top_k_sparsify)
from fedjax_sim.server.dnc import dnc
from fedjax_sim.server.dp_ftrl import dp_ftrl_aggregator, dp_ftrl_tree_noise
from fedjax_sim.server.noise import (GaussianNoiseState, dp_fedavg_aggregator,
                                     dp_mean_normalize, gaussian_noise)
from fedjax_sim.server.pairwise import bulyan, krum, multi_krum
from fedjax_sim.server.reducers import (centered_clipping, coordinate_median,
                                        geometric_median, sum_updates, trimmed_mean,
                                        unweighted_mean, weighted_mean)
from fedjax_sim._trees import per_client_l2_norms, scale_per_client, weighted_sum

__all__ = ["Chain", "CohortUpdates", "ServerTransform", "Stage", "StageKind", "as_chain",
           "chain", "client_stage", "cohort_size", "is_cohort", "masked_weights",
           "per_client_l2_norms", "scale_per_client", "weighted_sum", "zero_masked",
           "AdaptiveClipState", "ClipDiagnostics", "adaptive_clip", "clip_diagnostics",
           "clip_per_client", "zero_above_norm",
           "CompressionState", "hadamard_rotate_quantize", "stochastic_quantize",
           "top_k_sparsify",
           "dnc",
           "dp_ftrl_aggregator", "dp_ftrl_tree_noise",
           "GaussianNoiseState", "dp_fedavg_aggregator", "dp_mean_normalize",
           "gaussian_noise",
           "bulyan", "krum", "multi_krum",
           "centered_clipping", "coordinate_median", "geometric_median", "sum_updates",
           "trimmed_mean", "unweighted_mean", "weighted_mean"]
