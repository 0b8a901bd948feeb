"""Mapping a function over rows in equal chunks, with the function traced once.

``jax.lax.map(f, xs, batch_size=b)`` vmaps ``f`` over chunks of ``b`` rows and, when
``b`` does not divide the row count, vmaps it once more over the remainder: ``f`` is
traced and compiled twice. A round whose client update (model, optimiser, procedural
data generation) is the bulk of the program paid for that copy on every compile, and the
streaming reduction, which peeled its first chunk off to get the accumulator's shape,
paid for a third.

Here the rows are laid out in ``ceil(n / b)`` chunks of equal size
(:func:`chunk_layout`: at most ``b`` rows each, as even as possible, so fewer than one
padding row per chunk), the few padding rows are filled by the caller's rule, and ``f``
is vmapped over one chunk shape only. Padding rows never reach a result. Another chunk
size is another vectorised program (XLA may round differently) and groups sums over rows
differently, so results can differ from another chunk size's in the last bits.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

PyTree = Any


def chunk_layout(num_rows: int, chunk_size: int) -> tuple[int, int]:
    """``(number of chunks, rows per chunk)`` covering ``num_rows`` rows in chunks of at
    most ``chunk_size``, as equal as possible (padding rows < number of chunks)."""
    if num_rows <= 0:
        return 1, 0
    chunks = -(-num_rows // max(int(chunk_size), 1))
    return chunks, -(-num_rows // chunks)


def pad_rows(tree: PyTree, rows: int, fill: Any = None) -> PyTree:
    """Pads every leaf's leading axis to ``rows``.

    ``fill`` is the padding value of every leaf; None repeats each leaf's first row, which
    keeps padding rows valid inputs (PRNG keys, client states) for a function whose
    padded results are discarded.
    """
    def pad(leaf):
        extra = rows - leaf.shape[0]
        if extra <= 0:
            return leaf
        if fill is None:
            block = jnp.repeat(leaf[:1], extra, axis=0)
        else:
            block = jnp.full((extra,) + leaf.shape[1:], fill, leaf.dtype)
        return jnp.concatenate([leaf, block])

    return jax.tree.map(pad, tree)


def to_chunks(tree: PyTree, chunks: int) -> PyTree:
    """``[chunks * size, ...]`` leaves reshaped to ``[chunks, size, ...]``."""
    return jax.tree.map(lambda a: a.reshape((chunks, a.shape[0] // chunks) + a.shape[1:]),
                        tree)


def from_chunks(tree: PyTree, rows: int) -> PyTree:
    """``[chunks, size, ...]`` leaves flattened back to their first ``rows`` rows."""
    return jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:])[:rows], tree)


def chunked_map(fn: Callable[[PyTree], PyTree], xs: PyTree, chunk_size: int) -> PyTree:
    """``jax.lax.map(fn, xs, batch_size=chunk_size)`` with ``fn`` traced once.

    Rows are padded by repeating the first row; the padded rows' results are dropped.
    """
    rows = jax.tree.leaves(xs)[0].shape[0]
    chunks, size = chunk_layout(rows, chunk_size)
    if chunks == 1:
        return jax.vmap(fn)(xs)
    out = jax.lax.map(jax.vmap(fn), to_chunks(pad_rows(xs, chunks * size), chunks))
    return from_chunks(out, rows)


__all__ = ["chunk_layout", "chunked_map", "from_chunks", "pad_rows", "to_chunks"]
