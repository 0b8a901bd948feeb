"""What a run leaks to an honest-but-curious server, measured inside ``fedjax-sim run``.

The ``[leakage]`` section names the observed rounds (``observe_rounds``, 1-based), the
victims per round and the attacks. In an observed round the server attacks exactly what
it sees in that configuration (:mod:`fedjax_sim.attacks.honest_server`):

* without secure aggregation, the first ``victims`` sampled clients' uploads as they left
  the clients, after every client-side defence (clipping, quantisation, local noise), kept
  by the round's :func:`~fedjax_sim.attacks.capture.victim_capture` observer;
* with secure aggregation, only the decoded sum of the survivors' uploads (the round's
  :class:`~fedjax_sim.rounds.ServerView`), attacked as one "client" holding the whole
  cohort's examples.

Each observed round adds ``leak_*`` fields to its ``metrics.jsonl`` row and a PNG grid of
originals against reconstructions to ``DIR/leakage/round_NNNN.png``; the summary gets a
``leakage`` block (threat model, what the server saw, means over observed rounds).
Observing never changes training: same seed, same model (tested). The cross-field rules
of the section are :func:`check_leakage`, run when a configuration is made.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import numpy as np

from fedjax_sim._validation import fail
from fedjax_sim.compile_options import one_off_jit
from fedjax_sim.attacks.capture import NAME as CAPTURE
from fedjax_sim.attacks.honest_server import (ATTACKS, HonestServerAttack, Truth,
                                              attack_secure_sum, attack_uploads, is_image,
                                              supported_attacks)
from fedjax_sim.attacks.inversion import InversionConfig
from fedjax_sim.attacks.updates import LocalTraining
from fedjax_sim.experiment.reporters import Reporter

LEAKAGE_DIR = "leakage"
_DEFAULTS = {"victims": 4, "leak_attacks": None, "inversion_steps": 200,
             "inversion_restarts": 1, "tv_weight": 1e-3}
# Models whose first layer is no dense layer on the flattened input.
_NO_DENSE_INPUT = frozenset({"cnn"})


def observed_rounds(cfg: Any) -> tuple[int, ...]:
    """The observed rounds, 0-based (empty when nothing is observed)."""
    rounds = cfg.leakage.observe_rounds
    return () if rounds is None else tuple(sorted({r - 1 for r in rounds}))


def requested_attacks(cfg: Any) -> tuple[str, ...] | None:
    """``leak_attacks`` as a tuple (None: automatic), each checked against the names."""
    text = cfg.leakage.leak_attacks
    if text is None:
        return None
    names = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    if not names:
        fail("leak_attacks", text, f"must name at least one of {', '.join(ATTACKS)}")
    for name in names:
        if name not in ATTACKS:
            fail("leak_attacks", name, f"must be one of {', '.join(ATTACKS)}")
    return names


def _plain_sgd_clients(cfg: Any) -> str | None:
    """Why the clients' local training is not plain local SGD (None when it is)."""
    a = cfg.algorithm
    if a.name in ("scaffold", "fedprox"):
        return f"algorithm={a.name} adds a correction to the local gradient"
    if a.client_momentum is not None:
        return f"client_momentum={a.client_momentum:g} is not plain SGD"
    if a.worker_momentum is not None:
        return f"worker_momentum={a.worker_momentum:g} uploads a momentum, not the delta"
    return None


def local_training(cfg: Any) -> LocalTraining:
    """The clients' local training as the attacker models it (fedsgd: one full-batch
    step of rate 1)."""
    from fedjax_sim.algorithms import FEDOPT

    a = cfg.algorithm
    member = FEDOPT.get(a.name)
    if member is not None and member.full_batch_step:
        return LocalTraining(1.0, 1, None)
    return LocalTraining(a.client_lr, a.local_epochs, a.batch_size)


