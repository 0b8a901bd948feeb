"""Pairwise-distance robust reducers: Krum, Multi-Krum and Bulyan.

Distances use ``||a - b||^2 = ||a||^2 + ||b||^2 - 2 a.b`` computed leaf by leaf (no
flattened copy of the cohort) in blocks of ``block_size`` rows: a ``lax.map`` over row
blocks builds a ``[block, C]`` distance block, sorts each row and reduces it to its Krum
score at once, so memory is ``O(block * C)`` beyond the updates, never ``O(C^2)``. The
expansion loses relative precision for nearly identical updates (cancellation in float32);
dot products run at ``Precision.HIGHEST`` so GPUs do not drop to TF32.

The cohort size ``C`` is static; the number ``n`` of unmasked clients is traced. Masked
clients get an infinite score and are never selected. The static checks (``C >= 2f+3``,
``C >= 4f+3``) run when the update first sees the cohort shape; at run time a round with
fewer valid clients degrades gracefully (neighbour counts are clamped), without the
guarantee.

Threat model: at most ``f`` of the ``n`` unmasked clients are Byzantine (arbitrary,
colluding, omniscient updates); honest updates are i.i.d. estimates of the same gradient.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from fedjax_sim._trees import weighted_sum
from fedjax_sim._validation import check_choice, check_int, fail
from fedjax_sim.server.base import CohortUpdates, Stage, cohort_size
from fedjax_sim.server.reducers import (expand_mask, num_valid, sort_valid, sorted_at,
                                        stateless_reducer)

PyTree = Any
_HIGHEST = lax.Precision.HIGHEST


def _flat_leaves(updates: PyTree) -> list[jax.Array]:
    return [u.reshape(u.shape[0], -1).astype(jnp.float32) for u in jax.tree.leaves(updates)]


def _dist_rows(flats: list[jax.Array], sq: jax.Array, start: jax.Array,
               rows: int) -> jax.Array:
    """``[rows, C]`` squared distances of clients ``start .. start+rows-1`` to all clients."""
    dot = sum(lax.dot_general(lax.dynamic_slice_in_dim(x, start, rows, 0), x,
                              (((1,), (1,)), ((), ())), precision=_HIGHEST) for x in flats)
    sq_rows = lax.dynamic_slice_in_dim(sq, start, rows, 0)
    return jnp.maximum(sq_rows[:, None] + sq[None, :] - 2.0 * dot, 0.0)


def _row_scores(d: jax.Array, row_ids: jax.Array, candidates: jax.Array,
                num_neighbours: jax.Array) -> jax.Array:
    """Krum score of each row: sum of its ``num_neighbours`` smallest distances to the other
    candidates (``candidates`` is a ``[C]`` bool); non-candidate rows score ``+inf``."""
    c = d.shape[1]
    others = candidates[None, :] & (row_ids[:, None] != jnp.arange(c)[None, :])
    s = jnp.sort(jnp.where(others, d, jnp.inf), axis=1)
    score = jnp.sum(jnp.where(jnp.arange(c)[None, :] < num_neighbours, s, 0.0), axis=1)
    return jnp.where(candidates[row_ids], score, jnp.inf)


def _num_neighbours(n: jax.Array, f: int) -> jax.Array:
    """Krum's ``n - f - 2`` nearest neighbours, clamped into ``[0, n - 1]``."""
    return jnp.clip(n - f - 2, 0, jnp.maximum(n - 1, 0))


