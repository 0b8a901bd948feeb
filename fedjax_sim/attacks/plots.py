"""Image grids of originals vs reconstructions (matplotlib; host side)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def _as_images(x: Any) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    return np.clip(np.nan_to_num(x, nan=0.0), 0.0, 1.0)


def reconstruction_grid(rows: Sequence[tuple[str, Any, Any]], *, max_columns: int = 8,
                        title: str | None = None):
    """A figure with, per setting, a row of originals above a row of reconstructions.

    Args:
      rows: ``(label, originals [N, H, W(, 1)], reconstructions [N, H, W(, 1)])`` per
        setting (matched pairs, e.g. from :func:`fedjax_sim.attacks.lab.matched_pairs`).
      max_columns: at most this many pairs per setting.
      title: figure title.

    Returns:
      The matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    ncols = max(1, min(max_columns, max((len(o) for _, o, _ in rows), default=1)))
    fig, axes = plt.subplots(2 * len(rows), ncols, figsize=(1.1 * ncols + 1.0,
                                                           1.2 * 2 * len(rows) + 0.5),
                             squeeze=False)
    for r, (label, originals, recons) in enumerate(rows):
        originals, recons = _as_images(originals), _as_images(recons)
        for c in range(ncols):
            for k, images in enumerate((originals, recons)):
                ax = axes[2 * r + k, c]
                ax.set_xticks([])
                ax.set_yticks([])
                if c < len(images):
                    ax.imshow(images[c], cmap="gray", vmin=0.0, vmax=1.0)
                else:
                    ax.axis("off")
        axes[2 * r, 0].set_title(label, loc="left", fontsize=8)
        axes[2 * r, 0].set_ylabel("original", fontsize=7)
        axes[2 * r + 1, 0].set_ylabel("recon.", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def save_reconstruction_grid(path: str, rows: Sequence[tuple[str, Any, Any]], **kwargs) -> str:
    """Writes :func:`reconstruction_grid` to ``path`` (PNG) and returns the path."""
    import matplotlib.pyplot as plt

    fig = reconstruction_grid(rows, **kwargs)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["reconstruction_grid", "save_reconstruction_grid"]
