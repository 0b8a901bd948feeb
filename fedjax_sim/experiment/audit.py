"""Empirical privacy auditing inside ``fedjax-sim run``: canaries next to the accountant.

With ``[leakage] canaries = m`` (DP runs only) the run plays ``m`` canary clients
(:mod:`fedjax_sim.privacy.canaries`): each inserted with probability 1/2, an inserted
one uploading its random direction at the clip norm whenever it is sampled. The auditor
(:class:`AuditReporter`) watches the global model:

* ``epsilon_estimate``: Andrew et al.'s one-shot estimate from the cosines between the
  final model's change since initialisation and every canary direction (a Gaussian fit
  of the inserted and the held-out canaries with a pooled spread,
  :func:`fedjax_sim.privacy.auditing.one_shot_estimate`);
* ``epsilon_estimate_all_iterates``: the same from each canary's largest cosine with any
  round's model change;
* ``epsilon_lower_bound``: Steinke, Nasr and Jagielski's one-run lower bound (beta =
  0.05) from the final cosines, guessing ``canary_guesses`` canaries on each side.

They sit next to the accountant's ``epsilon`` in every evaluated row, in the summary's
``audit`` block and on the progress bar. The estimate is an estimate (a Gaussian fit);
the bound holds with probability 0.95 if the run is DP; neither can certify privacy. The
canaries' own training metrics are excluded from the round's (their example count is 0).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim._validation import fail
from fedjax_sim.experiment.reporters import Reporter
from fedjax_sim.privacy.auditing import (canary_directions, canary_scores, max_over_iterates,
                                         one_run_lower_bound, one_shot_estimate)
from fedjax_sim.privacy.canaries import Canaries, canary_client, flat_params, make_canaries

FIELDS = ("epsilon_estimate", "epsilon_estimate_all_iterates", "epsilon_lower_bound")
BETA = 0.05


def with_canaries(cfg: Any, algorithm: Any, base_key: jax.Array, num_clients: int
                  ) -> tuple[Any, Canaries | None]:
    """``algorithm`` with the configured canary clients (unchanged without canaries)."""
    m = cfg.leakage.canaries
    if not m:
        return algorithm, None
    params = jax.eval_shape(algorithm.server.init_params, base_key)
    upload = jax.eval_shape(algorithm.client.upload_like, params)
    same = jax.tree.structure(upload) == jax.tree.structure(params) and all(
        u.shape == p.shape for u, p in zip(jax.tree.leaves(upload), jax.tree.leaves(params)))
    if not same:
        fail("canaries", m, f"algorithm={cfg.algorithm.name} uploads no model delta; "
             "canaries live in the model's space")
    canaries = make_canaries(jax.random.fold_in(base_key, 0xCA7), m, num_clients,
                             cfg.server.clip_norm, seed=cfg.seed)
    return algorithm.with_client(canary_client(algorithm.client, canaries, params)), canaries


@jax.jit
def _round_scores(before, after, initial, directions, running):
    b, a = flat_params(before), flat_params(after)
    return (max_over_iterates(running, a - b, directions),
            canary_scores(a - initial, directions))


class AuditReporter(Reporter):
    """The canary estimate and the one-run bound in every evaluated row (module
    docstring)."""

    def __init__(self, run: Any):
        exp = run.experiment
        cfg = exp.cfg
        self.canaries: Canaries = exp.canaries
        self.inserted = np.asarray(self.canaries.inserted, bool)
        self.delta = float(exp.plan.delta)
        m = self.canaries.num
        self.guesses = cfg.leakage.canary_guesses or max(1, m // 8)
        self.directions = None
        self.initial = None
        self.running = jnp.full((m,), -jnp.inf, jnp.float32)
        self.final = None
        self.last: dict[str, float | None] = dict.fromkeys(FIELDS)

    def _estimates(self) -> dict[str, float]:
        final, running = np.asarray(self.final), np.asarray(self.running)
        ins = self.inserted
        bound = one_run_lower_bound(final, ins, delta=self.delta, k_plus=self.guesses,
                                    k_minus=self.guesses, beta=BETA)
        return {"epsilon_estimate": one_shot_estimate(final[ins], final[~ins], self.delta),
                "epsilon_estimate_all_iterates": one_shot_estimate(
                    running[ins], running[~ins], self.delta),
                "epsilon_lower_bound": bound.epsilon}

    def round(self, run, r, state, metrics, row):
        if self.initial is None:
            self.initial = flat_params(run.params_before)
            self.directions = canary_directions(self.canaries.key, self.canaries.num,
                                                int(self.initial.shape[0]))
        self.running, self.final = _round_scores(run.params_before, state.params,
                                                 self.initial, self.directions,
                                                 self.running)
        if row.get("test_loss") is not None:
            self.last = self._estimates()
            row.update(self.last)

    def finish(self, run, state, summary):
        summary.update(self.last)
        summary["audit"] = {
            "canaries": self.canaries.num, "inserted": int(self.inserted.sum()),
            "canary_norm": self.canaries.norm, "guesses_each_side": self.guesses,
            "beta": BETA, "delta": self.delta, "epsilon_accountant": summary.get("epsilon"),
            **self.last,
            "methods": "estimate: Andrew et al., ICLR 2024 (one-shot, Gaussian fits to the "
                       "inserted and held-out canaries' cosines, pooled spread); lower "
                       "bound: Steinke, Nasr and Jagielski, NeurIPS 2023 (one run, "
                       "beta = 0.05)",
            "caveat": "an estimate and a high-probability lower bound from this run's "
                      "canaries; neither certifies privacy (the accountant's epsilon is "
                      "the guarantee)"}


__all__ = ["AuditReporter", "BETA", "FIELDS", "with_canaries"]
