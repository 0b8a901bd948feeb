"""t-out-of-n Shamir secret sharing over the prime field ``F_p``, ``p = 2^31 - 1`` (host).

Shamir 1979 ("How to share a secret"): the dealer draws a uniformly random polynomial
``f`` of degree ``t - 1`` over ``F_p`` with ``f(0) = secret`` and gives party ``i`` (for
``i = 1..n``) the share ``f(i)``. Any ``t`` shares determine ``f``, hence the secret, by
Lagrange interpolation at 0; any ``t - 1`` shares are uniform and independent of the
secret. SecAgg (Bonawitz et al. 2017) shares each client's self-mask seed and pairwise
secret key this way among its neighbours; :mod:`fedjax_sim.secagg.masking` models that
sharing by its threshold, and this module is the sharing itself, for tests and
demonstrations.

Arithmetic: NumPy ``int64`` on the host. Field elements are below ``2^31``, so a product
of two is below ``2^62`` and every product is reduced before the next addition; nothing
overflows. A secret is an array of field elements (a 256-bit seed takes nine 31-bit
elements); all its elements are shared at once with independent polynomials.
"""

from __future__ import annotations

import numpy as np

from fedjax_sim._validation import check_int, fail

PRIME = 2**31 - 1
"""The Mersenne prime ``2^31 - 1``: the field's order."""


def _field_array(field: str, values) -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype.kind not in "iu":
        fail(field, arr.dtype.name, "must be integers (elements of F_p)")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= PRIME):
        fail(field, f"[{arr.min()}, {arr.max()}]", f"must lie in [0, {PRIME})")
    return arr


def share(secret, t: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Shares ``secret`` (an int or an int array in ``[0, p)``) ``t``-out-of-``n``.

    Args:
      secret: the field element(s) to share.
      t: the reconstruction threshold, ``1 <= t <= n``.
      n: the number of shares (party ``i`` gets x-coordinate ``i``, ``i = 1..n``).
      rng: the dealer's randomness.

    Returns:
      ``int64 [n, *secret.shape]``: row ``i - 1`` is ``f(i)`` for party ``i``.
    """
    n = check_int("n", n, min_value=1, max_value=PRIME - 1)
    t = check_int("t", t, min_value=1, max_value=n)
    if not isinstance(rng, np.random.Generator):
        fail("rng", type(rng).__name__, "must be a numpy.random.Generator")
    s = _field_array("secret", secret)
    coeffs = rng.integers(0, PRIME, size=(t - 1, *s.shape), dtype=np.int64)
    xs = np.arange(1, n + 1, dtype=np.int64).reshape((n,) + (1,) * s.ndim)
    ys = np.zeros((n, *s.shape), np.int64)
    for a in coeffs[::-1]:  # Horner, highest degree first: y = (y + a) x
        ys = (ys + a) % PRIME * xs % PRIME
    return (ys + s) % PRIME


def reconstruct(xs, shares) -> np.ndarray:
    """The secret from shares ``f(x_i)`` at distinct nonzero ``xs``: Lagrange at 0.

    Correct whenever at least ``t`` shares are given; with fewer it returns a field
    element that is uniform and independent of the secret.

    Args:
      xs: ``[m]`` distinct x-coordinates in ``[1, p)`` (the parties' indices).
      shares: ``[m, ...]`` the shares of those parties.

    Returns:
      ``int64 [...]``, the secret.
    """
    x = _field_array("xs", xs).reshape(-1)
    y = _field_array("shares", shares)
    if x.size == 0 or y.ndim == 0 or y.shape[0] != x.size:
        fail("shares", y.shape, f"must have one row per x-coordinate ({x.size})")
    if np.any(x == 0) or np.unique(x).size != x.size:
        fail("xs", x.tolist(), "must be distinct and nonzero")
    total = np.zeros(y.shape[1:], np.int64)
    xl = [int(v) for v in x]
    for i, xi in enumerate(xl):
        num, den = 1, 1
        for j, xj in enumerate(xl):
            if j != i:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        weight = num * pow(den, PRIME - 2, PRIME) % PRIME  # Fermat inverse
        total = (total + y[i] * np.int64(weight) % PRIME) % PRIME
    return total


__all__ = ["PRIME", "reconstruct", "share"]
