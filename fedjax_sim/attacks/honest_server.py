"""The honest-but-curious server inside a run: attacks on what it saw, scored on the truth.

Threat model: the server follows the protocol and changes nothing. It knows the model,
the global params it broadcast in the round, the clients' local training (learning rate,
epochs, batch size) and each victim's number of examples (the upload's weight under
example weighting), and holds a little auxiliary data from the same domain (the run's
held-out inputs, for the mean prediction of the label-count estimate). It sees either
every upload as sent, after the client-side defences
(:func:`~fedjax_sim.attacks.capture.victim_capture`), or behind secure aggregation only the
decoded sum of the survivors' uploads and their number.

Attacks (each vmapped over victims):

* ``labels``: the count estimate of Geng et al. 2021 / Wainakh et al. 2022 from the output
  bias (:mod:`~fedjax_sim.attacks.labels`) with each victim's own example count and
  number of local steps, scored as the recovered share of the label multiset; and iDLG
  (Zhao et al. 2020), the argmax of the output-bias delta, scored as the share of victims
  whose argmax is one of their labels (exact for a batch of one).
* ``closed_form``: input recovery through the first dense layer (Phong et al. 2017;
  :mod:`~fedjax_sim.attacks.analytic`), exact for one example and FedSGD.
* ``ig``: Inverting Gradients (Geiping et al. 2020) replaying the victims' actual local
  training: the known steps, learning rate and batch size, padding skipped as the engine
  skips it, with the recovered labels.

Scoring (simulator ground truth, the victims' real examples): reconstructions are matched
one to one to the truth by MSE (Hungarian); images get PSNR and SSIM, other data the
feature-space MSE and cosine; an example counts as *recovered* when its match is above
30 dB (PSNR for images in [0, 1]; for other data the signal-to-error ratio
``20 log10(|x| / |x - x_hat|)``). Fractions are over the victims' real examples.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim._validation import check_choice, fail
from fedjax_sim.attacks.analytic import closed_form_attack
from fedjax_sim.attacks.inversion import InversionConfig, inverting_gradients_attack
from fedjax_sim.attacks.labels import (labels_from_counts, mean_probabilities, output_bias,
                                       round_counts)
from fedjax_sim.attacks.metrics import match_reconstructions, psnr, ssim
from fedjax_sim.attacks.updates import LocalTraining, dense_layers
from fedjax_sim.models import Model

PyTree = Any

ATTACKS = ("labels", "closed_form", "ig")
RECOVERED_DB = 30.0
"""An example is recovered when its matched reconstruction is above this many dB."""


@dataclasses.dataclass(frozen=True)
class HonestServerAttack:
    """What the honest-but-curious server runs in an observed round.

    Attributes:
      attacks: a subset of :data:`ATTACKS`.
      local: the victims' local training (what the server knows of it).
      inversion: the optimisation settings of ``ig``.
    """

    attacks: tuple[str, ...]
    local: LocalTraining
    inversion: InversionConfig

    def __post_init__(self):
        for a in self.attacks:
            check_choice("leak_attacks", a, ATTACKS)


class Truth(NamedTuple):
    """The victims' real data (simulator ground truth), padded: ``x [V, B, ...]``,
    ``y [V, B]``, ``mask [V, B]`` (real examples first, as the engine packs them)."""

    x: np.ndarray
    y: np.ndarray
    mask: np.ndarray


class Leakage(NamedTuple):
    """One observed round's result: ``metrics`` (``leak_*`` floats, NaN where an attack
    did not run) and ``pairs``, per reconstruction attack the matched ``(originals,
    reconstructions)`` of the first victims, for the image grid."""

    metrics: dict[str, float]
    pairs: dict[str, tuple[np.ndarray, np.ndarray]]


def is_image(example_shape: tuple[int, ...]) -> bool:
    """Images are ``[H, W, C]`` with values in [0, 1]; everything else is features."""
    return len(example_shape) == 3


def supported_attacks(model: Model) -> tuple[str, ...]:
    """The attacks that apply to ``model``: ``closed_form`` needs a dense layer on the
    flattened input (softmax, MLP; not the CNN); labels and ``ig`` apply to any model
    with a dense output layer."""
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    layers = dense_layers(shapes)
    if not layers:
        return ()
    d = math.prod(model.example_shape)
    dense_input = any(k.shape[-2] == d for _, k, _ in layers)
    return tuple(a for a in ATTACKS if a != "closed_form" or dense_input)


def _score(recon: np.ndarray, truth: np.ndarray, image: bool) -> dict[str, Any]:
    """Matched-pair scores of one victim: sums (to average over examples) and per-pair
    means."""
    ti, ri = match_reconstructions(recon, truth)
    out = {"n": len(truth), "recovered": 0, "pairs": (ti, ri)}
    if len(ti) == 0:
        return out
    r, t = np.asarray(recon, np.float64)[ri], np.asarray(truth, np.float64)[ti]
    flat_r, flat_t = r.reshape(len(ti), -1), t.reshape(len(ti), -1)
    if image:
        quality = psnr(r, t)
        out["psnr"] = float(np.mean(quality))
        if min(t.shape[1:3]) >= 3:
            out["ssim"] = float(np.mean(ssim(r, t)))
    else:
        err = np.linalg.norm(flat_r - flat_t, axis=1)
        quality = 20.0 * np.log10(np.linalg.norm(flat_t, axis=1) / np.maximum(err, 1e-30))
        out["feature_mse"] = float(np.mean((flat_r - flat_t) ** 2))
        cos = np.sum(flat_r * flat_t, 1) / np.maximum(
            np.linalg.norm(flat_r, axis=1) * np.linalg.norm(flat_t, axis=1), 1e-30)
        out["cosine"] = float(np.mean(cos))
    out["recovered"] = int(np.sum(quality > RECOVERED_DB))
    return out


def score_reconstructions(name: str, recons: np.ndarray, truth: Truth, counts: np.ndarray,
                          image: bool) -> tuple[dict[str, float], tuple]:
    """``leak_{name}_*`` metrics of ``recons [V, M, ...]`` against the victims' real
    examples (the first ``counts[v]`` reconstructions of victim v are its guesses), and
    up to 8 matched pairs for the grid."""
    per = [_score(np.asarray(recons[v])[:max(int(counts[v]), 1)],
                  truth.x[v][truth.mask[v]], image) for v in range(len(counts))]
    total = sum(p["n"] for p in per)
    metrics = {f"leak_{name}_recovered": sum(p["recovered"] for p in per) / max(total, 1)}
    for key in (("psnr", "ssim") if image else ("feature_mse", "cosine")):
        values = [p[key] for p in per if key in p]
        metrics[f"leak_{name}_{key}"] = float(np.mean(values)) if values else float("nan")
    originals, matched = [], []
    for v, p in enumerate(per):
        ti, ri = p["pairs"]
        originals += list(truth.x[v][truth.mask[v]][ti])
        matched += list(np.asarray(recons[v])[ri])
    return metrics, (np.asarray(originals[:8]), np.asarray(matched[:8]))


def _label_counts(updates: PyTree, probs: jax.Array, counts: jax.Array, steps: jax.Array,
                  lr: float) -> jax.Array:
    def one(update, n, k):
        g = -output_bias(update) / (lr * jnp.maximum(k, 1.0))
        return round_counts(n * (probs - g), n)
    return jax.vmap(one)(updates, counts, steps)


_label_counts_jit = jax.jit(_label_counts, static_argnames=("lr",))


def local_steps(local: LocalTraining, counts: np.ndarray) -> np.ndarray:
    """The local steps a client with ``counts`` real examples takes (steps that see no
    real example are skipped by the engine)."""
    return np.asarray([local.steps(int(n)) if n > 0 else 0 for n in counts], np.float32)


def attack_uploads(model: Model, params: PyTree, uploads: PyTree, truth: Truth,
                   attack: HonestServerAttack, *, probe_x: Any, key: jax.Array) -> Leakage:
    """Every configured attack on the victims' uploads ``[V, ...]`` (what the server
    received from each), scored against ``truth``.

    Args:
      model: the model the victims trained.
      params: the global params broadcast in the round.
      uploads: the victims' uploads as sent (every leaf ``[V, ...]``).
      truth: their real data (:class:`Truth`).
      attack: what to run.
      probe_x: auxiliary inputs (the mean prediction of the label-count estimate).
      key: PRNG key of the inversion's initialisations.

    Returns:
      :class:`Leakage`.
    """
    counts = truth.mask.sum(axis=1).astype(np.int64)
    if np.any(counts == 0):
        fail("truth.mask", "<a victim without examples>", "every victim needs an example")
    image = is_image(tuple(model.example_shape))
    metrics: dict[str, float] = {"leak_victims": int(len(counts))}
    pairs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    labels = None
    if "labels" in attack.attacks or "ig" in attack.attacks:
        probs = mean_probabilities(model, params, jnp.asarray(probe_x))
        est = np.asarray(_label_counts_jit(
            uploads, probs, jnp.asarray(counts, jnp.float32),
            jnp.asarray(local_steps(attack.local, counts)), lr=attack.local.learning_rate))
        b = truth.y.shape[1]
        labels = np.stack([np.asarray(labels_from_counts(jnp.asarray(c), b)) for c in est])
        if "labels" in attack.attacks:
            true_counts = [np.bincount(truth.y[v][truth.mask[v]], minlength=est.shape[1])
                           for v in range(len(counts))]
            metrics["leak_label_accuracy"] = float(
                sum(np.minimum(e, t).sum() for e, t in zip(est, true_counts)) / counts.sum())
            bias = np.asarray(jax.vmap(output_bias)(uploads))
            top = bias.argmax(axis=1)
            metrics["leak_idlg_accuracy"] = float(np.mean(
                [top[v] in set(truth.y[v][truth.mask[v]].tolist())
                 for v in range(len(counts))]))
    if "closed_form" in attack.attacks:
        rec = closed_form_attack(uploads, tuple(model.example_shape),
                                 num_reconstructions=truth.y.shape[1], clip=image)
        m, pairs["closed_form"] = score_reconstructions(
            "closed_form", np.asarray(rec.inputs), truth, counts, image)
        metrics.update(m)
    if "ig" in attack.attacks:
        config = dataclasses.replace(attack.inversion, box=image)
        rec = inverting_gradients_attack(model, params, uploads, jnp.asarray(labels),
                                         attack.local, key=key, config=config,
                                         mask=jnp.asarray(truth.mask))
        m, pairs["ig"] = score_reconstructions("ig", np.asarray(rec.inputs), truth, counts,
                                               image)
        metrics.update(m)
    return Leakage(metrics, pairs)


def attack_secure_sum(model: Model, params: PyTree, total: PyTree, count: int, truth: Truth,
                      attack: HonestServerAttack, *, probe_x: Any,
                      max_reconstructions: int = 64) -> Leakage:
    """What the server recovers from the secure sum of ``count`` uploads: the attacks
    that take a sum (label counts over the whole cohort; closed-form candidates matched
    against every example of the cohort). Inversion of a sum over the cohort's examples
    is not attempted (its batch is the cohort's examples); ``leak_ig_*`` stay absent.

    Args:
      total: the decoded sum (a pytree like one upload).
      count: the uploads summed.
      truth: the cohort's data as one "victim" (``x [1, N, ...]``).
      max_reconstructions: closed-form candidates kept.
    """
    n = int(truth.mask.sum())
    image = is_image(tuple(model.example_shape))
    metrics: dict[str, float] = {"leak_victims": int(count), "leak_secure_sum": 1}
    pairs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    mean = jax.tree.map(lambda t: (t / max(count, 1))[None], total)
    if "labels" in attack.attacks and count > 0:
        probs = mean_probabilities(model, params, jnp.asarray(probe_x))
        per_client = n / max(count, 1)
        steps = jnp.asarray([attack.local.steps(max(int(round(per_client)), 1))],
                            jnp.float32)
        est = np.asarray(_label_counts_jit(mean, probs, jnp.asarray([n], jnp.float32),
                                           steps, lr=attack.local.learning_rate))[0]
        true = np.bincount(truth.y[0][truth.mask[0]], minlength=len(est))
        metrics["leak_label_accuracy"] = float(np.minimum(est, true).sum() / max(n, 1))
    if "closed_form" in attack.attacks and count > 0:
        k = min(max_reconstructions, n)
        rec = closed_form_attack(mean, tuple(model.example_shape), num_reconstructions=k,
                                 clip=image)
        m, pairs["closed_form"] = score_reconstructions(
            "closed_form", np.asarray(rec.inputs), truth, np.asarray([k]), image)
        metrics.update(m)
    return Leakage(metrics, pairs)


__all__ = ["ATTACKS", "HonestServerAttack", "Leakage", "RECOVERED_DB", "Truth",
           "attack_secure_sum", "attack_uploads", "is_image", "local_steps",
           "score_reconstructions", "supported_attacks"]
