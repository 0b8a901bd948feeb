"""Ready-made experiments on scikit-learn digits: one function per attack, shared by the
CLI, the sweep script, the notebook and the tests.

Each function draws victims from the digits, runs rounds of the simulator with them
(:func:`fedjax_sim.make_round`; the defences are stages of the round's chain), takes what
the attacker sees from the round itself (the uploads as sent, the decoded secure sum, or
the next global models), runs the attack (vmapped over victims) and scores it with
:mod:`fedjax_sim.attacks.metrics`. It returns a flat dict of JSON-ready numbers plus
``originals`` / ``reconstructions`` arrays (matched pairs of the first victims, for image
grids). Public (auxiliary) data is the digits test split; victims come from the training
split, unless a setting says otherwise. Settings that change results are keyword
arguments (and ``fedjax-sim attack`` flags): the defences, Inverting Gradients'
``tv_weight``, the number of public examples that set imprint bins (``public_size``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim._validation import check_choice, check_float, check_int, fail
from fedjax_sim.attacks import imprint as imp
from fedjax_sim.attacks.analytic import closed_form_attack
from fedjax_sim.attacks.inversion import (DLG_DEFAULTS, IG_DEFAULTS, dlg_attack,
                                          inverting_gradients_attack)
from fedjax_sim.attacks.labels import recover_labels
from fedjax_sim.attacks.malicious_client import MaliciousClientConfig, malicious_client_rounds
from fedjax_sim.attacks.metrics import (evaluate_victims, label_count_accuracy,
                                        match_reconstructions)
from fedjax_sim.attacks.updates import LocalTraining, observe_victims
from fedjax_sim.data.digits import digits_train_test, load_digits_arrays
from fedjax_sim.models import make_model

INVERSION_ATTACKS = ("ig", "dlg", "closed_form")
EDGE_SOURCES = ("public", "known", "gaussian")
EXAMPLE_SHAPE = (8, 8, 1)
NOTHING_READ = {"exact_fraction": 0.0, "psnr": float("nan"), "ssim": float("nan")}
"""The scores of a trial in which nothing was read off (no pair to score)."""


def _draw(x: np.ndarray, y: np.ndarray, groups: int, size: int, rng: np.random.Generator
          ) -> tuple[np.ndarray, np.ndarray]:
    """``groups`` independent draws of ``size`` distinct examples."""
    if size > len(x):
        fail("batch_size", size, f"exceeds the {len(x)} available examples")
    idx = np.stack([rng.choice(len(x), size, replace=False) for _ in range(groups)])
    return x[idx], y[idx]


def matched_pairs(recons: np.ndarray, truths: np.ndarray, limit: int = 8
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``limit`` matched (original, reconstruction) pairs, victims in order.

    ``recons`` may be a list of per-victim arrays of different lengths (none: skipped).
    """
    originals, recon_out = [], []
    for v in range(len(truths)):
        if len(recons[v]) == 0:  # nothing read off (a malicious client's failed install)
            continue
        ti, ri = match_reconstructions(recons[v], truths[v])
        originals += list(np.asarray(truths[v])[ti])
        recon_out += list(np.asarray(recons[v])[ri])
        if len(originals) >= limit:
            break
    shape = (0,) + tuple(np.shape(truths)[2:])
    return (np.asarray(originals[:limit]).reshape((-1,) + shape[1:]) if originals
            else np.zeros(shape), np.asarray(recon_out[:limit]).reshape((-1,) + shape[1:])
            if recon_out else np.zeros(shape))


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k != "per_victim"}


def _public_edges_set(public_x: np.ndarray, public_size: int | None) -> np.ndarray:
    """The first ``public_size`` public examples (all of them when None)."""
    if public_size is None:
        return public_x
    n = check_int("public_size", public_size, min_value=2, max_value=len(public_x))
    return public_x[:n]


