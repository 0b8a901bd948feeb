"""Secure aggregation, simulated faithfully: the server learns only the sum of the
cohort's uploads, computed in the integer ring ``Z_(2^b)``.

* :mod:`fedjax_sim.secagg.ring`: the ring's exact arithmetic in ``uint32`` words
  (wrap, modular sum, centring, modular clipping) for every ``b`` from 1 to 32.
"""

from fedjax_sim.secagg.ring import (MAX_BITS, centre, check_bits, modular_clip, ring_mask,
                                    ring_sum, wrap)

__all__ = ["MAX_BITS", "centre", "check_bits", "modular_clip", "ring_mask", "ring_sum",
           "wrap"]
