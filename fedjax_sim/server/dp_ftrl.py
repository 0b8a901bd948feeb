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

Guarantee (accounted by :func:`fedjax_sim.privacy.dp_ftrl_epsilon`): if each client
contributes a clipped update (L2 norm <= ``clip_norm``) to at most one round in total,
the released sequence is the Gaussian mechanism with L2 sensitivity ``sqrt(depth) *
clip_norm``, ``depth = ceil(log2(max_rounds + 1))`` (Kairouz et al. Appendix D), under
replace-one-client-with-zero adjacency; participating once per tree composes over trees.
Assumes: cohorts follow a data-independent schedule (no sampling amplification is
claimed), the aggregate is a plain sum (or sum / fixed denominator), nothing else
touches private data. Not implemented: Honaker's variance-reducing estimator (the
"efficient" tree of Kairouz et al. Sec. 4), multi-participation bounds without restarts.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from fedjax_sim._validation import check_float, check_int, fail
from fedjax_sim.server.base import ServerTransform, chain, is_cohort
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
        ``tree_noise[k]`` is the active level-k node's noise (0 if inactive).
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


def _noise_dtype(dtype) -> jnp.dtype:
    if not jnp.issubdtype(dtype, jnp.floating):
        fail("params", dtype, "dp_ftrl_tree_noise needs floating-point parameters")
    return jnp.promote_types(dtype, jnp.float32)


def dp_ftrl_tree_noise(*, noise_multiplier: float, clip_norm: float, max_rounds: int,
                       key: jax.Array, denominator: float = 1.0) -> ServerTransform:
    """Aggregate transform adding DP-FTRL online tree-aggregation noise (see module doc).

    Args:
      noise_multiplier: z, per-node noise std / clip norm (> 0).
      clip_norm: the L2 bound of each client's update, enforced by an earlier
        per-client clipping transform (> 0).
      max_rounds: tree size; the tree restarts after this many rounds (>= 1).
      key: PRNG key for the noise (kept and split in the state; never reused).
      denominator: the aggregate is ``sum of clipped updates / denominator`` for a fixed,
        data-independent denominator (e.g. the expected cohort size); 1 for a plain sum.

    Returns:
      A ServerTransform acting on the aggregate; ``update`` returns ``x_t + N_t -
      N_{t-1}``. Its info: name ``"dp_ftrl_tree"``, ``noise_multiplier``, ``clip_norm``,
      ``max_rounds``, ``tree_levels``, ``noise_stddev`` (per node), ``denominator``,
      ``neighboring_relation`` (``"replace_special"``).
    """
    z = check_float("noise_multiplier", noise_multiplier, min_value=0.0, min_exclusive=True)
    c = check_float("clip_norm", clip_norm, min_value=0.0, min_exclusive=True)
    max_rounds = check_int("max_rounds", max_rounds, min_value=1)
    if max_rounds >= 2 ** 30:
        fail("max_rounds", max_rounds, "must be < 2**30 (int32 round counter)")
    denom = check_float("denominator", denominator, min_value=0.0, min_exclusive=True)
    if key is None:
        fail("key", key, "needs an explicit PRNG key")
    levels = tree_levels(max_rounds)
    std = z * c / denom

    def init(params):
        stack = jax.tree.map(
            lambda p: jnp.zeros((levels,) + jnp.shape(p), _noise_dtype(jnp.result_type(p))),
            params)
        return DPFTRLTreeState(key=key, round=jnp.zeros((), jnp.int32), tree_noise=stack)

    def update(value, state):
        if is_cohort(value):
            raise TypeError("dp_ftrl_tree_noise: acts on the aggregate; put it after a reducer")
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
        for x, stack, k in zip(leaves, stacks, keys):
            fresh = std * jax.random.normal(k, x.shape, stack.dtype)
            gone = jnp.tensordot(leaving.astype(stack.dtype), stack, axes=(0, 0))
            kept = jnp.where(leaving.reshape((levels,) + (1,) * x.ndim), 0, stack)
            new_stacks.append(lax.dynamic_update_index_in_dim(kept, fresh, k0, axis=0))
            out.append((x + (fresh - gone).astype(x.dtype)).astype(x.dtype))
        new_state = DPFTRLTreeState(key=new_key, round=t_new,
                                    tree_noise=treedef.unflatten(new_stacks))
        return treedef.unflatten(out), new_state

    info = {"name": "dp_ftrl_tree", "noise_multiplier": z, "clip_norm": c,
            "max_rounds": max_rounds, "tree_levels": levels, "noise_stddev": std,
            "denominator": denom, "neighboring_relation": "replace_special",
            "sensitivity_depth": math.ceil(math.log2(max_rounds + 1))}
    return ServerTransform(init, update, info)


def tree_prefix_noise(state: DPFTRLTreeState) -> PyTree:
    """N_t: the noise currently inside the running sum (sum of the active tree nodes)."""
    return jax.tree.map(lambda s: jnp.sum(s, axis=0), state.tree_noise)


def dp_ftrl_aggregator(clip_norm: float, noise_multiplier: float, cohort_size: int,
                       max_rounds: int, *, key: jax.Array) -> ServerTransform:
    """The DP-FTRL server aggregator as a chain (Kairouz et al. 2021, Algorithm 1).

    ``clip_per_client(S) -> sum_updates() -> dp_ftrl_tree_noise(z, S, max_rounds) ->
    dp_mean_normalize(cohort_size)``: every client counts 1 (no example weights, so a
    client moves the sum by at most S), the tree adds node noise of std ``z S`` and the
    division by the fixed cohort size is post-processing. With a plain SGD server
    optimiser the model is ``theta_0 + lr * (prefix sum + N_t) / cohort_size``.

    Guarantee: that of :func:`dp_ftrl_tree_noise` (accounted by
    :class:`fedjax_sim.privacy.accounting.DPFTRLAccountant`); it needs a data-independent
    schedule that puts a client at most once in a tree (a cyclic sampler whose pass is at
    least ``max_rounds`` rounds).

    Args:
      clip_norm: ``S > 0``.
      noise_multiplier: ``z > 0``.
      cohort_size: the fixed number of clients per round (the divisor).
      max_rounds: tree size (restart period).
      key: PRNG key of the tree noise.

    Returns:
      The chained ServerTransform (a reducer: CohortUpdates -> aggregate delta).
    """
    key = check_key("key", key)
    m = check_int("cohort_size", cohort_size, min_value=1)
    return chain(clip_per_client(clip_norm), sum_updates(),
                 dp_ftrl_tree_noise(noise_multiplier=noise_multiplier, clip_norm=clip_norm,
                                    max_rounds=max_rounds, key=key),
                 dp_mean_normalize(float(m)))


__all__ = ["DPFTRLTreeState", "dp_ftrl_aggregator", "dp_ftrl_tree_noise", "tree_levels",
           "tree_prefix_noise"]
