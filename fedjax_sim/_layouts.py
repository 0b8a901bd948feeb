"""Layouts of the matmuls inside per-client layers, for XLA:CPU.

A client's model runs under ``vmap`` over the cohort with its own params, so every layer's
matmul becomes a batched matmul over clients with a small local batch. XLA:CPU runs some
of those shapes several times slower than others, and runs a vmapped convolution (whose
kernel is per client) as a grouped convolution, slower still. The functions here compute
the same values with layouts that batch well; flax layers take them as their
``dot_general`` / ``conv_general_dilated``. Every function equals the plain ``lax`` op,
values and derivatives of every order (tested), and falls back to it outside the cases it
handles.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


SMALL_BATCH_ROWS = 256
"""Dense layers seeing at most this many input rows get the weight-gradient layout below."""


@jax.custom_jvp
def _dense_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.matmul(x, w)


@_dense_matmul.defjvp
def _dense_matmul_jvp(primals, tangents):
    """``x @ w``'s JVP, written so that XLA:CPU computes its transpose (the weight
    gradient ``x^T g``) with a fast matmul layout when a layer sees few rows.

    Left alone, XLA emits the weight gradient as a dot contracting the leading (row)
    axes of both operands; vmapped over clients with a small local batch, XLA:CPU runs
    that batched dot several times slower than a plain one. Optimisation barriers pin
    one of two layouts, chosen by which costs fewer extra bytes:

    * narrow outputs (``j <= rows``, e.g. a classifier head): the tangent is
      ``(dw^T x^T)^T``, whose transpose is ``barrier(barrier(g^T) @ x)^T``: a
      transposed cotangent (``j x rows``, as small as the layer's output), a plain
      ``[j, rows] x [rows, i]`` dot, and a final transpose that fuses into the
      optimiser's update;
    * wide outputs: ``x^T`` (``i x rows``) is materialised and the weight gradient is
      the plain ``[i, rows] x [rows, j]`` dot, with no transpose of the ``i x j``
      result.

    Measured by interleaved A/B on 2 CPU cores (BENCHMARKS.md): the first form makes
    the softmax-regression round about 10% faster than the second, and applying it to
    the 200-wide MLP layers made that round about 5% slower. For large batches
    (centralised training) neither copy pays, and the plain form is kept. Values are
    unchanged in every case, forward-mode tangents included.
    """
    x, w = primals
    dx, dw = tangents
    rows = math.prod(x.shape[:-1])
    x2 = x.reshape(rows, x.shape[-1])
    if rows > SMALL_BATCH_ROWS:
        dw_term = x2 @ dw
    elif w.shape[-1] <= rows:
        dwt = jax.lax.optimization_barrier(dw.T)
        dw_term = jax.lax.optimization_barrier(dwt @ x2.T).T
    else:
        dw_term = jax.lax.optimization_barrier(x2.T).T @ dw
    return (jnp.matmul(x, w),
            jnp.matmul(dx, w) + dw_term.reshape(x.shape[:-1] + (w.shape[-1],)))


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None,
                      preferred_element_type=None):
    """``lax.dot_general`` for ``flax.linen.Dense``, with :func:`_dense_matmul`'s layout of
    the weight gradient for the plain ``[..., i] x [i, j]`` case."""
    (lc, rc), (lb, rb) = dimension_numbers
    if (lb or rb or tuple(lc) != (lhs.ndim - 1,) or tuple(rc) != (0,) or rhs.ndim != 2
            or precision is not None or preferred_element_type is not None):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type)
    return _dense_matmul(lhs, rhs)


class _ConvGeometry(NamedTuple):
    """Static arguments of a channels-last convolution (hashable, for ``nondiff_argnums``)."""

    strides: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    dilation: tuple[int, ...]
    dimension_numbers: lax.ConvDimensionNumbers


def patch_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
               dimension_numbers=None, feature_group_count=1, batch_group_count=1,
               precision=None, preferred_element_type=None):
    """``lax.conv_general_dilated`` whose derivatives are patches times a matrix.

    Its value is ``lax.conv_general_dilated``'s (the fastest forward pass for evaluation).
    Its JVP, and so every gradient, is computed as im2col: the input is padded, the
    kernel window's ``prod(window)`` strided slices are concatenated along channels
    (offsets major, channels minor: the order of a flattened ``HWIO`` kernel), and the
    result is one ``[..., prod(window) * in] x [prod(window) * in, out]`` matmul with
    :func:`dense_dot_general`'s weight-gradient layout. Under ``vmap`` over clients with
    per-client kernels that is a batched matmul, where the convolution would become a
    grouped convolution with one group per client; and XLA:CPU's convolution weight
    gradient, a convolution over the batch axis, is itself slow (BENCHMARKS.md).

    Handles channels-last layouts (``NHWC``/``HWIO``, any number of spatial axes) with
    strides, explicit or string padding and kernel dilation. Anything else (feature or
    batch groups, input dilation, other layouts, an explicit precision or output type)
    is passed to ``lax.conv_general_dilated`` unchanged.
    """
    nsp = lhs.ndim - 2
    lhs_dilation = tuple(lhs_dilation or (1,) * nsp)
    rhs_dilation = tuple(rhs_dilation or (1,) * nsp)
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    spatial = tuple(range(1, nsp + 1))
    channels_last = (tuple(dn.lhs_spec) == (0, nsp + 1) + spatial
                     and tuple(dn.out_spec) == tuple(dn.lhs_spec)
                     and tuple(dn.rhs_spec) == (nsp + 1, nsp) + tuple(range(nsp)))
    if (not channels_last or feature_group_count != 1 or batch_group_count != 1
            or any(d != 1 for d in lhs_dilation) or precision is not None
            or preferred_element_type is not None):
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
            dimension_numbers, feature_group_count, batch_group_count,
            precision=precision, preferred_element_type=preferred_element_type)
    if isinstance(padding, str):
        extent = [(k - 1) * d + 1 for k, d in zip(rhs.shape[:nsp], rhs_dilation)]
        padding = lax.padtype_to_pads(lhs.shape[1:-1], extent, window_strides, padding)
    geometry = _ConvGeometry(tuple(int(s) for s in window_strides),
                             tuple((int(lo), int(hi)) for lo, hi in padding), rhs_dilation, dn)
    return _channels_last_conv(lhs, rhs, geometry)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _channels_last_conv(x, w, geometry: _ConvGeometry):
    return lax.conv_general_dilated(x, w, geometry.strides, geometry.padding,
                                    rhs_dilation=geometry.dilation,
                                    dimension_numbers=geometry.dimension_numbers)


@_channels_last_conv.defjvp
def _channels_last_conv_jvp(geometry, primals, tangents):
    return jax.jvp(functools.partial(_im2col_conv, geometry=geometry), primals, tangents)


def _im2col_conv(x, w, geometry: _ConvGeometry):
    """The convolution as concatenated strided slices times the flattened kernel."""
    nsp = x.ndim - 2
    window = w.shape[:nsp]
    x = jnp.pad(x, ((0, 0),) + geometry.padding + ((0, 0),))
    out_size = [(x.shape[1 + i] - (k - 1) * d - 1) // st + 1 for i, (k, d, st) in
                enumerate(zip(window, geometry.dilation, geometry.strides))]
    columns = []
    for offset in np.ndindex(*window):
        start = (0,) + tuple(o * d for o, d in zip(offset, geometry.dilation)) + (0,)
        limit = ((x.shape[0],)
                 + tuple(s + (n - 1) * st + 1 for s, n, st in zip(start[1:-1], out_size,
                                                                  geometry.strides))
                 + (x.shape[-1],))
        columns.append(lax.slice(x, start, limit, (1, *geometry.strides, 1)))
    return _dense_matmul(jnp.concatenate(columns, axis=-1), w.reshape(-1, w.shape[-1]))
