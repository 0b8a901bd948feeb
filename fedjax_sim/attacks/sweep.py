"""The defence sweep: every attack against clipping, DP noise, larger batches, more local
steps and secure aggregation, and the malicious client against the server's norm bound and
clipping, as one table (used by ``scripts/attack_sweep.py`` and the notebook). Every row
runs on rounds of the simulator whose chain holds the defences (:mod:`.lab`).

Each row is one (attack, setting) with the settings and the headline metrics: PSNR / SSIM
/ label accuracy for the optimisation and closed-form attacks, exact-recovery fraction
against its prediction for the imprint and malicious-client attacks. The clip norm of the
inversion rows is half the median norm of the victims' clean updates (half the clients
are clipped); noise multipliers are relative to it.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from typing import Any, Callable

from fedjax_sim.attacks import lab

COLUMNS = ("attack", "setting", "batch_size", "local_steps", "clip_norm", "noise_multiplier",
           "norm_bound", "secure_aggregation", "psnr", "ssim", "label_accuracy",
           "label_recovery_accuracy", "exact_fraction", "installed_fraction", "predicted_rate",
           "seconds")


def _row(setting: str, result: dict[str, Any], seconds: float) -> dict[str, Any]:
    row = {k: result.get(k) for k in COLUMNS}
    row.update(setting=setting, seconds=round(seconds, 2))
    return row


def defence_sweep(*, seed: int = 0, num_victims: int = 8, steps: int = 200,
                  restarts: int = 2, small: bool = False,
                  progress: Callable[[str], None] | None = None
                  ) -> tuple[list[dict[str, Any]], dict[str, tuple]]:
    """Runs the sweep.

    Args:
      seed: seed of every experiment.
      num_victims: victims per inversion setting (the secure-aggregation cohort size).
      steps, restarts: Inverting Gradients' optimisation budget.
      small: a reduced grid (for notebooks and smoke tests).
      progress: called with a short line before each experiment.

    Returns:
      ``(rows, images)``: the table rows and, per setting label, matched
      ``(originals, reconstructions)`` for image grids.
    """
    rows: list[dict[str, Any]] = []
    images: dict[str, tuple] = {}

    def record(label: str, fn: Callable[..., dict[str, Any]], **kwargs) -> dict[str, Any]:
        if progress:
            progress(label)
        start = time.perf_counter()
        out = fn(**kwargs)
        rows.append(_row(label, out, time.perf_counter() - start))
        images[f"{out['attack']}: {label}"] = (out["originals"], out["reconstructions"])
        return out

    inv = dict(seed=seed, num_victims=num_victims, steps=steps, restarts=restarts)
    base = record("baseline (FedSGD, batch 1)", lab.run_inversion, attack="ig", **inv)
    clip = base["update_norm_median"] / 2
    grid = [("batch 4 FedSGD", dict(batch_size=4)),
            ("FedAvg 4 local steps, batch 4", dict(batch_size=4, local_batch_size=1)),
            ("batch 8", dict(batch_size=8)),
            ("batch 32", dict(batch_size=32)),
            ("clip", dict(clip_norm=clip)),
            ("clip + noise z=0.01", dict(clip_norm=clip, noise_multiplier=0.01)),
            ("clip + noise z=0.1", dict(clip_norm=clip, noise_multiplier=0.1)),
            (f"secure aggregation ({num_victims} clients)", dict(secure_aggregation=True))]
    if small:
        grid = [grid[i] for i in (2, 6, 7)]
    for label, kwargs in grid:
        record(label, lab.run_inversion, attack="ig", **inv, **kwargs)
    record("baseline (FedSGD, batch 1)", lab.run_inversion, attack="closed_form", **inv)
    for label, kwargs in grid:
        record(label, lab.run_inversion, attack="closed_form", **inv, **kwargs)

    imp = dict(seed=seed, num_bins=64, batch_size=16, num_victims=4)
    imprint_grid = [("baseline (k=64, n=16)", {}),
                    ("batch 64", dict(batch_size=64)),
                    ("FedAvg 8 local steps", dict(local_batch_size=2, learning_rate=0.5)),
                    ("clip", dict(clip_norm=1e-3)),
                    ("clip + noise z=0.01", dict(clip_norm=1e-3, noise_multiplier=0.01)),
                    ("secure aggregation 4 x 16", dict(clients_per_aggregate=4))]
    if small:
        imprint_grid = [imprint_grid[i] for i in (0, 4, 5)]
    for label, kwargs in imprint_grid:
        record(label, lab.run_imprint, **{**imp, **kwargs})
    trials = 1 if small else 2
    record("float64 model (reference)", lab.run_malicious_client, seed=seed, trials=trials)
    if not small:
        record("float32 model", lab.run_malicious_client, seed=seed, trials=1,
               precision="float32")
        # The boosted update's norm is ~1e9: a bound or clip far above honest norms stops it.
        record("norm bound 100", lab.run_malicious_client, seed=seed, trials=1,
               norm_bound=100.0)
        record("clip 1000", lab.run_malicious_client, seed=seed, trials=1, clip_norm=1e3)
    return rows, images


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_table(rows: list[dict[str, Any]], output: str) -> dict[str, str]:
    """Writes ``sweep.csv`` and ``sweep.json`` into ``output``; returns their paths."""
    os.makedirs(output, exist_ok=True)
    csv_path, json_path = os.path.join(output, "sweep.csv"), os.path.join(output, "sweep.json")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _clean(row.get(k)) for k in COLUMNS})
    with open(json_path, "w") as f:
        json.dump([{k: _clean(v) for k, v in row.items()} for row in rows], f, indent=2)
    return {"csv": csv_path, "json": json_path}


def plot_sweep(rows: list[dict[str, Any]]):
    """A two-panel figure: PSNR of the inversion attacks, exact recovery of the imprints."""
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    for attack, color in (("ig", "tab:blue"), ("closed_form", "tab:orange")):
        sel = [r for r in rows if r["attack"] == attack]
        ys = [r["psnr"] if r["psnr"] is not None else float("nan") for r in sel]
        left.plot(range(len(sel)), ys, "o-", color=color,
                  label={"ig": "Inverting Gradients", "closed_form": "closed form"}[attack])
        left.set_xticks(range(len(sel)), [r["setting"] for r in sel], rotation=35,
                        ha="right", fontsize=7)
    left.set_ylabel("PSNR (dB), matched")
    left.set_title("honest server")
    left.legend(fontsize=8)
    sel = [r for r in rows if r["attack"] in ("imprint", "malicious_client")]
    xs = range(len(sel))
    right.bar(xs, [r["exact_fraction"] for r in sel], color="tab:red", alpha=0.7,
              label="measured")
    right.plot(xs, [r["predicted_rate"] for r in sel], "k_", markersize=18,
               label="(1 - 1/k)^(n-1)")
    right.set_xticks(list(xs), [f"{r['attack'].replace('_', ' ')}: {r['setting']}"
                                for r in sel], rotation=35, ha="right", fontsize=7)
    right.set_ylabel("exact-recovery fraction")
    right.set_ylim(0, 1.05)
    right.set_title("malicious server / malicious client")
    right.legend(fontsize=8)
    fig.tight_layout()
    return fig


__all__ = ["COLUMNS", "defence_sweep", "plot_sweep", "write_table"]