def run_inversion(*, attack: str = "ig", model_name: str = "mlp", hidden: int = 64,
                  batch_size: int = 1, num_victims: int = 8, learning_rate: float = 0.1,
                  local_epochs: int = 1, local_batch_size: int | None = None,
                  clip_norm: float | None = None, noise_multiplier: float = 0.0,
                  secure_aggregation: bool = False, steps: int | None = None,
                  restarts: int | None = None, tv_weight: float | None = None,
                  seed: int = 0) -> dict[str, Any]:
    """An honest server inverts victims' updates (IG, DLG or the closed form).

    Threat model: an honest-but-curious server that runs one round of the simulator over
    the victims (FedAvg's client update: FedSGD by default) and keeps what it receives
    (:func:`~fedjax_sim.attacks.updates.observe_victims`): each upload after the clients'
    clipping and local noise, or only the decoded secure sum. It knows the model, the
    global params and the local training; labels are recovered from the updates.

    Args:
      attack: ``"ig"``, ``"dlg"`` or ``"closed_form"``.
      model_name: ``"softmax"`` or ``"mlp"`` (one hidden layer of ``hidden`` units).
      hidden: MLP width.
      batch_size: examples per victim.
      num_victims: victims (clients) attacked at once (the round's cohort).
      learning_rate, local_epochs, local_batch_size: the victims' local SGD.
      clip_norm: per-client clip norm (None: no clipping; secure aggregation then clips
        at a bound above every update).
      noise_multiplier: Gaussian noise std in units of ``clip_norm``: added by each client
        to its upload, or, under secure aggregation, as distributed shares of the sum.
      secure_aggregation: the attacker sees only the sum over the victims and treats it
        as one client with all their examples, divided by the known cohort size (exact for
        FedSGD; with several local steps an approximation).
      steps, restarts: optimisation settings (defaults: the attack's).
      tv_weight: Inverting Gradients' total-variation weight (default: the attack's).
      seed: seed of data, model init, training order, noise and attack.

    Returns:
      Summary metrics (``psnr``, ``ssim``, ``mse``, ``label_accuracy``, ...), the settings,
      ``update_norm_median`` (of the clean updates), and arrays ``originals`` /
      ``reconstructions``.
    """
    check_choice("attack", attack, INVERSION_ATTACKS)
    check_choice("model", model_name, ("softmax", "mlp"))
    batch_size = check_int("batch_size", batch_size, min_value=1)
    num_victims = check_int("num_victims", num_victims, min_value=1)
    if tv_weight is not None:
        if attack != "ig":
            fail("tv_weight", tv_weight, f"only applies to attack='ig' (Inverting Gradients' "
                 f"image prior), not attack={attack!r}")
        tv_weight = check_float("tv_weight", tv_weight, min_value=0.0)
    if secure_aggregation and num_victims < 2:
        fail("num_victims", num_victims, "secure aggregation sums at least 2 victims")
    local = LocalTraining(learning_rate, local_epochs, local_batch_size)
    rng = np.random.default_rng(seed)
    train_x, train_y, public_x, _ = digits_train_test(seed=seed)
    x, y = _draw(train_x, train_y, num_victims, batch_size, rng)
    model = make_model(model_name, EXAMPLE_SHAPE, 10, hidden=(hidden,))
    keys = jax.random.split(jax.random.key(seed), 4)
    params = jax.jit(model.init)(keys[0])
    seen = observe_victims(model, params, x, y, local, clip_norm=clip_norm,
                           noise_multiplier=noise_multiplier,
                           secure_aggregation=secure_aggregation, key=keys[1])
    norms = seen.clean_norms
    observed = seen.uploads
    if secure_aggregation:
        observed = jax.tree.map(lambda u: u / num_victims, observed)
        x, y = x.reshape((1, -1) + x.shape[2:]), y.reshape(1, -1)
    eff_batch = x.shape[1]
    labels = recover_labels(model, params, observed, jnp.asarray(public_x[:256]),
                            batch_size=eff_batch, learning_rate=learning_rate,
                            num_steps=local.steps(batch_size))
    if attack == "closed_form":
        rec = closed_form_attack(observed, EXAMPLE_SHAPE, num_reconstructions=eff_batch)
        rec_labels = labels if eff_batch == 1 else None  # no pairing of labels to images
    else:
        base = IG_DEFAULTS if attack == "ig" else DLG_DEFAULTS
        settings = {"steps": steps, "restarts": restarts, "tv_weight": tv_weight}
        config = dataclasses.replace(base, **{k: v for k, v in settings.items()
                                              if v is not None})
        tv_weight = config.tv_weight
        if attack == "ig":
            rec = inverting_gradients_attack(model, params, observed, labels, local,
                                             key=keys[3], config=config)
        else:
            rec = dlg_attack(model, params, observed, local, batch_size=eff_batch,
                             key=keys[3], config=config)
        rec_labels = rec.labels
    recons = np.asarray(rec.inputs)
    metrics = evaluate_victims(
        recons, x, true_labels=y,
        recon_labels=None if rec_labels is None else np.asarray(rec_labels))
    originals, matched = matched_pairs(recons, x)
    return {"attack": attack, "model": model_name, "batch_size": batch_size,
            "num_victims": num_victims, "local_epochs": local_epochs,
            "local_batch_size": local_batch_size, "local_steps": local.steps(batch_size),
            "clip_norm": clip_norm, "noise_multiplier": noise_multiplier,
            "secure_aggregation": secure_aggregation, "tv_weight": tv_weight,
            "label_recovery_accuracy": float(np.mean([
                label_count_accuracy(np.asarray(labels)[v], y[v]) for v in range(len(y))])),
            "update_norm_median": float(np.median(norms)), **_summary(metrics),
            "originals": originals, "reconstructions": matched}


