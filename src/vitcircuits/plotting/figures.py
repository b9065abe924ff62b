"""Shared plotting helpers: a headless matplotlib, colour-blind-safe maps, atomic PNG writes."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from vitcircuits.files import write_with  # noqa: E402

HEATMAP = "viridis"


def save_figure(fig: plt.Figure, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` as PNG atomically and close it."""
    path = write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"))
    plt.close(fig)
    return path


def error_bars(values: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``[2, N]`` distances from each value down to ``lo`` and up to ``hi``, for matplotlib's
    ``yerr``/``xerr``: clipped at 0, so an interval that does not contain its value (or a value
    rounded just outside it) draws a one-sided bar instead of raising."""
    values = np.asarray(values, dtype=np.float64)
    return np.clip(np.stack([values - np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64) - values]), 0.0, None)


def denormalize(image_CHW: torch.Tensor, mean, std) -> np.ndarray:
    """A preprocessed image back to displayable ``[H, W, 3]`` floats in [0, 1]."""
    mean_C11 = torch.tensor(mean).view(3, 1, 1)
    std_C11 = torch.tensor(std).view(3, 1, 1)
    return (image_CHW.float().cpu() * std_C11 + mean_C11).clamp(0, 1).permute(1, 2, 0).numpy()
