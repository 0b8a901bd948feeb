"""Reconstruction metrics: closed forms, a plain SSIM reference, matching invariances."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedjax_sim._validation import ConfigError
from fedjax_sim.attacks import metrics as M


def _images(n, seed=0, shape=(8, 8, 1)):
    return np.random.default_rng(seed).uniform(size=(n,) + shape)


def test_mse_and_psnr_closed_form():
    x = _images(3)
    for delta in (0.1, 0.01):
        y = x + delta
        np.testing.assert_allclose(M.mse(x, y), delta ** 2, rtol=1e-9)
        np.testing.assert_allclose(M.psnr(x, y), -20 * np.log10(delta), rtol=1e-9)
    assert np.all(M.psnr(x, x) == 100.0)  # capped


def _ssim_reference(a, b, size, sigma=1.5):
    """Textbook SSIM: explicit loop over valid windows, one 2-D image."""
    ax = np.arange(size) - (size - 1) / 2
    g = np.exp(-0.5 * (ax / sigma) ** 2)
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    vals = []
    for i in range(a.shape[0] - size + 1):
        for j in range(a.shape[1] - size + 1):
            pa, pb = a[i:i + size, j:j + size], b[i:i + size, j:j + size]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
            cov = (w * (pa - ma) * (pb - mb)).sum()
            vals.append((2 * ma * mb + c1) * (2 * cov + c2) /
                        ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return np.mean(vals)


def test_ssim_matches_windowed_reference_and_bounds():
    rng = np.random.default_rng(1)
    a = rng.uniform(size=(2, 12, 12))
    b = np.clip(a + 0.1 * rng.normal(size=a.shape), 0, 1)
    got = M.ssim(a, b)
    for i in range(2):
        assert got[i] == pytest.approx(_ssim_reference(a[i], b[i], 11), abs=1e-10)
    small = _images(2)  # 8x8 images use a 7x7 window
    noisy = np.clip(small + 0.2, 0, 1)
    assert M.ssim(small, noisy)[0] == pytest.approx(
        _ssim_reference(small[0, ..., 0], noisy[0, ..., 0], 7), abs=1e-10)
    np.testing.assert_allclose(M.ssim(small, small), 1.0)
    np.testing.assert_allclose(M.ssim(small, noisy), M.ssim(noisy, small))
    noise = np.random.default_rng(2).normal(size=small.shape)
    light, heavy = (np.clip(small + s * noise, 0, 1) for s in (0.05, 0.5))
    assert np.all(M.ssim(small, heavy) < M.ssim(small, light))
    assert np.all(M.ssim(small, light) < 1.0)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(st.permutations(list(range(6))))
def test_matching_undoes_any_permutation(perm):
    truth = _images(6, seed=3)
    recon = truth[list(perm)] + 1e-4
    ti, ri = M.match_reconstructions(recon, truth)
    assert np.all(np.asarray(perm)[ri] == ti)
    out = M.evaluate_reconstruction(recon, truth)
    assert out["exact_fraction"] == 1.0 and out["psnr"] == pytest.approx(80.0, abs=1e-6)


def test_nan_rows_are_never_matched_and_missing_truths_count_as_lost():
    truth = _images(4, seed=4)
    recon = np.concatenate([truth[:2], np.full((5,) + truth.shape[1:], np.nan)])
    ti, ri = M.match_reconstructions(recon, truth)
    assert sorted(ri.tolist()) == [0, 1] and sorted(ti.tolist()) == [0, 1]
    out = M.evaluate_reconstruction(recon, truth)
    assert out["exact_fraction"] == 0.5 and out["num_matched"] == 2


def test_label_accuracy_after_matching():
    truth = _images(3, seed=5)
    recon = truth[[2, 0, 1]]
    out = M.evaluate_reconstruction(recon, truth, recon_labels=np.array([7, 5, 6]),
                                    true_labels=np.array([5, 6, 9]))
    assert out["label_accuracy"] == pytest.approx(2 / 3)
    assert M.label_count_accuracy(np.array([1, 1, 2]), np.array([1, 2, 2])) == \
        pytest.approx(2 / 3)


def test_evaluate_victims_means_and_validation():
    truths = np.stack([_images(2, seed=s) for s in range(3)])
    out = M.evaluate_victims(truths + 0.01, truths)
    assert out["num_victims"] == 3 and out["psnr"] == pytest.approx(40.0)
    with pytest.raises(ConfigError, match="recon.shape"):
        M.match_reconstructions(np.zeros((2, 4)), np.zeros((2, 5)))
    with pytest.raises(ConfigError, match="tolerance"):
        M.evaluate_reconstruction(truths[0], truths[0], tolerance=0)
