"""Figures of SAE features: top-example galleries, mean activation maps and circuit dependence.

All figures use colour-blind-safe maps (viridis for activations, cividis for the dependence
scatter) and are written atomically as PNG (:func:`vitcircuits.plotting.figures.save_figure`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from vitcircuits.models.hooked_vit import HookedViT
from vitcircuits.plotting.figures import HEATMAP, denormalize, plt, save_figure
from vitcircuits.sae.dependence import DependenceConfig
from vitcircuits.sae.features import FeatureStats
from vitcircuits.sae.model import SAE

FeatureMapFn = Callable[[torch.Tensor, list[int]], torch.Tensor]
"""``(images_BCHW, feature of each image) -> maps_BYX``: that feature's activation over the patch grid."""
SCATTER_MAP = "cividis"
CENTRE_EDGE = "#D55E00"  # Okabe–Ito vermillion, visible on every viridis colour


def sae_feature_maps(model: HookedViT, sae: SAE, hook_name: str) -> FeatureMapFn:
    """A :data:`FeatureMapFn` that runs ``model`` and encodes the patch tokens at ``hook_name`` with ``sae``."""
    layout = model.layout

    @torch.no_grad()
    def maps(images_BCHW: torch.Tensor, features: list[int]) -> torch.Tensor:
        _, cache = model.run_with_cache(images_BCHW.to(model.device, model.dtype), names_filter=[hook_name])
        acts = cache[hook_name][:, layout.patch_start :]
        B, P = acts.shape[:2]
        feats_BPF = sae.encode(acts.reshape(B * P, -1).to(sae.W_enc.device, sae.W_enc.dtype)).view(B, P, -1)
        maps_BP = feats_BPF[torch.arange(B), :, torch.tensor(features, device=feats_BPF.device)]
        return maps_BP.float().cpu().view(B, layout.rows, layout.cols)

    return maps


def _dependence_label(row: dict) -> str:
    fields = (("nbr", "neighbour_drop"), ("circ+", "circuit_excess"), ("ctr", "drop_centre"), ("score", "compositional_score"))
    parts = [f"{short} {row[key]:.2f}" for short, key in fields if row.get(key) is not None]
    return "\n".join("  ".join(parts[i : i + 2]) for i in range(0, len(parts), 2))


def plot_feature_gallery(load_images: Callable[[list[int]], torch.Tensor], stats: FeatureStats, features: Sequence[int], path: str | Path,
                         patch_size: tuple[int, int], feature_maps: FeatureMapFn, mean: Sequence[float], std: Sequence[float],
                         n_examples: int = 8, window: int = 2, dependence_rows: list[dict] | None = None) -> Path:
    """One row per feature, one column per top example: the preprocessed image (de-normalised with the
    per-channel ``mean``/``std``) cropped to ``±window`` patches around the example's patch (blank outside the image), overlaid with
    the feature's activation on those patches (scaled to the feature's top activation), the example's patch
    framed. Row labels give the feature id, its density and, with ``dependence_rows``, its dependence numbers."""
    R, C = stats.grid
    ph, pw = patch_size
    by_feature = {row["feature"]: row for row in dependence_rows or []}
    fig, axes = plt.subplots(len(features), n_examples, figsize=(1.25 * n_examples + 1.0, 1.45 * len(features) + 0.6), squeeze=False)
    overlay = None
    for ax_row, feature in zip(axes, features):
        examples = stats.examples(feature, n_examples)
        scale = max(float(stats.top_value_FT[feature, 0]), 1e-12)
        images_BCHW = load_images([i for i, _, _, _ in examples]) if examples else None
        maps_BYX = feature_maps(images_BCHW, [feature] * len(examples)) if examples else None
        for j, ax in enumerate(ax_row):
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(examples):
                ax.set_frame_on(False)
                continue
            image, r, c, value = examples[j]
            r0, r1, c0, c1 = max(r - window, 0), min(r + window + 1, R), max(c - window, 0), min(c + window + 1, C)
            extent = (c0, c1, r1, r0)
            crop_HW3 = denormalize(images_BCHW[j], mean, std)[r0 * ph : r1 * ph, c0 * pw : c1 * pw]
            ax.imshow(crop_HW3, extent=extent, interpolation="nearest")
            overlay = ax.imshow(maps_BYX[j, r0:r1, c0:c1].numpy() / scale, extent=extent, cmap=HEATMAP, alpha=0.5, vmin=0, vmax=1,
                                interpolation="nearest")
            ax.add_patch(plt.Rectangle((c, r), 1, 1, fill=False, edgecolor=CENTRE_EDGE, linewidth=1.5))
            ax.set_xlim(c - window, c + window + 1)  # the same window everywhere: the example's patch at the centre
            ax.set_ylim(r + window + 1, r - window)
            ax.set_title(f"img {image} ({r},{c}) {value:.2g}", fontsize=5.5)
        label = f"f{feature}\ndensity {float(stats.density_F[feature]):.2%}"
        if feature in by_feature:
            label += "\n" + _dependence_label(by_feature[feature])
        ax_row[0].set_ylabel(label, fontsize=6, rotation=0, ha="right", va="center")
    if overlay is not None:
        fig.colorbar(overlay, ax=axes, fraction=0.02, pad=0.01, label="activation / feature's top activation")
    fig.suptitle(f"Top-activating patches of {len(features)} SAE features (±{window} patches; framed: the example's patch)", fontsize=9)
    return save_figure(fig, path)


