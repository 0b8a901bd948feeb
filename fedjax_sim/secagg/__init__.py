"""Secure aggregation, simulated faithfully: the server learns only the sum of the
cohort's uploads, computed in the integer ring ``Z_(2^b)``.

* :mod:`fedjax_sim.secagg.ring`: the ring's exact arithmetic in ``uint32`` words
  (wrap, modular sum, centring, modular clipping) for every ``b`` from 1 to 32;
* :mod:`fedjax_sim.secagg.encoding`: a client's float update into ring elements
  (rotation, clipping, scaling, stochastic rounding, wrap) and the server's decoding of
  the modular sum, with the scale that fits the cohort and wrap-around counted.

Not yet here (issue 14): the secure-sum stage of the server chain, pairwise masking with
dropout, and distributed DP.
"""

from fedjax_sim.secagg.encoding import (RingEncoding, choose_scale, count_wrapped, decode,
                                        encode)
from fedjax_sim.secagg.ring import (MAX_BITS, centre, check_bits, modular_clip, ring_mask,
                                    ring_sum, wrap)

__all__ = ["MAX_BITS", "RingEncoding", "centre", "check_bits", "choose_scale",
           "count_wrapped", "decode", "encode", "modular_clip", "ring_mask", "ring_sum",
           "wrap"]
