"""Malicious server inside the run: imprint the run's own model, read the cohort's sum.

Threat model: the server is malicious. In chosen *spy rounds* it sends the sampled clients
a modified copy of the global model instead of the model itself, reads what comes back
through the round's aggregation (the weighted mean of the uploads, or behind secure
aggregation only the decoded sum: both are sums over the cohort), and discards the round:
the global model and the server optimiser's state stay as they were. It knows the data
domain through auxiliary examples (the run's held-out inputs; they set the bin edges). The
clients run their configured local training on the modified model; their client-side
defences (clipping, local noise) and the chain's central noise apply as in every round.

Construction ("Robbing the Fed", Fowl et al., ICLR 2022, built into the model the run
trains rather than prepended as in :mod:`fedjax_sim.attacks.imprint`): the first ``k``
units of the first dense layer (a dense layer on the flattened input) become imprint bins:
kernel column ``i`` is ``s w`` and bias ``-s e_i`` for one measurement direction ``w``
and increasing edges ``e_0 < ... < e_{k-1}`` at the auxiliary data's quantiles, so unit
``i`` fires for ``m(x) = w . x > e_i``. Their rows of the second dense layer all feed one
unit (class 0 when the second layer is the output; else a hidden unit kept alive) with the
same weight ``c``, so the loss gradient reaching every active bin from an example is the
same scalar. The other units and layers keep the global model's values. ``s`` is tiny
(:attr:`ImprintConfig.weight_scale` per bin width) and ``c`` large, so the function stays
of order one while the bins' float32 deltas carry the gradient to full precision: an
example alone in its bin among the *whole cohort's* examples is read off exactly by
differencing neighbouring bins (:func:`~fedjax_sim.attacks.imprint.read_off_bins`); the
weights of the mean and the per-client clip factors cancel in the ratio. For ``n``
examples and ``k`` equiprobable bins the expected exact-recovery rate is
``(1 - 1/k)^(n-1)`` (:func:`~fedjax_sim.attacks.imprint.predicted_recovery_rate`). It is
exact for FedSGD (one step on the modified model); local training of several steps moves
the bins after the first step and blurs the read-off, which the run measures as it is.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim._validation import fail
from fedjax_sim.algorithms.base import RoundInfo, ServerProgram
from fedjax_sim.attacks.imprint import ImprintConfig, read_off_bins
from fedjax_sim.attacks.updates import dense_layers

PyTree = Any


def imprint_layers(params: PyTree, input_dim: int, num_bins: int) -> tuple[str, str]:
    """The names of the dense layer on the flattened input and of the dense layer after
    it; a one-line ConfigError when the model has no such pair or is too narrow."""
    layers = dense_layers(params)
    if len(layers) < 2 or layers[0][1].shape[-2] != input_dim:
        fail("model", f"<{len(layers)} dense layers>", "the malicious server's imprint "
             f"needs a fully connected first layer on the flattened input (d={input_dim}) "
             "followed by another dense layer (an MLP with a hidden layer)")
    width = layers[0][1].shape[-1]
    if layers[1][1].shape[-2] != width:
        fail("model", "<second layer>", "must read the first dense layer's units directly")
    if num_bins > width:
        fail("imprint_bins", num_bins, f"exceeds the first hidden layer's {width} units")
    return layers[0][0], layers[1][0]


@dataclasses.dataclass(frozen=True)
class Imprint:
    """The modification a spy round sends: constants for the run's own first two layers.

    Attributes:
      config: the imprint's settings (only the ``dense`` variant: the run's units are ReLU).
      direction: ``[d]`` the measurement direction ``w``.
      edges: ``[k + 1]`` the bin edges (unit ``i`` fires for ``w . x > edges[i]``).
      first, second: the names of the first two dense layers.
      kernel: ``[d, k]`` the bins' first-layer columns.
      bias: ``[k]`` their biases.
      gain: ``c``, the weight of every bin's row into the live unit.
      live_is_output: the second layer is the model's output layer.
    """

    config: ImprintConfig
    direction: np.ndarray
    edges: np.ndarray
    first: str
    second: str
    kernel: np.ndarray
    bias: np.ndarray
    gain: float
    live_is_output: bool

    def apply(self, params: PyTree) -> PyTree:
        """``params`` with the imprint written in (pure, traceable)."""
        k = self.config.num_bins
        first, second = params[self.first], params[self.second]
        kernel = first["kernel"].at[:, :k].set(jnp.asarray(self.kernel, first["kernel"].dtype))
        bias = first["bias"].at[:k].set(jnp.asarray(self.bias, first["bias"].dtype))
        w2, b2 = second["kernel"], second["bias"]
        if not self.live_is_output:  # the live hidden unit sees only the bins: never dead
            w2, b2 = w2.at[:, 0].set(0.0), b2.at[0].set(0.0)
        rows = jnp.zeros((k, w2.shape[1]), w2.dtype).at[:, 0].set(self.gain)
        w2 = w2.at[:k].set(rows)
        return {**params, self.first: {**first, "kernel": kernel, "bias": bias},
                self.second: {**second, "kernel": w2, "bias": b2}}

    def read_off(self, aggregate: PyTree, example_shape: tuple[int, ...], *,
                 relative_threshold: float = 1e-5) -> np.ndarray:
        """``[k, *example_shape]`` reconstructions from a spy round's aggregate (NaN rows:
        empty bins), clipped to the data's range when it is an image in [0, 1]."""
        k = self.config.num_bins
        layer = aggregate[self.first]
        x, _ = read_off_bins(jnp.asarray(layer["kernel"][:, :k], jnp.float32),
                             jnp.asarray(layer["bias"][:k], jnp.float32), "dense",
                             relative_threshold=relative_threshold)
        return np.asarray(x, np.float64).reshape((k,) + tuple(example_shape))


