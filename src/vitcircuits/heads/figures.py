"""Head-atlas figures: the layers × heads kernel grid, mean distance vs layer, image overlays."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from vitcircuits.heads.atlas import HeadAtlas
from vitcircuits.heads.kinds import KINDS
from vitcircuits.plotting.figures import HEATMAP, error_bars, plt, save_figure

# Okabe–Ito palette: distinguishable with the common colour-vision deficiencies.
KIND_COLOURS = {
    "modular": "#D55E00",
    "directional": "#0072B2",
    "self": "#009E73",
    "cls/sink": "#CC79A7",
    "global": "#56B4E9",
    "mixed": "#999999",
}
KIND_ABBREV = {"modular": "MOD", "directional": "DIR", "self": "SELF", "cls/sink": "SINK", "global": "GLOB", "mixed": "MIX"}


def plot_atlas(atlas: HeadAtlas, path: str | Path, radius: int = 3) -> Path:
    """Each cell: a head's mean renormalised offset kernel within ``radius`` of the query (centre
    cell = the query itself), scaled to its own maximum; the frame colour and label give its kind."""
    window = atlas.window(radius)
    L, H = window.shape[:2]
    fig, axes = plt.subplots(L, H, figsize=(0.95 * H + 1.2, 0.95 * L + 1.0), squeeze=False)
    for layer in range(L):
        for head in range(H):
            ax = axes[layer, head]
            cell = window[layer, head]
            ax.imshow(cell / max(np.nanmax(cell), 1e-12), cmap=HEATMAP, vmin=0, vmax=1, interpolation="nearest")
            kind = atlas.row(layer, head).kind
            for spine in ax.spines.values():
                spine.set_edgecolor(KIND_COLOURS[kind])
                spine.set_linewidth(2.5)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.text(0.02, 0.98, KIND_ABBREV[kind], transform=ax.transAxes, fontsize=5.5, va="top", color="white",
                    bbox={"facecolor": KIND_COLOURS[kind], "pad": 0.6, "linewidth": 0})
            if layer == 0:
                ax.set_title(f"h{head}", fontsize=7)
            if head == 0:
                ax.set_ylabel(f"L{layer}", fontsize=7)
    handles = [plt.Rectangle((0, 0), 1, 1, color=KIND_COLOURS[k]) for k in KINDS]
    fig.legend(handles, KINDS, loc="lower center", ncol=len(KINDS), fontsize=7, frameon=False)
    fig.suptitle(f"Head atlas of {atlas.model_id}: offset kernels (±{radius} patches), n={atlas.rows[0].n_images} images", fontsize=9)
    fig.subplots_adjust(bottom=0.06)
    return save_figure(fig, path)


def plot_distance_vs_layer(atlas: HeadAtlas, path: str | Path) -> Path:
    """Mean attention distance (pixels) of every head by layer, coloured by kind, with the
    uniform, 8-neighbour and self baselines of this grid (as in the ViT paper's Fig. 7)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    rng = np.random.default_rng(0)
    for kind in KINDS:
        rows = [r for r in atlas.rows if r.kind == kind]
        if rows:
            x = np.array([r.layer for r in rows]) + rng.uniform(-0.15, 0.15, len(rows))
            ax.scatter(x, [r.mean_distance_px for r in rows], s=16, color=KIND_COLOURS[kind], label=kind, edgecolor="black", linewidth=0.3)
    styles = {"uniform": ("--", "uniform attention"), "neighbours": (":", "uniform over 8 neighbours"), "self": ("-.", "pure self")}
    for name, (style, label) in styles.items():
        ax.axhline(atlas.baselines[name].mean_distance_px, linestyle=style, color="black", linewidth=1, label=f"baseline: {label}")
    ax.set_xlabel("layer")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.set_xticks(range(atlas.n_layers))
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax.set_title("Mean attention distance by layer", fontsize=10)
    return save_figure(fig, path)


def plot_modular_scores(atlas: HeadAtlas, path: str | Path) -> Path:
    """modular_score with its 95 % interval for every head, by layer, with the grid's baselines
    (error bars clipped at 0: see :func:`error_bars`)."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for r in atlas.rows:
        x = r.layer + (r.head - (atlas.n_heads - 1) / 2) * 0.6 / max(atlas.n_heads, 1)
        ax.errorbar(x, r.modular_score, yerr=error_bars([r.modular_score], [r.modular_score_lo], [r.modular_score_hi]),
                    fmt="o", markersize=3, color=KIND_COLOURS[r.kind], ecolor="black", elinewidth=0.6)
    for name, style in (("uniform", "--"), ("neighbours", ":"), ("self", "-.")):
        ax.axhline(atlas.baselines[name].modular_score, linestyle=style, color="black", linewidth=1, label=f"baseline: {name}")
    ax.set_xlabel("layer")
    ax.set_ylabel("modular_score (95 % CI)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xticks(range(atlas.n_layers))
    ax.legend(fontsize=7, frameon=False)
    return save_figure(fig, path)


def plot_head_overlays(panels: list[tuple[np.ndarray, np.ndarray, str]], query: tuple[int, int], path: str | Path, title: str) -> Path:
    """Rows of (image, attention map over the patch grid, label): the image with the head's
    attention from ``query`` overlaid, next to the attention map alone."""
    fig, axes = plt.subplots(len(panels), 2, figsize=(4.4, 2.2 * len(panels) + 0.4), squeeze=False)
    for (image_HW3, map_YX, label), (ax_img, ax_map) in zip(panels, axes):
        rows, cols = map_YX.shape
        extent = (0, cols, rows, 0)
        ax_img.imshow(image_HW3, extent=extent)
        ax_img.imshow(map_YX / max(map_YX.max(), 1e-12), extent=extent, cmap=HEATMAP, alpha=0.6, vmin=0, vmax=1)
        ax_map.imshow(map_YX, extent=extent, cmap=HEATMAP, interpolation="nearest")
        for ax in (ax_img, ax_map):
            ax.add_patch(plt.Rectangle((query[1], query[0]), 1, 1, fill=False, edgecolor="#E69F00", linewidth=1.5))
            ax.set_xticks([])
            ax.set_yticks([])
        ax_img.set_ylabel(label, fontsize=7)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)
