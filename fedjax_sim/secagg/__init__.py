"""Secure aggregation, simulated faithfully: the server learns only the sum of the
cohort's uploads, computed in the integer ring ``Z_(2^b)``.

* :mod:`fedjax_sim.secagg.ring`: the ring's exact arithmetic in ``uint32`` words
  (wrap, modular sum, centring, modular clipping) for every ``b`` from 1 to 32;
* :mod:`fedjax_sim.secagg.encoding`: a client's float update into ring elements
  (rotation, clipping, scaling, stochastic rounding, wrap) and the server's decoding of
  the modular sum, with the scale that fits the cohort and wrap-around counted;
* :mod:`fedjax_sim.secagg.discrete`: distributed DP's integer noise (discrete Gaussian,
  Skellam) and conditional stochastic rounding;
* :mod:`fedjax_sim.secagg.masking`: SecAgg+'s neighbour graph, dropouts, the threshold
  rule, pairwise and self masks and their removal, and the protocol's bytes;
* :mod:`fedjax_sim.secagg.shamir`: t-out-of-n Shamir sharing over a prime field;
* :mod:`fedjax_sim.secagg.secure_sum`: the secure-sum reducer of the server chain.
"""

from fedjax_sim.secagg.encoding import (RingEncoding, choose_scale, count_wrapped, decode,
                                        encode)
from fedjax_sim.secagg.ring import (MAX_BITS, centre, check_bits, modular_clip, ring_mask,
                                    ring_sum, wrap)
from fedjax_sim.secagg.secure_sum import SecureAggregation, secure_sum

__all__ = ["MAX_BITS", "RingEncoding", "SecureAggregation", "centre", "check_bits",
           "choose_scale", "count_wrapped", "decode", "encode", "modular_clip", "ring_mask",
           "ring_sum", "secure_sum", "wrap"]