def run_imprint(*, num_bins: int = 64, batch_size: int = 64, num_victims: int = 4,
                clients_per_aggregate: int = 1, variant: str = "dense",
                direction: str = "random", edges_from: str = "known",
                inner_model: str = "softmax", learning_rate: float = 0.1,
                local_epochs: int = 1, local_batch_size: int | None = None,
                clip_norm: float | None = None, noise_multiplier: float = 0.0,
                public_size: int | None = None, seed: int = 0) -> dict[str, Any]:
    """A malicious server prepends an imprint block and reads examples off the updates.

    Threat model: the server chooses the model it sends (the imprint block, "Robbing the
    Fed") and otherwise runs rounds of the simulator as specified: it reads each client's
    upload as sent (after the client's clipping and local noise) or, under secure
    aggregation, only the decoded sum of ``clients_per_aggregate`` clients (one round per
    sum; noise then comes as the clients' distributed shares).

    Args:
      num_bins: ``k``.
      batch_size: examples per client.
      num_victims: independent observations (one client each, or one cohort sum each).
      clients_per_aggregate: 1 = the server sees each client's update; more = secure
        aggregation: it sees only the sum over this many clients.
      variant: ``"dense"`` or ``"sparse"`` imprint.
      direction: ``"random"`` or ``"mean"`` measurement.
      edges_from: ``"known"`` (victims drawn from all digits, bins at that pool's exact
        quantiles), ``"public"`` (victims from the training split, bins from the public
        test split) or ``"gaussian"`` (a Gaussian fit to the public split).
      inner_model: the federation's model behind the imprint block.
      learning_rate, local_epochs, local_batch_size: the clients' local SGD.
      clip_norm, noise_multiplier: per-client clipping; Gaussian noise on each observed
        update (added by each client, or as distributed shares of each secure sum).
      public_size: public examples that set the bin edges (``"public"``/``"gaussian"``;
        default: the whole public split).
      seed: seed of everything.

    Returns:
      ``exact_fraction``, ``psnr``, ..., ``predicted_rate`` ``(1 - 1/k)^(n - 1)`` with
      ``n = batch_size * clients_per_aggregate``, ``expected_rate`` (for the realised bin
      probabilities), the settings (``public_size``: the examples that set the edges), and
      ``originals`` / ``reconstructions``.
    """
    config = imp.ImprintConfig(num_bins, variant, direction)
    check_choice("edges_from", edges_from, EDGE_SOURCES)
    cpa = check_int("clients_per_aggregate", clients_per_aggregate, min_value=1)
    num_victims = check_int("num_victims", num_victims, min_value=1)
    batch_size = check_int("batch_size", batch_size, min_value=1)
    if public_size is not None and edges_from == "known":
        fail("public_size", public_size, "only applies with edges_from='public' or "
             "'gaussian' ('known' bins sit at the victims' pool's exact quantiles)")
    rng = np.random.default_rng(seed)
    keys = jax.random.split(jax.random.key(seed), 4)
    train_x, train_y, public_x, _ = digits_train_test(seed=seed)
    if edges_from == "known":
        pool_x, pool_y = load_digits_arrays()
        reference = pool_x
    else:
        pool_x, pool_y = train_x, train_y
        reference = _public_edges_set(public_x, public_size)
    w = imp.measurement_direction(direction, int(np.prod(EXAMPLE_SHAPE)), key=keys[0])
    m_ref = imp.measure(reference, w)
    edges = (imp.bin_edges_gaussian(float(m_ref.mean()), float(m_ref.std()), num_bins)
             if edges_from == "gaussian" else imp.bin_edges_from_data(m_ref, num_bins))
    inner = make_model(inner_model, EXAMPLE_SHAPE, 10, hidden=(32,))
    model, params = imp.make_imprint_model(inner, jax.jit(inner.init)(keys[1]), config, w, edges)
    n = batch_size * cpa
    x, y = _draw(pool_x, pool_y, num_victims, n, rng)
    local = LocalTraining(learning_rate, local_epochs, local_batch_size)
    cx = x.reshape((num_victims * cpa, batch_size) + EXAMPLE_SHAPE)
    cy = y.reshape(num_victims * cpa, batch_size)
    observed = observe_victims(model, params, cx, cy, local, clip_norm=clip_norm,
                               noise_multiplier=noise_multiplier, secure_aggregation=cpa > 1,
                               group_size=cpa, key=keys[2]).uploads
    rec = imp.imprint_attack(observed, config, EXAMPLE_SHAPE)
    recons = np.asarray(rec.inputs)
    metrics = evaluate_victims(recons, x)
    pool_bins = np.clip(np.searchsorted(edges, imp.measure(pool_x, w)) - 1, 0, num_bins - 1)
    probs = np.bincount(pool_bins, minlength=num_bins) / len(pool_x)
    originals, matched = matched_pairs(recons, x)
    return {"attack": "imprint", "num_bins": num_bins, "variant": variant,
            "direction": direction, "edges_from": edges_from, "batch_size": batch_size,
            "clients_per_aggregate": cpa, "num_examples": n, "num_victims": num_victims,
            "local_epochs": local_epochs, "local_batch_size": local_batch_size,
            "clip_norm": clip_norm, "noise_multiplier": noise_multiplier,
            "secure_aggregation": cpa > 1, "public_size": len(reference),
            "predicted_rate": imp.predicted_recovery_rate(n, num_bins),
            "expected_rate": imp.expected_recovery_rate(probs, n), **_summary(metrics),
            "originals": originals, "reconstructions": matched}


