"""Reconstruction quality: MSE, PSNR, SSIM, label accuracy and exact recovery, after matching.

An attack returns a set of reconstructions in no particular order, possibly more or fewer
than the victim's examples. Every metric here first *matches* reconstructions to ground
truth by an optimal one-to-one assignment on the pairwise MSE
(``scipy.optimize.linear_sum_assignment``; rectangular problems leave the surplus
unmatched), then scores the matched pairs. A ground-truth example left unmatched counts as
not recovered. These run on the host (NumPy), after the jitted attack.

Conventions: images lie in ``[0, 1]`` (data range 1); PSNR is per image,
``10 log10(1 / MSE)``, capped at 100 dB (MSE floored at 1e-10), then averaged;
SSIM is Wang et al. 2004 with a Gaussian window (sigma 1.5, 11x11 or the largest odd size
that fits a small image), ``K1 = 0.01``, ``K2 = 0.03``, computed on the valid region and
averaged over positions and channels.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedjax_sim._validation import check_float, fail

MSE_FLOOR = 1e-10


def pairwise_mse(recon: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """``[N, M]`` mean squared error between every truth ``[N, ...]`` and recon ``[M, ...]``."""
    t = np.asarray(truth, np.float64).reshape(len(truth), -1)
    r = np.asarray(recon, np.float64).reshape(len(recon), -1)
    sq = (t * t).sum(1)[:, None] + (r * r).sum(1)[None, :] - 2.0 * t @ r.T
    return np.maximum(sq, 0.0) / t.shape[1]


def match_reconstructions(recon: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Optimal one-to-one matching of reconstructions to ground truth by MSE.

    Args:
      recon: ``[M, ...]`` reconstructions; a row with any non-finite entry (e.g. an empty
        imprint bin) is no reconstruction and is never matched.
      truth: ``[N, ...]`` ground-truth examples of the same example shape.

    Returns:
      ``(truth_index, recon_index)``, each of length ``min(N, M_finite)``: the pairs that
      minimise the total MSE.
    """
    recon = np.asarray(recon)
    truth = np.asarray(truth)
    if recon.shape[1:] != truth.shape[1:]:
        fail("recon.shape", recon.shape, f"example shape must match truth {truth.shape[1:]}")
    usable = np.flatnonzero(np.all(np.isfinite(recon.reshape(len(recon), -1)), axis=1))
    if len(usable) == 0 or len(truth) == 0:
        return np.zeros((0,), int), np.zeros((0,), int)
    from scipy.optimize import linear_sum_assignment  # here: a slow import

    ti, ri = linear_sum_assignment(pairwise_mse(recon[usable], truth))
    return ti, usable[ri]