def make_imprint(params: PyTree, direction: np.ndarray, edges: np.ndarray,
                 config: ImprintConfig) -> Imprint:
    """The imprint for a model shaped like ``params`` (module docstring).

    Args:
      params: the global params (or their shapes) of a model with a dense first layer.
      direction: ``[d]`` the measurement direction.
      edges: ``[k + 1]`` increasing bin edges (:func:`~fedjax_sim.attacks.imprint.
        bin_edges_from_data`).
      config: ``num_bins`` and ``weight_scale``; ``variant`` must be ``"dense"``.

    Returns:
      The :class:`Imprint`.
    """
    k = config.num_bins
    w = np.asarray(direction, np.float64).ravel()
    e = np.asarray(edges, np.float64).ravel()
    if config.variant != "dense":
        fail("imprint_variant", config.variant, "the run's own first layer is ReLU: only "
             "the dense (differencing) imprint applies")
    first, second = imprint_layers(params, w.size, k)
    if e.shape != (k + 1,) or not np.all(np.diff(e) > 0):
        fail("edges", f"<shape {e.shape}>", f"must be {k + 1} strictly increasing values")
    a = config.weight_scale
    # Pre-activations of size ~a per bin width; the bins' sum reaches the live unit ~1.
    scale = a * k / (e[k - 1] - e[1]) if k > 2 else a / (e[-1] - e[0])
    typical = float(np.sum(np.maximum(scale * (e[k // 2] - e[:k]), 0.0)))
    out_layer = dense_layers(params)[-1][0]
    return Imprint(config, w, e, first, second, np.tile((scale * w)[:, None], (1, k)),
                   -scale * e[:k], 1.0 / typical, live_is_output=second == out_layer)


def spy_server(program: ServerProgram, rounds: Sequence[int], imprint: Imprint
               ) -> ServerProgram:
    """``program`` run by a malicious server that sends ``imprint`` in ``rounds``.

    In a spy round (0-based, as counted by the round) the server sends the imprinted copy
    of its params and keeps its params and optimiser state as they were: the round's
    aggregate is read by the attacker (the run's reporter), never applied. Every other
    round is ``program``'s, unchanged. The aggregation chain (and its state: noise keys,
    clip norms) runs as in every round.
    """
    spy = jnp.asarray(sorted({int(r) for r in rounds}), jnp.int32)
    if spy.size == 0 or int(spy[0]) < 0:
        fail("imprint_rounds", tuple(rounds), "needs at least one round, 0-based and >= 0")

    inner = program.sends

    def sends(params, state, round_index):
        if inner is not None:
            params = inner(params, state, round_index)
        hit = jnp.any(spy == round_index)
        modified = imprint.apply(params)
        return jax.tree.map(lambda m, p: jnp.where(hit, m, p), modified, params)

    def apply(params, state, aggregate, info: RoundInfo):
        new = program.apply(params, state, aggregate, info)
        hit = jnp.any(spy == info.round)
        return jax.tree.map(lambda old, upd: jnp.where(hit, old, upd), (params, state), new)

    return dataclasses.replace(program, sends=sends, apply=apply)


__all__ = ["Imprint", "imprint_layers", "make_imprint", "spy_server"]
