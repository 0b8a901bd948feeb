"""DP-FTRL: online binary-tree aggregation noise on the round's aggregate.

Kairouz, McMahan, Song, Thakkar, Thakurta, Xu 2021, "Practical and Private (Deep)
Learning without Sampling or Shuffling" (arXiv:2103.00039), after the tree mechanism of
Dwork et al. 2010 / Chan et al. 2011.

Let ``x_t`` be round t's aggregate (the sum of clipped client updates, or that sum over
a fixed, data-independent ``denominator``). The tree mechanism releases noisy prefix sums
``S_t = x_1 + ... + x_t + N_t`` where ``N_t`` is the sum of the Gaussian noises of the
dyadic tree nodes in the binary decomposition of t (one node per set bit of t, each
drawn once, when its interval [j 2^k + 1, (j+1) 2^k] completes, with std
``noise_multiplier * clip_norm / denominator``). So ``Var N_t = popcount(t) * std^2 <=
ceil(log2(t + 1)) * std^2`` instead of ``t * std^2`` for independent per-round noise.

This transform emits the per-round *difference* ``S_t - S_{t-1} = x_t + N_t - N_{t-1}``,
so that the running sum of what it emits is exactly the noisy prefix sum. With a plain
``optax.sgd(learning_rate)`` server optimiser (no momentum) the model after t rounds is
``theta_0 + lr * S_t`` (clients' direction), which is DP-FTRL with the quadratic
regulariser ``||theta - theta_0||^2 / (2 lr)`` (the paper's Algorithm 1, momentum 0).
Any other server optimiser (momentum, Adam, ...) only post-processes the released
``S_t`` and keeps the guarantee, but is then no longer FTRL.

State has fixed shapes: the PRNG key, the round counter of the current tree, and a stack
of ``levels = floor(log2(max_rounds)) + 1`` noise pytrees, ``stack[k]`` holding the noise
of the currently active level-k node (zero when bit k of t is 0), so ``N_t = sum_k
stack[k]``. The tree restarts after ``max_rounds`` rounds (round max_rounds + 1 starts a
fresh tree: the emitted value then also removes the old tree's noise, so the running sum
stays ``prefix sum + current tree's N_t``). Memory: ``levels`` copies of the model.

Guarantee (accounted by :func:`fedjax_sim.privacy.dp_ftrl_epsilon`; the stage carries a
:class:`~fedjax_sim.privacy.TreeAggregationNoise` mechanism from which
:func:`~fedjax_sim.privacy.ledger_for` builds a run's
:class:`~fedjax_sim.privacy.DPFTRLAccountant`): if each client
contributes a clipped update (L2 norm <= ``clip_norm``) to at most one round in total,
the released sequence is the Gaussian mechanism with L2 sensitivity ``sqrt(depth) *
clip_norm``, ``depth = ceil(log2(max_rounds + 1))`` (Kairouz et al. Appendix D), under
replace-one-client-with-zero adjacency; participating once per tree composes over trees.
Assumes: cohorts follow a data-independent schedule (no sampling amplification is
claimed), the aggregate is a plain sum (or sum / fixed denominator), nothing else
touches private data. Not implemented: multi-participation bounds without restarts.

Efficient tree (``efficient=True``): the online, bottom-up form of Honaker 2015,
"Efficient Use of Differentially Private Binary Trees" (the variance reduction Kairouz et
al. 2021 point to in Sec. 4; TF Privacy's ``EfficientTreeAggregator`` computes the same
estimates). Honaker's offline estimator also uses a node's ancestors; online they are not
complete yet, so only subtrees are used. At round t the nodes of every level ``0..k0``
whose interval ends at t complete together (``k0`` = trailing zeros of t); each gets its
own noise ``y`` of the same std. Instead of a node's own noisy value, the released prefix
sum uses the minimum-variance unbiased estimate of the node from its own value and its
(completed) subtree, computed bottom-up: ``e_0 = y_0`` and ``e_k = w_k y_k + (1 - w_k)
(e_left + e_right)`` with ``w_k = 2^k / (2^(k+1) - 1)``, which has variance ``V_k = 2^k /
(2^(k+1) - 1) std^2`` (``std^2, 2/3, 4/7, ... -> std^2 / 2``). So ``Var N_t = sum over
set bits k of t of V_k``, below the plain tree's ``popcount(t) std^2`` as soon as t has a
set bit above level 0. The node noises, their std and the nodes a client touches are
those of the plain tree; the estimates are post-processing of completed nodes, which the
sensitivity analysis above already counts as released, so the guarantee and its
accounting are unchanged. In this mode ``stack[k]`` holds the estimate of the latest
completed level-k node of the current tree (whether or not bit k of t is set), ``N_t =
sum_k bit_k(t) stack[k]``, and a round draws ``k0 + 1`` node noises.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from fedjax_sim._validation import check_float, check_int, fail
from fedjax_sim.privacy.mechanisms import TreeAggregationNoise
from fedjax_sim.server.base import Chain, Stage, StageKind, chain
from fedjax_sim.server.clipping import check_key, clip_per_client
from fedjax_sim.server.noise import dp_mean_normalize
from fedjax_sim.server.reducers import sum_updates

PyTree = Any


class DPFTRLTreeState(NamedTuple):
    """State of :func:`dp_ftrl_tree_noise`.

    Attributes:
      key: PRNG key for the next node's noise.
      round: int32 scalar, rounds completed in the current tree (0..max_rounds).
      tree_noise: pytree like the aggregate, every leaf ``[levels, *leaf.shape]``:
        ``tree_noise[k]`` is the active level-k node's noise (0 if inactive); with the
        efficient estimator, the estimated noise of the latest completed level-k node.
    """

    key: jax.Array
    round: jax.Array
    tree_noise: PyTree


def tree_levels(max_rounds: int) -> int:
    """floor(log2(max_rounds)) + 1: the node levels a tree of ``max_rounds`` leaves uses."""
    max_rounds = check_int("max_rounds", max_rounds, min_value=1)
    return max_rounds.bit_length()


def _count_trailing_zeros(t: jax.Array) -> jax.Array:
    """Trailing zero bits of a positive int32."""
    return lax.population_count((t & -t) - 1)


def _round_bits(t: jax.Array, levels: int) -> jax.Array:
    """``[levels]`` int32: bit k of the round counter t."""
    return (t >> jnp.arange(levels, dtype=jnp.int32)) & 1


def efficient_node_variance(level: int) -> float:
    """``2^k / (2^(k+1) - 1)``: the variance of Honaker's estimate of a complete level-k
    node, in units of the per-node noise variance (1, 2/3, 4/7, ... -> 1/2)."""
    level = check_int("level", level, min_value=0)
    return 2.0 ** level / (2.0 ** (level + 1) - 1.0)


def _efficient_stack(stack: jax.Array, k0: jax.Array, std: float,
                     key: jax.Array) -> jax.Array:
    """The level stack after a round that completes levels ``0..k0``: their fresh
    estimates (the other levels unchanged)."""
    shape = stack.shape[1:]

    def level(j, carry):
        new_stack, right = carry  # right: the estimate of level j - 1 completing now
        y = std * jax.random.normal(jax.random.fold_in(key, j), shape, stack.dtype)
        two_j = jnp.exp2(jnp.asarray(j, stack.dtype))  # j is a Python int under disable_jit
        w = two_j / (2 * two_j - 1)
        left = lax.dynamic_index_in_dim(stack, jnp.maximum(j - 1, 0), keepdims=False)
        estimate = w * y + (1 - w) * (left + right)  # w = 1 at the leaf (j = 0)
        return lax.dynamic_update_index_in_dim(new_stack, estimate, j, axis=0), estimate

    new_stack, _ = lax.fori_loop(0, k0 + 1, level, (stack, jnp.zeros(shape, stack.dtype)))
    return new_stack


def _noise_dtype(dtype) -> jnp.dtype:
    if not jnp.issubdtype(dtype, jnp.floating):
        fail("params", dtype, "dp_ftrl_tree_noise needs floating-point parameters")
    return jnp.promote_types(dtype, jnp.float32)


def dp_ftrl_tree_noise(*, noise_multiplier: float, clip_norm: float, max_rounds: int,
                       key: jax.Array, denominator: float = 1.0,
                       efficient: bool = False) -> Stage:
    """Aggregate stage adding DP-FTRL online tree-aggregation noise (see module doc).

    Args:
      noise_multiplier: z, per-node noise std / clip norm (> 0).
      clip_norm: the L2 bound of each client's update, enforced by an earlier
        per-client clipping transform (> 0).
      max_rounds: tree size; the tree restarts after this many rounds (>= 1).
      key: PRNG key for the noise (kept and split in the state; never reused).
      denominator: the aggregate is ``sum of clipped updates / denominator`` for a fixed,
        data-independent denominator (e.g. the expected cohort size); 1 for a plain sum.
      efficient: use Honaker's variance-reduced node estimates (see the module doc);
        same privacy, lower noise in the released prefix sums.

    Returns:
      An ``AGGREGATE`` stage named ``"dp_ftrl_tree"``; ``update`` returns ``x_t + N_t -
      N_{t-1}``. Its mechanism is ``TreeAggregationNoise(z, clip_norm, max_rounds,
      efficient)`` (the node std is ``z * clip_norm / denominator``).
    """
    z = check_float("noise_multiplier", noise_multiplier, min_value=0.0, min_exclusive=True)
    c = check_float("clip_norm", clip_norm, min_value=0.0, min_exclusive=True)
    max_rounds = check_int("max_rounds", max_rounds, min_value=1)
    if max_rounds >= 2 ** 30:
        fail("max_rounds", max_rounds, "must be < 2**30 (int32 round counter)")
    denom = check_float("denominator", denominator, min_value=0.0, min_exclusive=True)
    if key is None:
        fail("key", key, "needs an explicit PRNG key")
    if not isinstance(efficient, bool):
        fail("efficient", efficient, "must be true or false")
    levels = tree_levels(max_rounds)
    std = z * c / denom

    def init(upload):
        stack = jax.tree.map(
            lambda p: jnp.zeros((levels,) + jnp.shape(p), _noise_dtype(jnp.result_type(p))),
            upload)
        return DPFTRLTreeState(key=key, round=jnp.zeros((), jnp.int32), tree_noise=stack)

    def update(value, state):
        restart = state.round >= max_rounds
        t_new = jnp.where(restart, 1, state.round + 1).astype(jnp.int32)
        k0 = _count_trailing_zeros(t_new)  # level of the node that completes now
        # Nodes leaving N_t: every active level below k0 (its bits carry), all on restart.
        leaving = restart | (jnp.arange(levels) < k0)
        new_key, sub = jax.random.split(state.key)
        leaves, treedef = jax.tree.flatten(value)
        stacks = treedef.flatten_up_to(state.tree_noise)
        keys = jax.random.split(sub, len(leaves))
        out, new_stacks = [], []
        if efficient:
            old_bits, new_bits = _round_bits(state.round, levels), _round_bits(t_new, levels)
            for x, stack, k in zip(leaves, stacks, keys):
                current = jnp.where(restart, jnp.zeros_like(stack), stack)
                new_stack = _efficient_stack(current, k0, std, k)
                n_old = jnp.tensordot(old_bits.astype(stack.dtype), stack, axes=(0, 0))
                n_new = jnp.tensordot(new_bits.astype(stack.dtype), new_stack, axes=(0, 0))
                new_stacks.append(new_stack)
                out.append((x + (n_new - n_old).astype(x.dtype)).astype(x.dtype))
            return treedef.unflatten(out), DPFTRLTreeState(
                key=new_key, round=t_new, tree_noise=treedef.unflatten(new_stacks))
        for x, stack, k in zip(leaves, stacks, keys):
            fresh = std * jax.random.normal(k, x.shape, stack.dtype)
            gone = jnp.tensordot(leaving.astype(stack.dtype), stack, axes=(0, 0))
            kept = jnp.where(leaving.reshape((levels,) + (1,) * x.ndim), 0, stack)
            new_stacks.append(lax.dynamic_update_index_in_dim(kept, fresh, k0, axis=0))
            out.append((x + (fresh - gone).astype(x.dtype)).astype(x.dtype))
        new_state = DPFTRLTreeState(key=new_key, round=t_new,
                                    tree_noise=treedef.unflatten(new_stacks))
        return treedef.unflatten(out), new_state

    return Stage("dp_ftrl_tree", StageKind.AGGREGATE, init=init, apply=update,
                 mechanism=TreeAggregationNoise(z, c, max_rounds, efficient))


def tree_prefix_noise(state: DPFTRLTreeState) -> PyTree:
    """N_t: the noise currently inside the running sum (the active nodes: set bits of t)."""
    def prefix(stack):
        bits = _round_bits(state.round, stack.shape[0]).astype(stack.dtype)
        return jnp.tensordot(bits, stack, axes=(0, 0))

    return jax.tree.map(prefix, state.tree_noise)


def dp_ftrl_aggregator(clip_norm: float, noise_multiplier: float, cohort_size: int,
                       max_rounds: int, *, key: jax.Array,
                       efficient: bool = False) -> Chain:
    """The DP-FTRL server aggregator as a chain (Kairouz et al. 2021, Algorithm 1).

    ``clip_per_client(S) -> sum_updates() -> dp_ftrl_tree_noise(z, S, max_rounds) ->
    dp_mean_normalize(cohort_size)``: every client counts 1 (no example weights, so a
    client moves the sum by at most S), the tree adds node noise of std ``z S`` and the
    division by the fixed cohort size is post-processing. With a plain SGD server
    optimiser the model is ``theta_0 + lr * (prefix sum + N_t) / cohort_size``.

    Guarantee: that of :func:`dp_ftrl_tree_noise` (accounted by
    :class:`fedjax_sim.privacy.DPFTRLAccountant`); it needs a data-independent
    schedule that puts a client at most once in a tree (a cyclic sampler whose pass is at
    least ``max_rounds`` rounds).

    Args:
      clip_norm: ``S > 0``.
      noise_multiplier: ``z > 0``.
      cohort_size: the fixed number of clients per round (the divisor).
      max_rounds: tree size (restart period).
      key: PRNG key of the tree noise.
      efficient: Honaker's variance-reduced estimator (same privacy, less noise).

    Returns:
      The chain (a complete one: cohort -> aggregate).
    """
    key = check_key("key", key)
    m = check_int("cohort_size", cohort_size, min_value=1)
    return chain(clip_per_client(clip_norm), sum_updates(),
                 dp_ftrl_tree_noise(noise_multiplier=noise_multiplier, clip_norm=clip_norm,
                                    max_rounds=max_rounds, key=key, efficient=efficient),
                 dp_mean_normalize(float(m)))


__all__ = ["DPFTRLTreeState", "dp_ftrl_aggregator", "dp_ftrl_tree_noise",
           "efficient_node_variance", "tree_levels", "tree_prefix_noise"]