def run_malicious_client(*, num_bins: int = 512, cohort_size: int = 16, batch_size: int = 4,
                         trials: int = 3, learning_rate: float = 0.1,
                         precision: str = "float64", clip_norm: float | None = None,
                         norm_bound: float | None = None, noise_multiplier: float = 0.0,
                         public_size: int | None = None, seed: int = 0) -> dict[str, Any]:
    """The reference malicious-client setting: digits, FedSGD, imprint MLP, two rounds of
    the simulator (:func:`~fedjax_sim.attacks.malicious_client.malicious_client_rounds`,
    built once for all trials).

    A ``(num_bins, 64)`` MLP; ``cohort_size - 1`` honest clients with ``batch_size``
    training examples each per round and the attacker (holding ``batch_size`` public
    examples); the attacker's bins come from the public split. Threat model: the
    attacker is one client; it sees only the global models (see the module of the
    attack); the server's defences are optional stages of its chain.

    Args:
      num_bins: ``k`` (also the first hidden layer's width).
      cohort_size: ``C`` (attacker included).
      batch_size: examples per honest client.
      trials: independent repetitions (fresh clients each time).
      learning_rate: FedSGD's (server) learning rate.
      precision: ``"float64"`` or ``"float32"`` global model.
      clip_norm: the server clips every upload to this L2 norm (None: no clipping).
      norm_bound: the server drops uploads above this L2 norm (None: none).
      noise_multiplier: DP-FedAvg's Gaussian noise on the sum, std ``z * clip_norm``.
      public_size: public examples that set the bin edges (default: the whole split).
      seed: seed of everything.

    Returns:
      ``exact_fraction`` (mean over trials), ``exact_fraction_per_trial``,
      ``installed_fraction`` and ``installed_per_trial`` (trials whose install round
      installed the imprint; the others recover nothing), ``install_error_per_trial``,
      ``predicted_rate``, ``expected_rate``, ``psnr``, the settings and image arrays.
    """
    config = MaliciousClientConfig(num_bins, cohort_size, precision=precision)
    trials = check_int("trials", trials, min_value=1)
    batch_size = check_int("batch_size", batch_size, min_value=1)
    rng = np.random.default_rng(seed)
    keys = jax.random.split(jax.random.key(seed), 3)
    train_x, train_y, public_x, public_y = digits_train_test(seed=seed)
    public = _public_edges_set(public_x, public_size)
    model = make_model("mlp", EXAMPLE_SHAPE, 10, hidden=(num_bins, 64))
    params = jax.jit(model.init)(keys[0])
    w = imp.measurement_direction("random", int(np.prod(EXAMPLE_SHAPE)), key=keys[1])
    edges = imp.bin_edges_from_data(imp.measure(public, w), num_bins)
    local = LocalTraining(learning_rate)
    honest = cohort_size - 1
    if 2 * honest * batch_size > len(train_x):
        fail("batch_size", batch_size, f"two rounds of {honest} honest clients need more "
             f"than the {len(train_x)} training examples")
    attack = malicious_client_rounds(model, params, w, edges, config, local,
                                     clip_norm=clip_norm, norm_bound=norm_bound,
                                     noise_multiplier=noise_multiplier)
    fractions, psnrs, ssims, recons, truths, installed, errors = [], [], [], [], [], [], []
    for trial in range(trials):
        idx = rng.choice(len(train_x), 2 * honest * batch_size, replace=False)
        idx = idx.reshape(2, honest, batch_size)
        result = attack(train_x[idx[0]], train_y[idx[0]], train_x[idx[1]], train_y[idx[1]],
                        attacker_x=public_x[:batch_size], attacker_y=public_y[:batch_size],
                        key=jax.random.fold_in(keys[2], trial))
        truth = train_x[idx[1]].reshape((-1,) + EXAMPLE_SHAPE)
        metrics = (evaluate_victims(result.reconstructions[None], truth[None])
                   if result.installed else NOTHING_READ)
        fractions.append(metrics["exact_fraction"])
        psnrs.append(metrics["psnr"])
        ssims.append(metrics["ssim"])
        recons.append(result.reconstructions)
        truths.append(truth)
        installed.append(result.installed)
        errors.append(result.install_error)
    n = honest * batch_size
    bins = np.clip(np.searchsorted(edges, imp.measure(train_x, w)) - 1, 0, num_bins - 1)
    probs = np.bincount(bins, minlength=num_bins) / len(train_x)
    originals, matched = matched_pairs(recons, np.asarray(truths))
    return {"attack": "malicious_client", "num_bins": num_bins, "cohort_size": cohort_size,
            "honest_clients": honest, "batch_size": batch_size, "num_examples": n,
            "precision": precision, "trials": trials, "clip_norm": clip_norm,
            "norm_bound": norm_bound, "noise_multiplier": noise_multiplier,
            "public_size": len(public),
            "exact_fraction": float(np.mean(fractions)),
            "exact_fraction_per_trial": [float(f) for f in fractions],
            "installed_fraction": float(np.mean(installed)),
            "installed_per_trial": [bool(i) for i in installed],
            "install_error_per_trial": [float(e) for e in errors],
            "psnr": float(np.nanmean(psnrs)) if np.isfinite(psnrs).any() else float("nan"),
            "ssim": float(np.nanmean(ssims)) if np.isfinite(ssims).any() else float("nan"),
            "predicted_rate": imp.predicted_recovery_rate(n, num_bins),
            "expected_rate": imp.expected_recovery_rate(probs, n),
            "originals": originals, "reconstructions": matched}


__all__ = ["EDGE_SOURCES", "INVERSION_ATTACKS", "matched_pairs", "run_imprint",
           "run_inversion", "run_malicious_client"]