def krum_scores(cohort: CohortUpdates, num_byzantine: int, block_size: int) -> jax.Array:
    """``[C]`` float32 Krum scores of a zero-masked cohort (``+inf`` for masked clients).

    Blanchard et al. 2017: ``score(i) = sum of squared distances from u_i to its
    n - f - 2 nearest other unmasked clients``. Computed in row blocks (module docstring).
    """
    c = cohort_size(cohort)
    flats = _flat_leaves(cohort.updates)
    sq = sum(jnp.sum(jnp.square(x), axis=1) for x in flats)
    rows = min(block_size, c)
    num_blocks = -(-c // rows)
    # The last block is shifted back to end at C (it overlaps; overlapping rows agree).
    starts = jnp.minimum(jnp.arange(num_blocks, dtype=jnp.int32) * rows, c - rows)
    k = _num_neighbours(num_valid(cohort), num_byzantine)

    def block(start):
        row_ids = start + jnp.arange(rows, dtype=jnp.int32)
        return _row_scores(_dist_rows(flats, sq, start, rows), row_ids, cohort.mask, k)

    scores = lax.map(block, starts)
    ids = (starts[:, None] + jnp.arange(rows, dtype=jnp.int32)[None, :]).reshape(-1)
    return jnp.zeros((c,), jnp.float32).at[ids].set(scores.reshape(-1))


def _check_cohort(name: str, cohort: CohortUpdates, f: int, factor: int) -> None:
    c = cohort_size(cohort)
    if c < factor * f + 3:
        fail("num_byzantine", f, f"{name} needs cohort size >= {factor}*num_byzantine+3 = "
             f"{factor * f + 3}, got cohort size {c}")


def _take_client(updates: PyTree, index: jax.Array) -> PyTree:
    return jax.tree.map(lambda u: lax.dynamic_index_in_dim(u, index, 0, keepdims=False),
                        updates)


def _mean_of_selected(updates: PyTree, selected: jax.Array) -> PyTree:
    count = jnp.maximum(jnp.sum(selected.astype(jnp.float32)), 1.0)
    return weighted_sum(updates, selected.astype(jnp.float32) / count)


def krum(num_byzantine: int, *, block_size: int = 256) -> Stage:
    """Reducer: the single unmasked update with the lowest Krum score.

    Blanchard, El Mhamdi, Guerraoui, Stainer 2017, "Machine Learning with Adversaries:
    Byzantine Tolerant Gradient Descent": tolerates ``f`` Byzantine clients if
    ``n > 2f + 2`` (the output's expected deviation from the honest gradient is bounded,
    (alpha, f)-Byzantine resilience). Weights are ignored; the chosen update is returned as is.

    Args:
      num_byzantine: ``f >= 0``; the static cohort size must be ``>= 2f + 3``.
      block_size: rows of the distance matrix held at once.

    Returns:
      A non-streaming ``REDUCE`` stage named ``"krum"`` with ``min_cohort = 2f + 3``.
    """
    f = check_int("num_byzantine", num_byzantine, min_value=0)
    rows = check_int("block_size", block_size, min_value=1)

    def reduce_fn(cohort):
        _check_cohort("krum", cohort, f, 2)
        scores = krum_scores(cohort, f, rows)
        chosen = _take_client(cohort.updates, jnp.argmin(scores))
        return jax.tree.map(lambda x: jnp.where(num_valid(cohort) > 0, x, jnp.zeros_like(x)),
                            chosen)

    return stateless_reducer("krum", reduce_fn, min_cohort=2 * f + 3)


def multi_krum(num_byzantine: int, num_selected: int, *,
               block_size: int = 256) -> Stage:
    """Reducer: the plain mean of the ``m`` unmasked updates with the lowest Krum scores.

    Multi-Krum (Blanchard et al. 2017, Sec. 5; El Mhamdi et al. 2018): same assumption as
    Krum (``n > 2f + 2``), lower variance for ``m > 1``. If fewer than ``m`` clients are
    unmasked, all of them are averaged. Weights are ignored; ties go to the lower index.

    Args:
      num_byzantine: ``f >= 0``; the static cohort size must be ``>= 2f + 3``.
      num_selected: ``m >= 1``, at most the cohort size.
      block_size: rows of the distance matrix held at once.

    Returns:
      A non-streaming ``REDUCE`` stage named ``"multi_krum"`` with ``min_cohort =
      max(2f + 3, m)``.
    """
    f = check_int("num_byzantine", num_byzantine, min_value=0)
    m = check_int("num_selected", num_selected, min_value=1)
    rows = check_int("block_size", block_size, min_value=1)

    def reduce_fn(cohort):
        _check_cohort("multi_krum", cohort, f, 2)
        if m > cohort_size(cohort):
            fail("num_selected", m, f"must be <= cohort size {cohort_size(cohort)}")
        scores = krum_scores(cohort, f, rows)
        order = jnp.argsort(scores, stable=True)
        rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0]))
        selected = (rank < m) & cohort.mask
        return _mean_of_selected(cohort.updates, selected)

    return stateless_reducer("multi_krum", reduce_fn, min_cohort=max(2 * f + 3, m))


