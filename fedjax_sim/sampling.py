"""Client sampling inside jit, with cost independent of the population size.

Both samplers draw cohort ids from a keyed pseudo-random permutation of ``[0, N)``:
the *swap-or-not* shuffle (Hoang, Morris & Rogaway, CRYPTO 2012). Each of its rounds pairs
``x`` with ``K_r - x (mod N)`` and swaps the two when a keyed bit of the pair says so; the
composition of these involutions is a permutation of ``[0, N)`` for any N, evaluated
pointwise. Evaluating it at ``0..M-1`` yields M *distinct* ids in O(M log N) work and O(M)
memory, so sampling 1,000 of 10^7 clients never touches the other 9,999,000.

* :class:`FixedSizeSampler` -- exactly ``cohort_size`` distinct clients per round (uniform
  subset without replacement, up to the pseudo-randomness of the permutation).
* :class:`PoissonSampler` -- every client independently with probability ``rate``. The
  cohort size is drawn as ``Binomial(N, rate)`` and that many distinct clients are taken
  from the permutation, which has exactly the law of independent Bernoulli(rate)
  inclusions. The drawn cohort is padded with masked slots to a static capacity
  ``max_cohort``. If a draw exceeds the capacity, the first ``max_cohort`` clients are kept
  and the excess is reported in ``Cohort.overflow`` (the runner logs it). Truncation
  breaks the exact Poisson law on which DP accounting relies, so the default capacity is
  the Binomial quantile at ``1 - 1e-10``: an overflow then has probability below 1e-10
  per round.
* :class:`CyclicSampler` -- no randomness in who participates: round r takes the r-th
  block of ``cohort_size`` clients of one fixed pseudo-random permutation, so every client
  participates exactly once per pass over the population (the "each client once per
  epoch" setting of DP-FTRL, and a full pass for throughput runs). There is no privacy
  amplification by sampling.

Every sampler has ``sample(key, round_index)``; only the cyclic sampler reads the round.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import struct

from fedjax_sim._threefry import threefry2x32
from fedjax_sim._validation import check_float, check_int, fail
from fedjax_sim.privacy.schedule import SamplingSpec


@struct.dataclass
class Cohort:
    """One round's sampled clients.

    Attributes:
      ids: ``[M]`` int32 client ids; ``-1`` in padding slots.
      mask: ``[M]`` bool, ``True`` for sampled clients.
      overflow: int32 scalar, clients drawn beyond the capacity and dropped (Poisson only).
    """

    ids: jax.Array
    mask: jax.Array
    overflow: jax.Array


def _num_shuffle_rounds(n: int) -> int:
    return 6 * max(1, math.ceil(math.log2(max(n, 2)))) + 8


def permute_indices(key: jax.Array, positions: jax.Array, n: int) -> jax.Array:
    """Images of ``positions`` under a keyed pseudo-random permutation of ``[0, n)``.

    Args:
      key: PRNG key choosing the permutation.
      positions: int array of distinct values in ``[0, n)``.
      n: domain size (static), at most 2**31 - 1.

    Returns:
      int32 array of the same shape; distinct inputs map to distinct outputs.
    """
    rounds = _num_shuffle_rounds(n)
    offsets = jax.random.randint(jax.random.fold_in(key, 0), (rounds,), 0, n, dtype=jnp.int32)
    # The round bits hash the counter (pivot, round) with Threefry-2x32 under a key drawn
    # from ``key``, unrolled into one fused kernel. (JAX's own lowering is a rolled loop on
    # CPU, which made sampling ~12% of a softmax round; and per-pivot ``fold_in`` under
    # vmap is not consistent across batch positions for the "rbg" PRNG implementations.)
    k0, k1 = jax.random.bits(jax.random.fold_in(key, 1), (2,), jnp.uint32)

    def round_bits(r, pivot):
        return threefry2x32(k0, k1, pivot.astype(jnp.uint32),
                            jnp.broadcast_to(r.astype(jnp.uint32), pivot.shape))[0]

    def one_round(r, x):
        partner = jnp.mod(offsets[r] - x, n)
        pivot = jnp.maximum(x, partner)
        return jnp.where((round_bits(r, pivot) & 1) == 1, partner, x)

    return jax.lax.fori_loop(0, rounds, one_round, positions.astype(jnp.int32))


@dataclasses.dataclass(frozen=True)
class FixedSizeSampler:
    """Samples exactly ``cohort_size`` distinct clients out of ``num_clients`` per round."""

    num_clients: int
    cohort_size: int

    def __post_init__(self):
        check_int("num_clients", self.num_clients, min_value=1, max_value=2**31 - 1)
        check_int("cohort_size", self.cohort_size, min_value=1)
        if self.cohort_size > self.num_clients:
            fail("cohort_size", self.cohort_size,
                 f"exceeds the population size num_clients={self.num_clients}")

    @property
    def capacity(self) -> int:
        return self.cohort_size

    @property
    def spec(self) -> SamplingSpec:
        """What a DP ledger needs: sampling without replacement, m of n."""
        return SamplingSpec.fixed(self.cohort_size, self.num_clients)

    def sample(self, key: jax.Array, round_index: jax.Array | None = None) -> Cohort:
        del round_index
        ids = permute_indices(key, jnp.arange(self.cohort_size), self.num_clients)
        return Cohort(ids=ids, mask=jnp.ones((self.cohort_size,), bool),
                      overflow=jnp.zeros((), jnp.int32))


def poisson_capacity(num_clients: int, rate: float, tail: float = 1e-10) -> int:
    """Smallest capacity ``M`` with ``P[Binomial(num_clients, rate) > M] <= tail``.

    The one home of the Poisson cohort's capacity (the default sampler and DP runs, which
    ask for a tail far below what ``scipy.stats.binom.isf`` resolves). ``isf`` is only the
    starting point of a doubling-and-bisection search on the survival function, so the
    result is exact.
    """
    from scipy import stats  # scipy is a dependency of jax itself.

    n = check_int("num_clients", num_clients, min_value=1)
    q = check_float("rate", rate, min_value=0.0, max_value=1.0, min_exclusive=True)
    tail = check_float("tail", tail, min_value=0.0, max_value=1.0, min_exclusive=True)
    if q >= 1.0:
        return n
    lo = int(stats.binom.isf(max(tail, 1e-15), n, q))
    lo = max(0, min(lo, n))
    if stats.binom.sf(lo, n, q) <= tail:
        while lo > 0 and stats.binom.sf(lo - 1, n, q) <= tail:
            lo -= 1
        return max(1, lo)
    step = max(1, int(math.sqrt(n * q * (1 - q))))
    hi = lo + step
    while hi < n and stats.binom.sf(hi, n, q) > tail:
        lo, hi, step = hi, hi + 2 * step, 2 * step
    hi = min(hi, n)
    while hi - lo > 1:  # invariant: sf(lo) > tail >= sf(hi)
        mid = (lo + hi) // 2
        if stats.binom.sf(mid, n, q) > tail:
            lo = mid
        else:
            hi = mid
    return max(1, hi)


default_poisson_capacity = poisson_capacity


@dataclasses.dataclass(frozen=True)
class PoissonSampler:
    """Includes each client independently with probability ``rate``; padded to ``max_cohort``.

    Attributes:
      num_clients: population size N.
      rate: inclusion probability q in (0, 1].
      max_cohort: static capacity; defaults to the ``1 - 1e-10`` Binomial quantile.
    """

    num_clients: int
    rate: float
    max_cohort: int | None = None

    def __post_init__(self):
        check_int("num_clients", self.num_clients, min_value=1, max_value=2**31 - 1)
        check_float("rate", self.rate, min_value=0.0, max_value=1.0, min_exclusive=True)
        if self.max_cohort is None:
            object.__setattr__(self, "max_cohort",
                               poisson_capacity(self.num_clients, self.rate))
        check_int("max_cohort", self.max_cohort, min_value=1, max_value=self.num_clients)

    @property
    def capacity(self) -> int:
        return int(self.max_cohort)

    @property
    def spec(self) -> SamplingSpec:
        """What a DP ledger needs: Poisson sampling with rate q (of n clients)."""
        return SamplingSpec.poisson(self.rate, population_size=self.num_clients)

    def sample(self, key: jax.Array, round_index: jax.Array | None = None) -> Cohort:
        del round_index
        count_key, perm_key = jax.random.split(key)
        drawn = jax.random.binomial(count_key, self.num_clients, self.rate).astype(jnp.int32)
        kept = jnp.minimum(drawn, self.capacity)
        slots = jnp.arange(self.capacity)
        ids = permute_indices(perm_key, slots, self.num_clients)
        mask = slots < kept
        return Cohort(ids=jnp.where(mask, ids, -1), mask=mask, overflow=drawn - kept)


@dataclasses.dataclass(frozen=True)
class CyclicSampler:
    """Round r trains clients ``perm[(r*m + i) mod N]`` for ``i < m``: disjoint blocks.

    ``perm`` is a pseudo-random permutation of ``[0, N)`` fixed by ``seed``; when
    ``cohort_size`` divides ``num_clients`` every client participates exactly once in
    every ``N / m`` consecutive rounds.
    """

    num_clients: int
    cohort_size: int
    seed: int = 0

    def __post_init__(self):
        check_int("num_clients", self.num_clients, min_value=1, max_value=2**31 - 1)
        check_int("cohort_size", self.cohort_size, min_value=1)
        check_int("seed", self.seed, min_value=0, max_value=2**32 - 1)
        if self.cohort_size > self.num_clients:
            fail("cohort_size", self.cohort_size,
                 f"exceeds the population size num_clients={self.num_clients}")
        if self._period * self.cohort_size >= 2**31:
            fail("cohort_size", self.cohort_size,
                 f"with num_clients={self.num_clients} the block offsets overflow int32; "
                 "choose a cohort size sharing a larger factor with num_clients")

    @property
    def _period(self) -> int:
        """Rounds after which the block offsets repeat."""
        return self.num_clients // math.gcd(self.num_clients, self.cohort_size)

    @property
    def capacity(self) -> int:
        return self.cohort_size

    @property
    def spec(self) -> SamplingSpec:
        """Deterministic participation: no amplification by sampling."""
        return SamplingSpec.cyclic(self.cohort_size, self.num_clients)

    def sample(self, key: jax.Array, round_index: jax.Array | None = None) -> Cohort:
        del key
        if round_index is None:
            raise ValueError("CyclicSampler.sample needs the round index")
        n = self.num_clients
        start = (jnp.asarray(round_index, jnp.int32) % self._period) * self.cohort_size % n
        positions = (start + jnp.arange(self.cohort_size)) % n
        ids = permute_indices(jax.random.key(self.seed), positions, n)
        return Cohort(ids=ids, mask=jnp.ones((self.cohort_size,), bool),
                      overflow=jnp.zeros((), jnp.int32))


Sampler = FixedSizeSampler | PoissonSampler | CyclicSampler
