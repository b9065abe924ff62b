"""Attention maps of every head for chosen query patches, overlaid on the image."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vitcircuits.models.hooked_vit import HookedViT
from vitcircuits.plotting.figures import HEATMAP, plt, save_figure


def default_queries(rows: int, cols: int) -> list[tuple[int, int]]:
    """Centre, top-left quadrant centre and a corner patch: a spread of query positions."""
    return [(rows // 2, cols // 2), (rows // 4, cols // 4), (0, cols - 1)]


@torch.no_grad()
def patch_attention(model: HookedViT, image_1CHW: torch.Tensor, query: tuple[int, int]) -> np.ndarray:
    """Attention from the query patch to every patch, ``[L, H, rows, cols]`` (prefix tokens dropped,
    not renormalised, so a head that attends to CLS looks dark)."""
    layout = model.layout
    q = layout.patch_index(*query)
    _, cache = model.run_with_cache(image_1CHW, names_filter=lambda n: n.endswith("hook_pattern"))
    pattern_LHK = cache.stack("blocks.{}.attn.hook_pattern", model.cfg.n_layers)[:, 0, :, q].float()
    return pattern_LHK[..., layout.patch_start :].reshape(model.cfg.n_layers, model.cfg.n_heads, layout.rows, layout.cols).cpu().numpy()


def plot_head_grid(image_HW3: np.ndarray, maps_LHYX: np.ndarray, query: tuple[int, int], path: str | Path, title: str) -> Path:
    """A layers × heads grid; each cell is the image with that head's attention from ``query``."""
    L, H, rows, cols = maps_LHYX.shape
    fig, axes = plt.subplots(L, H, figsize=(1.3 * H + 0.6, 1.3 * L + 0.6), squeeze=False)
    extent = (0, cols, rows, 0)
    for layer in range(L):
        for head in range(H):
            ax = axes[layer, head]
            ax.imshow(image_HW3, extent=extent)
            cell = maps_LHYX[layer, head]
            ax.imshow(cell / max(cell.max(), 1e-12), extent=extent, cmap=HEATMAP, alpha=0.65, vmin=0, vmax=1)
            ax.add_patch(plt.Rectangle((query[1], query[0]), 1, 1, fill=False, edgecolor="#ff7f0e", linewidth=1.5))
            ax.set_xticks([])
            ax.set_yticks([])
            if layer == 0:
                ax.set_title(f"head {head}", fontsize=8)
            if head == 0:
                ax.set_ylabel(f"layer {layer}", fontsize=8)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)