def _iterative_krum_selection(cohort: CohortUpdates, f: int, theta: jax.Array) -> jax.Array:
    """Bulyan's exact selection: ``theta`` rounds of Krum on the shrinking remaining set.

    Materialises the ``[C, C]`` distance matrix: for small cohorts only.
    """
    c = cohort_size(cohort)
    flats = _flat_leaves(cohort.updates)
    sq = sum(jnp.sum(jnp.square(x), axis=1) for x in flats)
    d = _dist_rows(flats, sq, jnp.int32(0), c)
    ids = jnp.arange(c, dtype=jnp.int32)

    def step(t, selected):
        remaining = cohort.mask & ~selected
        k = _num_neighbours(jnp.sum(remaining.astype(jnp.int32)), f)
        j = jnp.argmin(_row_scores(d, ids, remaining, k))
        return selected.at[j].set(selected[j] | ((t < theta) & remaining[j]))

    return lax.fori_loop(0, max(c - 2 * f, 1), step, jnp.zeros((c,), bool))


def bulyan(num_byzantine: int, *, selection: str = "one_shot",
           block_size: int = 256) -> Stage:
    """Reducer: Bulyan, Krum selection followed by a coordinate-wise trimmed median-mean.

    El Mhamdi, Guerraoui, Rouault 2018, "The Hidden Vulnerability of Distributed Learning in
    Byzantium": select ``theta = n - 2f`` updates with Krum, then per coordinate average the
    ``beta = theta - 2f`` selected values closest to the coordinate median. Requires
    ``n >= 4f + 3``; then every coordinate of the output is within the range of honest values
    and its deviation is ``O(1/sqrt(d))`` of Krum's (strong Byzantine resilience).

    ``selection="iterative"`` is the paper's recursion (Krum re-run on the remaining set
    ``theta`` times); it holds the ``[C, C]`` distance matrix and costs ``O(theta C^2)``, so
    use it only for small cohorts. ``selection="one_shot"`` (default, scales to ``C=10^4``)
    takes the ``theta`` lowest Krum scores of one blocked pass (the Multi-Krum selection);
    it differs from the recursion only in how scores are refreshed after each pick.

    Args:
      num_byzantine: ``f >= 0``; the static cohort size must be ``>= 4f + 3``.
      selection: ``"one_shot"`` or ``"iterative"``.
      block_size: rows of the distance matrix held at once (one-shot selection).

    Returns:
      A non-streaming ``REDUCE`` stage named ``"bulyan"`` with ``min_cohort = 4f + 3``.
    """
    f = check_int("num_byzantine", num_byzantine, min_value=0)
    mode = check_choice("selection", selection, ("one_shot", "iterative"))
    rows = check_int("block_size", block_size, min_value=1)

    def reduce_fn(cohort):
        _check_cohort("bulyan", cohort, f, 4)
        n = num_valid(cohort)
        theta = jnp.maximum(n - 2 * f, jnp.minimum(n, 1))
        if mode == "iterative":
            selected = _iterative_krum_selection(cohort, f, theta)
        else:
            scores = krum_scores(cohort, f, rows)
            order = jnp.argsort(scores, stable=True)
            rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0]))
            selected = (rank < theta) & cohort.mask
        num_sel = jnp.sum(selected.astype(jnp.int32))
        beta = jnp.maximum(num_sel - 2 * f, jnp.minimum(num_sel, 1))
        rank_c = jnp.arange(cohort_size(cohort))

        def leaf(u):
            s = sort_valid(u, selected)
            med = (sorted_at(s, (num_sel - 1) // 2) + sorted_at(s, num_sel // 2)) / 2
            dist = jnp.where(expand_mask(selected, u), jnp.abs(u - med[None]),
                             jnp.asarray(jnp.inf, u.dtype))
            order_u = jnp.argsort(dist, axis=0, stable=True)
            closest = jnp.take_along_axis(u, order_u, axis=0)
            keep = expand_mask(rank_c < beta, closest)
            total = jnp.sum(jnp.where(keep, closest, 0).astype(jnp.float32), axis=0)
            return (total / jnp.maximum(beta, 1).astype(jnp.float32)).astype(u.dtype)

        return jax.tree.map(leaf, cohort.updates)

    return stateless_reducer("bulyan", reduce_fn, min_cohort=4 * f + 3)
