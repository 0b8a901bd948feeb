"""Malicious server: the imprint module of "Robbing the Fed" (Fowl et al., ICLR 2022).

Threat model: a malicious server. It may change the model it sends (here: prepend a
layer to it and choose every weight), and then reads the returned update: one client's
update, or only the sum over the whole cohort (secure aggregation hides individual updates
but not their sum, and the sum is enough). It knows the data domain: the distribution of
one scalar measurement of an example (from public/auxiliary data, or assumed Gaussian).
Clients run ordinary local training (FedSGD here; FedAvg's several steps move the imprint
weights and blur the read-off) and the server sees their deltas without clipping or noise
unless a defence is applied.

Construction. The prepended block is ``x -> Dense(k) -> ReLU -> Dense(d) -> inner model``.
All ``k`` rows of the first layer are one measurement direction ``w`` (the mean pixel
intensity, or a random direction); bias ``i`` is ``-e_i`` with ``e_0 < ... < e_{k-1}`` the
quantiles of the measurement ``m(x) = w . x`` at ``0, 1/k, ..., (k-1)/k``, so unit ``i``
fires for ``m(x) > e_i`` and bins ``[e_i, e_{i+1})`` are equiprobable. The second layer has
identical rows, so the loss gradient reaching unit ``i`` from one example is the same
scalar ``g(x)`` for every active unit. Then ``dL/dW_i = sum_{m(x) > e_i} g(x) x`` and
``dL/db_i = sum_{m(x) > e_i} g(x)``; neighbouring bins differ by the examples of bin ``i``
only, and an example alone in its bin is read off exactly:
``x = (dW_i - dW_{i+1}) / (db_i - db_{i+1})`` (the top bin: ``dW_{k-1} / db_{k-1}``).
Sums over clients and the mean loss's ``1/B`` leave this ratio unchanged. The imprint
weights are made tiny (``ImprintConfig.weight_scale``) and the next layer large, so that
the function is unchanged but the weights are negligible next to their gradients: a
client's float32 delta ``(w - lr g) - w`` then carries ``lr g`` to full precision, which
the differencing needs. An example is
alone in its bin with probability ``(1 - 1/k)^(n-1)`` for ``n`` examples and equiprobable
bins (:func:`predicted_recovery_rate`).

The *sparse* variant (breaching's ``SparseImprintBlock``) replaces the ReLU by a window
``clip(a (m(x) - e_i) / (e_{i+1} - e_i), 0, a)`` whose gradient is nonzero only for examples
inside bin ``i``: then ``x = dW_i / db_i`` directly, one bin at a time, without
differencing (no cancellation between bins, same alone-in-bin probability).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim._validation import check_choice, check_float, check_int, fail
from fedjax_sim.attacks.inversion import Reconstruction
from fedjax_sim.models import Model

PyTree = Any

VARIANTS = ("dense", "sparse")
DIRECTIONS = ("mean", "random")


@dataclasses.dataclass(frozen=True)
class ImprintConfig:
    """The malicious server's imprint block.

    Attributes:
      num_bins: ``k``, the number of bins (units of the imprint layer).
      variant: ``"dense"`` (ReLU, differencing neighbouring bins) or ``"sparse"``
        (window activation, one bin at a time).
      direction: ``"mean"`` (mean pixel intensity) or ``"random"`` (a random unit
        direction; continuous, so no ties between examples).
      weight_scale: ``a``, the magnitude of the imprint layer's pre-activations (``a``
        times the measurement in bin widths); the next layer is scaled by ``1/a``. A small
        ``a`` makes the imprint weights tiny next to their gradients, so that the float32
        delta ``(w - lr g) - w`` a client sends keeps the gradient's full precision.
    """

    num_bins: int = 64
    variant: str = "dense"
    direction: str = "random"
    weight_scale: float = 1e-6

    def __post_init__(self):
        check_int("num_bins", self.num_bins, min_value=2)
        check_float("weight_scale", self.weight_scale, min_value=0.0, min_exclusive=True)
        check_choice("variant", self.variant, VARIANTS)
        check_choice("direction", self.direction, DIRECTIONS)


def measurement_direction(kind: str, input_dim: int, *, key: jax.Array | None = None
                          ) -> np.ndarray:
    """The measurement ``w`` (``[d]``): ``mean`` = ``1/d`` everywhere, ``random`` = unit normal.

    Args:
      kind: ``"mean"`` or ``"random"``.
      input_dim: ``d``, the flattened example size.
      key: PRNG key (``random`` only).

    Returns:
      float64 ``[d]`` direction.
    """
    check_choice("direction", kind, DIRECTIONS)
    check_int("input_dim", input_dim, min_value=1)
    if kind == "mean":
        return np.full((input_dim,), 1.0 / input_dim)
    if key is None:
        fail("key", None, "a PRNG key is required for a random measurement direction")
    w = np.asarray(jax.random.normal(key, (input_dim,)), np.float64)
    return w / np.linalg.norm(w)


def measure(x: Any, direction: np.ndarray) -> np.ndarray:
    """``m(x) = w . flatten(x)`` for every example of ``[N, ...]``."""
    x = np.asarray(x, np.float64)
    return x.reshape(len(x), -1) @ np.asarray(direction, np.float64)


def bin_edges_from_data(measurements: Any, num_bins: int) -> np.ndarray:
    """``k + 1`` edges at the empirical quantiles ``0, 1/k, ..., 1`` of auxiliary data.

    The outer edges are pushed out by half the data's range so that unseen examples
    slightly beyond the auxiliary data still land in the outer bins.

    Args:
      measurements: ``[N]`` measurements of auxiliary examples.
      num_bins: ``k``.

    Returns:
      float64 ``[k + 1]`` increasing edges.
    """
    m = np.asarray(measurements, np.float64).ravel()
    k = check_int("num_bins", num_bins, min_value=2)
    if m.size < 2:
        fail("measurements", f"<{m.size} values>", "need at least 2 auxiliary examples")
    edges = np.quantile(m, np.linspace(0.0, 1.0, k + 1))
    spread = max(float(m.max() - m.min()), 1e-12)
    edges[0] -= 0.5 * spread
    edges[-1] += 0.5 * spread
    return edges


def bin_edges_gaussian(mean: float, std: float, num_bins: int) -> np.ndarray:
    """``k + 1`` edges at the quantiles of ``N(mean, std^2)`` (outer edges at +-10 std)."""
    mean = check_float("mean", mean)
    std = check_float("std", std, min_value=0.0, min_exclusive=True)
    k = check_int("num_bins", num_bins, min_value=2)
    from scipy.special import ndtri  # here: importing scipy.stats takes a second

    inner = ndtri(np.arange(1, k) / k)
    return mean + std * np.concatenate([[-10.0], inner, [10.0]])


def predicted_recovery_rate(num_examples: int, num_bins: int) -> float:
    """``(1 - 1/k)^(n - 1)``: probability that an example is alone in one of k equiprobable bins."""
    n = check_int("num_examples", num_examples, min_value=1)
    k = check_int("num_bins", num_bins, min_value=1)
    return (1.0 - 1.0 / k) ** (n - 1)


def expected_recovery_rate(bin_probabilities: Any, num_examples: int) -> float:
    """``sum_i p_i (1 - p_i)^(n - 1)``: the alone-in-bin probability for unequal bins."""
    p = np.asarray(bin_probabilities, np.float64)
    n = check_int("num_examples", num_examples, min_value=1)
    return float(np.sum(p * (1.0 - p) ** (n - 1)))


class ImprintedModule(nn.Module):
    """``x -> Dense(k) -> ReLU | window -> Dense(d) -> inner`` (the imprint block prepended)."""

    inner: nn.Module
    num_bins: int
    example_shape: tuple[int, ...]
    variant: str = "dense"
    window: float = 1.0

    @nn.compact
    def __call__(self, x):
        nd = len(self.example_shape)
        flat = x.reshape(x.shape[:x.ndim - nd] + (-1,))
        z = nn.Dense(self.num_bins, name="imprint")(flat)
        h = nn.relu(z) if self.variant == "dense" else jnp.clip(z, 0.0, self.window)
        back = nn.Dense(flat.shape[-1], name="project")(h)
        return self.inner(back.reshape(x.shape))


def make_imprint_model(inner: Model, inner_params: PyTree, config: ImprintConfig,
                       direction: np.ndarray, edges: np.ndarray) -> tuple[Model, PyTree]:
    """The malicious model (imprint block + the inner model) and its params.

    Args:
      inner: the model the federation trains (any classifier over the same inputs).
      inner_params: its current global params (kept unchanged).
      config: the imprint block.
      direction: ``[d]`` measurement direction (:func:`measurement_direction`).
      edges: ``[k + 1]`` increasing bin edges (:func:`bin_edges_from_data` or
        :func:`bin_edges_gaussian`).

    Returns:
      ``(model, params)``; clients train this like any model.
    """
    k = config.num_bins
    d = math.prod(inner.example_shape)
    w = np.asarray(direction, np.float64).ravel()
    e = np.asarray(edges, np.float64).ravel()
    if w.shape != (d,):
        fail("direction.shape", w.shape, f"must be ({d},)")
    if e.shape != (k + 1,) or not np.all(np.diff(e) > 0):
        fail("edges", f"<shape {e.shape}>", f"must be {k + 1} strictly increasing values")
    a = config.weight_scale
    module = ImprintedModule(inner.module, k, tuple(inner.example_shape), config.variant,
                             window=a)
    if config.variant == "dense":
        # z_i = a (m - e_i) / (typical bin width): unit-free pre-activations of size ~a.
        scale = a * k / (e[k - 1] - e[1]) if k > 2 else a / (e[-1] - e[0])
        kernel = np.tile((scale * w)[:, None], (1, k))
        bias = -scale * e[:k]
        typical = np.sum(np.maximum(scale * (e[k // 2] - e[:k]), 0.0))
    else:
        # z_i = a (m - e_i) / (e_{i+1} - e_i), clipped to [0, a]: slope only inside bin i.
        width = np.diff(e)
        kernel = a * w[:, None] / width[None, :]
        bias = -a * e[:k] / width
        typical = a * k / 2.0
    project = np.full((k, d), 1.0 / typical)
    params = {"imprint": {"kernel": jnp.asarray(kernel, jnp.float32),
                          "bias": jnp.asarray(bias, jnp.float32)},
              "project": {"kernel": jnp.asarray(project, jnp.float32),
                          "bias": jnp.zeros((d,), jnp.float32)},
              "inner": inner_params}
    return Model(module, tuple(inner.example_shape), inner.num_classes), params


def read_off_bins(kernel_update: jax.Array, bias_update: jax.Array, variant: str, *,
                  relative_threshold: float = 1e-5) -> tuple[jax.Array, jax.Array]:
    """Per-bin reconstructions from the imprint layer's update.

    Args:
      kernel_update: ``[d, k]`` update of the imprint kernel (bins in edge order).
      bias_update: ``[k]`` update of the imprint bias.
      variant: ``"dense"`` (difference neighbouring bins) or ``"sparse"``.
      relative_threshold: bins whose (differenced) bias update is below this fraction of
        the largest are empty.

    Returns:
      ``(x [k, d], nonempty [k])``; rows of empty bins are NaN.
    """
    dw, db = kernel_update.T, bias_update
    if variant == "dense":
        dw = dw - jnp.concatenate([dw[1:], jnp.zeros_like(dw[:1])])
        db = db - jnp.concatenate([db[1:], jnp.zeros_like(db[:1])])
    nonempty = jnp.abs(db) > relative_threshold * jnp.max(jnp.abs(db))
    x = dw / jnp.where(nonempty, db, 1.0)[:, None]
    return jnp.where(nonempty[:, None], x, jnp.nan), nonempty


@functools.lru_cache(maxsize=16)
def _imprint_fn(variant: str, example_shape: tuple[int, ...], relative_threshold: float,
                clip: bool):
    def one(update):
        layer = update["imprint"]
        x, _ = read_off_bins(layer["kernel"], layer["bias"], variant,
                             relative_threshold=relative_threshold)
        x = jnp.clip(x, 0.0, 1.0) if clip else x
        return x.reshape((x.shape[0],) + example_shape)

    return jax.jit(jax.vmap(one))


def imprint_attack(updates: PyTree, config: ImprintConfig, example_shape: tuple[int, ...],
                   *, relative_threshold: float = 1e-5, clip: bool = True) -> Reconstruction:
    """Reads examples off the imprint layer of many observed updates at once.

    Args:
      updates: ``[V, ...]`` deltas of the imprinted model (one client each, or each a sum
        over a cohort under secure aggregation).
      config: the imprint block the server sent.
      example_shape: shape of one example.
      relative_threshold: see :func:`read_off_bins`.
      clip: clip the read-off to the data range ``[0, 1]`` (exact recoveries already lie
        there; mixtures of several examples can fall outside).

    Returns:
      :class:`Reconstruction` with ``[V, k, ...]`` inputs (NaN rows for empty bins), labels
      ``-1`` and objective 0. Match them to the truth with
      :func:`fedjax_sim.attacks.metrics.evaluate_reconstruction`.
    """
    thr = check_float("relative_threshold", relative_threshold, min_value=0.0)
    x = _imprint_fn(config.variant, tuple(int(s) for s in example_shape), thr,
                    bool(clip))(updates)
    v, k = x.shape[:2]
    return Reconstruction(x, -jnp.ones((v, k), jnp.int32), jnp.zeros((v,), jnp.float32))


__all__ = ["DIRECTIONS", "VARIANTS", "ImprintConfig", "ImprintedModule",
           "bin_edges_from_data", "bin_edges_gaussian", "expected_recovery_rate",
           "imprint_attack", "make_imprint_model", "measure", "measurement_direction",
           "predicted_recovery_rate", "read_off_bins"]