def check_leakage(cfg: Any) -> None:
    """The ``[leakage]`` section's cross-field rules (one-line ConfigErrors)."""
    from fedjax_sim.experiment.server import privacy_plan

    lk = cfg.leakage
    if lk.observe_rounds is None:
        for key, default in _DEFAULTS.items():
            if getattr(lk, key) != default:
                fail(key, getattr(lk, key), "only applies with observe_rounds")
    else:
        late = [r for r in lk.observe_rounds if r > cfg.sampling.rounds]
        if late:
            fail("observe_rounds", late[0], f"beyond the run's {cfg.sampling.rounds} "
                 "rounds")
        s = cfg.sampling
        cohort = (s.cohort_size if s.kind != "poisson"
                  else math.floor(s.sampling_rate * cfg.data.num_clients))
        if lk.victims > cohort:
            fail("victims", lk.victims, f"more victims than the {cohort} clients a round "
                 f"samples ({'expected, ' if s.kind == 'poisson' else ''}"
                 f"sampling={s.kind})")
        asked = requested_attacks(cfg) or ()
        if "closed_form" in asked and cfg.model.name in _NO_DENSE_INPUT:
            fail("leak_attacks", "closed_form", f"needs a dense layer on the flattened "
                 f"input; model={cfg.model.name} has none")
        if "ig" in asked:
            why = _plain_sgd_clients(cfg)
            if why:
                fail("leak_attacks", "ig", f"replays plain local SGD; {why}")
            if cfg.secure.enabled:
                fail("leak_attacks", "ig", "behind secure aggregation the server holds "
                     "only the sum of the cohort's uploads; invert clients without "
                     "secure_aggregation")
    if lk.canaries:
        if not privacy_plan(cfg).dp:
            fail("canaries", lk.canaries, "auditing measures a DP guarantee: set "
                 "noise_multiplier or target_epsilon (with clip_norm)")
        if 2 * lk.canaries > cfg.data.num_clients:
            fail("canaries", lk.canaries, f"at most half of the {cfg.data.num_clients} "
                 "clients may be canaries")
        if lk.canaries < 20:
            fail("canaries", lk.canaries, "needs at least 20 canaries (about half are "
                 "held out; each group's spread is fitted)")
        if cfg.output.resume:
            fail("canaries", lk.canaries, "the canaries' all-iterates statistic is not "
                 "checkpointed: a resumed run cannot audit")
        if lk.canary_guesses is not None and 2 * lk.canary_guesses > lk.canaries:
            fail("canary_guesses", lk.canary_guesses,
                 f"2 x canary_guesses exceeds the {lk.canaries} canaries")
    elif lk.canary_guesses is not None:
        fail("canary_guesses", lk.canary_guesses, "only applies with canaries")


def resolved_attacks(cfg: Any, model: Any, hides_clients: bool) -> tuple[str, ...]:
    """The attacks an observed round runs: the requested ones, or every one that
    applies (the model's, plain-SGD replay for ``ig``, no ``ig`` on a secure sum)."""
    asked = requested_attacks(cfg)
    if asked is not None:
        return asked
    out = supported_attacks(model)
    if hides_clients or _plain_sgd_clients(cfg):
        out = tuple(a for a in out if a != "ig")
    return out


