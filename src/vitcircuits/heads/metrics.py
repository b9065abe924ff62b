"""Per-head metrics (the ``heads.csv`` columns) from a :class:`HeadStatsAccumulator`.

Definitions (patch queries only; "renormalised" rows have CLS/distillation/register attention
removed and are rescaled to sum to 1 over patches):
- ``neighbour_mass``: renormalised attention on keys within Chebyshev radius R (self excluded),
  averaged over queries and images; ``neighbour_mass_raw`` the same without renormalising;
  ``_interior``/``_border`` split queries by whether their whole neighbourhood is in the grid.
- ``self_mass``: renormalised attention on the query itself. ``cls_mass``, ``dist_mass``,
  ``register_mass``: raw attention on those tokens.
- ``mean_distance_patches``/``_px``: attention-weighted distance between patch centres.
- direction shares: the mean renormalised kernel summed over each of the 8 compass sectors of
  the radius-R window, divided by their total. ``direction_coverage`` counts sectors with a share
  ≥ ``coverage_share``; ``direction_entropy`` is the shares' entropy / log 8.
- ``peak_dy, peak_dx, peak_mass``: the largest entry of the mean renormalised kernel.
- ``content_dependence``: Σ Var_images(a_qk) / Σ E_images(a_qk²) over (query, key) patch pairs;
  0 when every image gets the same pattern (attention by position alone).
- ``modular_score`` = neighbour_mass × direction_entropy, in [0, 1]: 1 for a head that attends
  evenly to all 8 neighbours, 0 for self, shift or sink heads.
Intervals (``*_lo``, ``*_hi``) are 95 % percentile intervals of a Poisson bootstrap over images,
widened to contain the point estimate (with one image or a few replicates the replicates can all
fall on one side of it; with no replicate of positive weight the interval is the estimate itself).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from vitcircuits.heads.offsets import BOOT_METRICS, N_DIRECTIONS, HeadStatsAccumulator, direction_matrix
from vitcircuits.models.config import TokenLayout

COVERAGE_SHARE = 1.0 / 16
CI_METRICS = ("neighbour_mass", "self_mass", "prefix_mass", "mean_distance_patches", "modular_score")


@dataclass
class HeadRow:
    """One head's metrics (:func:`head_metrics`), then its kind and positional comparison
    (:func:`~vitcircuits.heads.atlas.build_atlas`). ``heads.csv`` and ``atlas.json`` hold these
    fields; docs/heads.md defines each."""

    layer: int
    head: int
    modular_score: float
    neighbour_mass: float
    neighbour_mass_raw: float
    neighbour_mass_interior: float | None
    """None on a grid without an interior query."""
    neighbour_mass_border: float | None
    """None on a grid without a border query."""
    self_mass: float
    cls_mass: float
    dist_mass: float
    register_mass: float
    mean_distance_patches: float
    mean_distance_px: float
    direction_coverage: int
    direction_entropy: float
    top_direction_share: float
    peak_dy: int
    peak_dx: int
    peak_mass: float
    content_dependence: float
    n_images: int
    neighbour_mass_lo: float
    neighbour_mass_hi: float
    self_mass_lo: float
    self_mass_hi: float
    prefix_mass_lo: float
    prefix_mass_hi: float
    mean_distance_patches_lo: float
    mean_distance_patches_hi: float
    modular_score_lo: float
    modular_score_hi: float
    kind: str | None = None
    """Set by the atlas (:func:`~vitcircuits.heads.kinds.classify`)."""
    positional_agreement: float | None = None
    positional_modular_score: float | None = None
    positional_kind: str | None = None

    def as_dict(self, positional: bool = True) -> dict:
        """The row as written to ``atlas.json`` (without the positional comparison for a baseline head)."""
        out = asdict(self)
        if not positional:
            for name in ("positional_agreement", "positional_modular_score", "positional_kind"):
                out.pop(name)
        return out


def direction_entropy(shares: np.ndarray) -> np.ndarray:
    """Normalised entropy (0–1) of direction shares along the last axis."""
    p = np.clip(shares, 1e-12, 1.0)
    return np.where(shares.sum(-1) > 0, -(shares * np.log(p)).sum(-1) / math.log(N_DIRECTIONS), 0.0)


def direction_shares(direction_mass: np.ndarray) -> np.ndarray:
    total = direction_mass.sum(-1, keepdims=True)
    return np.divide(direction_mass, total, out=np.zeros_like(direction_mass), where=total > 0)


def mean_kernels(acc: HeadStatsAccumulator, raw: bool = False) -> np.ndarray:
    """Mean attention a patch query gives to the patch at each offset, ``[L, H, 2R-1, 2C-1]``
    (NaN where no query has a key at that offset)."""
    sums = (acc.raw_kernel_sum_LHO if raw else acc.kernel_sum_LHO).numpy()
    counts = acc.offset_count_O.numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        kernel = np.where(counts > 0, sums / counts, np.nan)
    return kernel.reshape(acc.n_layers, acc.n_heads, *acc.geometry.kernel_shape)


def head_metrics(acc: HeadStatsAccumulator, coverage_share: float = COVERAGE_SHARE) -> list[HeadRow]:
    """One dict per head with the point estimates and bootstrap intervals."""
    if acc.n_images == 0:
        raise ValueError("no images were accumulated")
    n = acc.n_images
    L, H = acc.n_layers, acc.n_heads
    kernel = mean_kernels(acc)
    kernel_flat = np.nan_to_num(kernel.reshape(L, H, -1))
    D = direction_matrix(acc.geometry).numpy()
    shares = direction_shares(kernel_flat @ D)
    entropy = direction_entropy(shares)
    neighbour_LHP = acc.neighbour_sum_LHP.numpy() / n
    raw_neighbour_LHP = acc.raw_neighbour_sum_LHP.numpy() / n
    interior = acc.geometry.interior_P().numpy()
    prefix = acc.prefix_sum_LH3.numpy() / n
    mean_sq = acc.pattern_sq_sum_LHPP.numpy() / n
    mean = acc.pattern_sum_LHPP.numpy() / n
    content = (mean_sq - mean**2).clip(min=0).sum((-1, -2)) / np.maximum(mean_sq.sum((-1, -2)), 1e-30)
    estimates = {
        "neighbour_mass": neighbour_LHP.mean(-1),
        "self_mass": acc.self_sum_LH.numpy() / n,
        "prefix_mass": prefix.sum(-1),
        "mean_distance_patches": acc.distance_sum_LH.numpy() / n,
        "modular_score": neighbour_LHP.mean(-1) * entropy,
    }
    intervals = bootstrap_intervals(acc, estimates)
    rows_k, cols_k = acc.geometry.kernel_shape
    out = []
    for layer in range(L):
        for head in range(H):
            peak = int(np.argmax(kernel_flat[layer, head]))
            row = dict(
                layer=layer,
                head=head,
                modular_score=float(estimates["modular_score"][layer, head]),
                neighbour_mass=float(estimates["neighbour_mass"][layer, head]),
                neighbour_mass_raw=float(raw_neighbour_LHP[layer, head].mean()),
                neighbour_mass_interior=float(neighbour_LHP[layer, head][interior].mean()) if interior.any() else None,
                neighbour_mass_border=float(neighbour_LHP[layer, head][~interior].mean()) if (~interior).any() else None,
                self_mass=float(estimates["self_mass"][layer, head]),
                cls_mass=float(prefix[layer, head, 0]),
                dist_mass=float(prefix[layer, head, 1]),
                register_mass=float(prefix[layer, head, 2]),
                mean_distance_patches=float(estimates["mean_distance_patches"][layer, head]),
                mean_distance_px=float(acc.distance_px_sum_LH[layer, head] / n),
                direction_coverage=int((shares[layer, head] >= coverage_share).sum()),
                direction_entropy=float(entropy[layer, head]),
                top_direction_share=float(shares[layer, head].max()),
                peak_dy=peak // cols_k - (acc.layout.rows - 1),
                peak_dx=peak % cols_k - (acc.layout.cols - 1),
                peak_mass=float(kernel_flat[layer, head, peak]),
                content_dependence=float(content[layer, head]),
                n_images=n,
            )
            for name in CI_METRICS:
                row[f"{name}_lo"], row[f"{name}_hi"] = (float(v) for v in intervals[name][:, layer, head])
            out.append(HeadRow(**row))
    return out


def bootstrap_intervals(acc: HeadStatsAccumulator, estimates: dict[str, np.ndarray], level: float = 0.95) -> dict[str, np.ndarray]:
    """``name -> [2, L, H]`` percentile intervals over the Poisson-bootstrap replicates of each
    ``[L, H]`` point estimate in ``estimates``, widened to contain it."""
    weights = acc.boot_weight_Z.numpy()
    keep = weights > 0
    if not keep.any():
        return {name: np.stack([est, est]) for name, est in estimates.items()}
    reps_ZLHM = acc.boot_sum_ZLHM.numpy()[keep] / weights[keep, None, None, None]
    values = {name: reps_ZLHM[..., m] for m, name in enumerate(BOOT_METRICS)}
    shares = direction_shares(reps_ZLHM[..., len(BOOT_METRICS):])
    values["modular_score"] = values["neighbour_mass"] * direction_entropy(shares)
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    out = {}
    for name, est in estimates.items():
        lo, hi = np.percentile(values[name], q, axis=0)
        out[name] = np.stack([np.minimum(lo, est), np.maximum(hi, est)])
    return out


def baseline_rows(layout: TokenLayout, radius: int, patch_hw: tuple[int, int]) -> dict[str, HeadRow]:
    """Metrics of three reference heads on this grid: uniform attention over all tokens, uniform
    over the 8 (radius-R) neighbours, and pure self-attention."""
    P, start, N = layout.n_patches, layout.patch_start, layout.n_tokens
    acc = HeadStatsAccumulator(layout, 1, 3, radius, patch_hw, n_boot=2)
    pattern = torch.zeros(1, 3, N, N, dtype=torch.float64)
    pattern[0, 0] = 1.0 / N
    neighbours = acc.geometry.neighbour_mask_PP().double()
    pattern[0, 1, start:, start:] = neighbours / neighbours.sum(-1, keepdim=True)
    pattern[0, 1, :start] = 1.0 / N
    pattern[0, 2, start:, start:] = torch.eye(P, dtype=torch.float64)
    pattern[0, 2, :start] = 1.0 / N
    acc.update(0, pattern, [0])
    rows = head_metrics(acc)
    return dict(zip(("uniform", "neighbours", "self"), rows))
