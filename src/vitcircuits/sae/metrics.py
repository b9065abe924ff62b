"""SAE quality metrics: L0, explained variance, latent densities (dead / dense fractions, histograms)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from vitcircuits.sae.model import SAE

DENSE_DENSITY = 0.1
"""A latent is *dense* when it fires on more than this fraction of tokens."""


def l0(feats_BF: torch.Tensor) -> float:
    """Mean number of non-zero latents per row."""
    return float((feats_BF != 0).sum(-1).float().mean())


def explained_variance(x_BD: torch.Tensor, recon_BD: torch.Tensor) -> float:
    """``1 - ||x - recon||^2 / ||x - mean(x)||^2`` summed over the rows of one batch."""
    x = x_BD.double()
    residual = (x - recon_BD.double()).pow(2).sum()
    total = (x - x.mean(0)).pow(2).sum()
    return float(1.0 - residual / total.clamp_min(1e-30))


@dataclass
class DensityHistogram:
    """Histogram of ``log10`` latent firing densities (dead latents are counted apart).

    Attributes:
        counts: number of live latents in each bin.
        edges: ``len(counts) + 1`` bin edges in ``log10(density)``.
        n_dead: latents that never fired (density 0, no finite logarithm).
    """

    counts: np.ndarray
    edges: np.ndarray
    n_dead: int


def density_histogram(density_F: torch.Tensor, bins: int = 50, low: float = -8.0) -> DensityHistogram:
    """Bin ``log10(density)`` of the live latents into ``bins`` equal bins over ``[low, 0]``."""
    density = density_F.double().cpu().numpy()
    live = density[density > 0]
    counts, edges = np.histogram(np.log10(np.clip(live, 10.0**low, 1.0)), bins=bins, range=(low, 0.0))
    return DensityHistogram(counts=counts, edges=edges, n_dead=int((density == 0).sum()))


@dataclass
class SAEEvaluation:
    """Metrics of an SAE over an evaluation set.

    Attributes:
        n_tokens: rows evaluated.
        l0: mean number of active latents per row.
        explained_variance: ``1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` over the whole set.
        dead_fraction: fraction of latents that never fired.
        dense_fraction: fraction of latents firing on more than :data:`DENSE_DENSITY` of rows.
        density_F: per-latent firing frequency.
        histogram: ``log10`` density histogram.
    """

    n_tokens: int
    l0: float
    explained_variance: float
    dead_fraction: float
    dense_fraction: float
    density_F: torch.Tensor = field(repr=False)
    histogram: DensityHistogram = field(repr=False)


@torch.no_grad()
def evaluate_sae(sae: SAE, activations: torch.Tensor | Iterable[torch.Tensor], batch_size: int = 4096) -> SAEEvaluation:
    """Evaluate ``sae`` (in eval mode) on raw activations: a ``[N, D]`` tensor or batches of rows."""
    batches = activations.split(batch_size) if isinstance(activations, torch.Tensor) else activations
    was_training = sae.training
    sae.eval()
    fires_F = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    n, active, sq_err, sum_x_D, sq_x = 0, 0.0, 0.0, torch.zeros(sae.cfg.d_in, dtype=torch.float64), 0.0
    for x_BD in batches:
        x_BD = x_BD.reshape(-1, sae.cfg.d_in).to(sae.W_enc.dtype)
        recon_BD, feats_BF = sae(x_BD)
        fired_BF = feats_BF != 0
        fires_F += fired_BF.sum(0).double().cpu()
        active += float(fired_BF.sum())
        xd = x_BD.double()
        sq_err += float((xd - recon_BD.double()).pow(2).sum())
        sum_x_D += xd.sum(0).cpu()
        sq_x += float(xd.pow(2).sum())
        n += x_BD.shape[0]
    sae.train(was_training)
    if n == 0:
        raise ValueError("evaluate_sae needs at least one activation row")
    total_var = sq_x - float(sum_x_D.pow(2).sum()) / n
    density_F = fires_F / n
    return SAEEvaluation(
        n_tokens=n,
        l0=active / n,
        explained_variance=1.0 - sq_err / max(total_var, 1e-30),
        dead_fraction=float((density_F == 0).double().mean()),
        dense_fraction=float((density_F > DENSE_DENSITY).double().mean()),
        density_F=density_F,
        histogram=density_histogram(density_F),
    )