def mse(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-example mean squared error of ``[N, ...]`` arrays."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    return (d * d).reshape(len(d), -1).mean(1)


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Per-example PSNR in dB, ``10 log10(range^2 / MSE)``, capped at 100 dB."""
    return 10.0 * np.log10(data_range ** 2 / np.maximum(mse(a, b), MSE_FLOOR * data_range ** 2))


def _gaussian_window(size: int, sigma: float) -> np.ndarray:
    ax = np.arange(size) - (size - 1) / 2.0
    g = np.exp(-0.5 * (ax / sigma) ** 2)
    w = np.outer(g, g)
    return w / w.sum()


def _filter_valid(img: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Valid 2-D correlation of ``[N, H, W]`` images with a ``[s, s]`` window."""
    s = window.shape[0]
    views = np.lib.stride_tricks.sliding_window_view(img, (s, s), axis=(1, 2))
    return np.einsum("nhwij,ij->nhw", views, window)


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0, sigma: float = 1.5
         ) -> np.ndarray:
    """Per-example SSIM of images ``[N, H, W]`` or ``[N, H, W, C]`` (Wang et al. 2004).

    Args:
      a, b: image batches of equal shape, values in ``[0, data_range]``.
      data_range: the dynamic range L.
      sigma: the Gaussian window's standard deviation.

    Returns:
      ``[N]`` mean SSIM over the valid window positions and channels.
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        fail("b.shape", b.shape, f"must equal a.shape={a.shape}")
    if a.ndim == 3:
        a, b = a[..., None], b[..., None]
    if a.ndim != 4:
        fail("a.shape", a.shape, "SSIM needs images [N, H, W] or [N, H, W, C]")
    n, h, w, c = a.shape
    size = min(11, h, w)
    size -= (size + 1) % 2  # odd
    window = _gaussian_window(size, sigma)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    x = np.moveaxis(a, 3, 1).reshape(n * c, h, w)
    y = np.moveaxis(b, 3, 1).reshape(n * c, h, w)
    mx, my = _filter_valid(x, window), _filter_valid(y, window)
    sxx = _filter_valid(x * x, window) - mx * mx
    syy = _filter_valid(y * y, window) - my * my
    sxy = _filter_valid(x * y, window) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.reshape(n, c, -1).mean(axis=(1, 2))


def evaluate_reconstruction(recon: np.ndarray, truth: np.ndarray, *,
                            recon_labels: np.ndarray | None = None,
                            true_labels: np.ndarray | None = None,
                            tolerance: float = 1e-3) -> dict[str, Any]:
    """Matches reconstructions to the truth and scores the matched pairs of one victim.

    Args:
      recon: ``[M, ...]`` reconstructions.
      truth: ``[N, ...]`` the victim's real examples.
      recon_labels: ``[M]`` recovered labels of the reconstructions (optional).
      true_labels: ``[N]`` true labels (needed with ``recon_labels``).
      tolerance: a truth example counts as exactly recovered when its matched
        reconstruction is within this max absolute error.

    Returns:
      Means over the matched pairs: ``mse``, ``psnr``, ``ssim`` (SSIM only for image
      shapes); ``label_accuracy`` (matched pairs with equal labels, over N);
      ``exact_fraction`` (exactly recovered truths over N); ``num_truth``, ``num_matched``.
    """
    tolerance = check_float("tolerance", tolerance, min_value=0.0, min_exclusive=True)
    recon = np.asarray(recon, np.float64)
    truth = np.asarray(truth, np.float64)
    ti, ri = match_reconstructions(recon, truth)
    n = len(truth)
    out: dict[str, Any] = {"num_truth": n, "num_matched": int(len(ti))}
    if len(ti) == 0:
        out.update(mse=float("nan"), psnr=float("nan"), ssim=float("nan"), exact_fraction=0.0)
    else:
        r, t = recon[ri], truth[ti]
        out["mse"] = float(mse(r, t).mean())
        out["psnr"] = float(psnr(r, t).mean())
        out["ssim"] = float(ssim(r, t).mean()) if truth.ndim >= 3 and min(truth.shape[1:3]) >= 3 \
            else float("nan")
        err = np.abs(r - t).reshape(len(ti), -1).max(1)
        out["exact_fraction"] = float((err < tolerance).sum() / n)
    if recon_labels is not None:
        if true_labels is None:
            fail("true_labels", None, "needed to score recon_labels")
        rl, tl = np.asarray(recon_labels), np.asarray(true_labels)
        out["label_accuracy"] = float((rl[ri] == tl[ti]).sum() / n) if len(ti) else 0.0
    return out


def label_count_accuracy(predicted_labels: np.ndarray, true_labels: np.ndarray) -> float:
    """Fraction of the true label multiset recovered: ``sum_c min(n_hat_c, n_c) / N``."""
    p = np.asarray(predicted_labels).ravel()
    t = np.asarray(true_labels).ravel()
    classes = int(max(p.max(initial=0), t.max(initial=0))) + 1
    return float(np.minimum(np.bincount(p, minlength=classes),
                            np.bincount(t, minlength=classes)).sum() / max(len(t), 1))


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not np.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def evaluate_victims(recons: np.ndarray, truths: np.ndarray, *,
                     recon_labels: np.ndarray | None = None,
                     true_labels: np.ndarray | None = None,
                     tolerance: float = 1e-3) -> dict[str, Any]:
    """:func:`evaluate_reconstruction` for each victim, plus the means over victims.

    Args:
      recons: ``[V, M, ...]`` reconstructions per victim.
      truths: ``[V, N, ...]`` real examples per victim.
      recon_labels: ``[V, M]`` recovered labels (optional).
      true_labels: ``[V, N]`` true labels.
      tolerance: see :func:`evaluate_reconstruction`.

    Returns:
      ``{"per_victim": [...], "mse": ..., "psnr": ..., ...}`` (means over victims).
    """
    recons, truths = np.asarray(recons), np.asarray(truths)
    if len(recons) != len(truths):
        fail("recons", f"<{len(recons)} victims>", f"must match truths ({len(truths)})")
    per = [evaluate_reconstruction(
        recons[v], truths[v], tolerance=tolerance,
        recon_labels=None if recon_labels is None else np.asarray(recon_labels)[v],
        true_labels=None if true_labels is None else np.asarray(true_labels)[v])
        for v in range(len(truths))]
    keys = [k for k in per[0] if isinstance(per[0][k], float)] if per else []
    out: dict[str, Any] = {k: _nanmean([p[k] for p in per]) for k in keys}
    out["num_victims"] = len(per)
    out["per_victim"] = per
    return out


__all__ = ["evaluate_reconstruction", "evaluate_victims", "label_count_accuracy",
           "match_reconstructions", "mse", "pairwise_mse", "psnr", "ssim"]