def _strip(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Feature vectors ``[n, d]`` as one-row images scaled to [0, 1]."""
    x = np.asarray(x, np.float64).reshape(len(x), 1, -1)
    return (x - lo) / max(hi - lo, 1e-12)


def save_grid(path: str, pairs: dict[str, tuple[np.ndarray, np.ndarray]], image: bool,
              title: str) -> str | None:
    """The round's originals above their reconstructions, one block per attack."""
    from fedjax_sim.attacks.plots import save_reconstruction_grid

    rows = []
    for name, (orig, rec) in pairs.items():
        if len(orig) == 0:
            continue
        if not image:
            lo, hi = float(np.min(orig)), float(np.max(orig))
            orig, rec = _strip(orig, lo, hi), _strip(rec, lo, hi)
        rows.append((name, orig, rec))
    if not rows:
        return None
    return save_reconstruction_grid(path, rows, title=title)


@one_off_jit  # run in a few observed rounds: compiled for a short compile
def _gather(population, ids):
    return population.cohort_data(ids)


def cohort_truth(population: Any, ids: np.ndarray) -> Truth:
    """The real examples of the clients ``ids`` (simulator ground truth, for scoring
    only), one row per id. ``ids`` is a fixed-length array per run, ``-1`` allowed: the
    gather compiles once, whoever was sampled."""
    safe = jax.numpy.asarray(np.maximum(ids, 0), jax.numpy.int32)
    data = _gather(population, safe)
    return Truth(np.asarray(data.x), np.asarray(data.y), np.asarray(data.mask, bool))


def pooled_truth(truth: Truth, keep: np.ndarray) -> Truth:
    """The real examples of the rows ``keep`` selects, pooled into one row (what a server
    that holds only the cohort's sum faces)."""
    mask = truth.mask & np.asarray(keep, bool)[:, None]
    return Truth(truth.x[mask][None], truth.y[mask][None],
                 np.ones((1, int(mask.sum())), bool))


def is_canary(canary_ids: Any, ids: np.ndarray) -> np.ndarray:
    """Which ``ids`` are auditing canaries (their uploads carry no data to score)."""
    if canary_ids is None:
        return np.zeros(np.shape(ids), bool)
    return np.isin(ids, canary_ids)


class LeakageReporter(Reporter):
    """The honest-but-curious server's attacks in the observed rounds (module docstring).

    Reads the round's captured uploads (or its server view), the params broadcast in
    that round and the victims' data (ground truth, for scoring only). Auditing canaries
    among the victims are left out of the scores: their uploads hold no data.
    """

    def __init__(self, run: Any, output_dir: str | None):
        exp = run.experiment
        cfg = exp.cfg
        self.rounds = frozenset(observed_rounds(cfg))
        self.hides = exp.round.hides_clients
        self.model = exp.model
        self.attack = HonestServerAttack(
            resolved_attacks(cfg, exp.model, self.hides), local_training(cfg),
            InversionConfig(steps=cfg.leakage.inversion_steps, learning_rate=0.1,
                            restarts=cfg.leakage.inversion_restarts,
                            tv_weight=cfg.leakage.tv_weight, signed=True, decay=True))
        self.probe = np.asarray(exp.data.pooled_test()[0][:256])
        self.key = jax.random.fold_in(exp.key, 0x1EA7)
        self.dir = os.path.join(output_dir, LEAKAGE_DIR) if output_dir else None
        self.rows: list[dict[str, float]] = []
        self.canary_ids = None if exp.canaries is None else exp.canaries.client_ids

    def resume(self, run, rows):
        self.rows = [{k: v for k, v in row.items() if k.startswith("leak_")}
                     for row in rows if row.get("leak_victims") is not None]

    def round(self, run, r, state, metrics, row):
        if r not in self.rounds:
            return
        out, params = run.output, run.params_before
        key = jax.random.fold_in(self.key, r)
        if self.hides:
            view = out.server_view
            ids = np.asarray(out.client_ids)
            # The cohort's real examples, canaries' left out (their uploads hold no data).
            truth = pooled_truth(cohort_truth(run.experiment.data.population, ids),
                                 (ids >= 0) & ~is_canary(self.canary_ids, ids))
            leak = attack_secure_sum(self.model, params, view.total, int(view.count),
                                     truth, self.attack, probe_x=self.probe)
        else:
            cap = jax.device_get(out.observed[CAPTURE])
            ids = np.asarray(cap.client_ids)
            truth = cohort_truth(run.experiment.data.population, ids)
            # A client without examples leaks nothing; a canary's upload holds no data.
            keep = (np.asarray(cap.present, bool) & truth.mask.any(axis=1)
                    & ~is_canary(self.canary_ids, ids))
            if not keep.any():
                row["leak_victims"] = 0
                return
            uploads = jax.tree.map(lambda u: u[keep], cap.uploads)
            truth = Truth(truth.x[keep], truth.y[keep], truth.mask[keep])
            leak = attack_uploads(self.model, params, uploads, truth, self.attack,
                                  probe_x=self.probe, key=key)
        row.update(leak.metrics)
        self.rows.append(dict(leak.metrics))
        if self.dir:
            os.makedirs(self.dir, exist_ok=True)
            save_grid(os.path.join(self.dir, f"round_{r + 1:04d}.png"), leak.pairs,
                      is_image(tuple(self.model.example_shape)),
                      f"round {r + 1}: originals (top) and reconstructions")

    def finish(self, run, state, summary):
        keys = sorted({k for row in self.rows for k in row})
        summary["leakage"] = {
            "threat_model": "honest-but-curious server: follows the protocol, knows the "
                            "model, the broadcast params, the local training and each "
                            "victim's example count; scored on simulator ground truth",
            "sees": ("the decoded secure sum of the survivors' uploads" if self.hides
                     else "each victim's upload as sent (after client-side defences)"),
            "observed_rounds": sorted(r + 1 for r in self.rounds),
            "attacks": list(self.attack.attacks),
            "mean": {k: float(np.nanmean([row.get(k, np.nan) for row in self.rows]))
                     for k in keys} if self.rows else {}}


__all__ = ["LEAKAGE_DIR", "LeakageReporter", "check_leakage", "cohort_truth", "is_canary",
           "local_training", "observed_rounds", "pooled_truth", "requested_attacks",
           "resolved_attacks", "save_grid"]