def plot_mean_maps(stats: FeatureStats, features: Sequence[int], path: str | Path, n_cols: int = 8) -> Path:
    """Small multiples: each feature's mean activation at every grid position, scaled to its own maximum
    (given in the panel title)."""
    n_rows = max(1, -(-len(features) // n_cols))
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.3 * n_cols + 0.8, 1.4 * n_rows + 0.6), squeeze=False)
    image = None
    for k, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if k >= len(features):
            ax.set_frame_on(False)
            continue
        map_YX = stats.mean_map_FYX[features[k]].numpy()
        peak = float(map_YX.max())
        image = ax.imshow(map_YX / max(peak, 1e-12), cmap=HEATMAP, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"f{features[k]} max {peak:.2g}", fontsize=6)
    if image is not None:
        fig.colorbar(image, ax=axes, fraction=0.02, pad=0.01, label="mean activation / panel max")
    fig.suptitle(f"Mean activation over grid positions ({stats.grid[0]}x{stats.grid[1]}, {stats.n_rows} patches)", fontsize=9)
    return save_figure(fig, path)


def plot_dependence(rows: list[dict], path: str | Path, config: DependenceConfig = DependenceConfig()) -> Path:
    """Neighbour drop (x) against circuit excess (y) of every measured feature, coloured by the centre-occlusion
    drop; dashed lines at the ``compositional`` thresholds of ``config``; compositional features labelled.
    Features measured without circuit heads sit at y = 0 as crosses."""
    measured = [r for r in rows if r.get("neighbour_drop") is not None]
    fig, ax = plt.subplots(figsize=(5.6, 4.4))
    scatter = None
    for tested, marker, label in ((True, "o", "circuit tested"), (False, "X", "circuit not tested")):
        group = [r for r in measured if r["circuit_tested"] == tested]
        if not group:
            continue
        x = np.array([r["neighbour_drop"] for r in group])
        y = np.array([r["circuit_excess"] if tested else 0.0 for r in group])
        scatter = ax.scatter(x, y, c=[r["drop_centre"] for r in group], cmap=SCATTER_MAP, vmin=0, vmax=1, marker=marker, s=28,
                             edgecolor="black", linewidth=0.4, label=label)
        for r, xi, yi in zip(group, x, y):
            if r["compositional"]:
                ax.annotate(f"f{r['feature']}", (xi, yi), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.axvline(config.min_neighbour_drop, linestyle="--", color="black", linewidth=0.8, label="compositional thresholds")
    ax.axhline(config.min_circuit_excess, linestyle="--", color="black", linewidth=0.8)
    if scatter is not None:
        fig.colorbar(scatter, ax=ax, label="drop when the centre patch is occluded")
    ax.set_xlabel("neighbour drop (max of occluded / shuffled)")
    ax.set_ylabel("circuit excess (circuit drop − random-head drop)")
    ax.legend(fontsize=7, frameon=False, loc="lower right")
    n_comp = sum(bool(r["compositional"]) for r in measured)
    ax.set_title(f"Circuit dependence of {len(measured)} features ({n_comp} compositional)", fontsize=10)
    return save_figure(fig, path)
