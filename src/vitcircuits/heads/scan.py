"""The ``heads`` stage: scan images, write heads.csv, kernels.npz, atlas.json and the figures."""
from __future__ import annotations

import torch
from rich.console import Console

from vitcircuits.data.loader import ImageBatches
from vitcircuits.heads.atlas import AtlasConfig, HeadAtlas, accumulate, build_atlas, new_accumulator
from vitcircuits.heads.figures import plot_atlas, plot_distance_vs_layer, plot_head_overlays, plot_modular_scores
from vitcircuits.inputs import preprocess_config
from vitcircuits.models.loading import LoadedModel
from vitcircuits.report.attention_maps import patch_attention
from vitcircuits.report.figures import denormalize
from vitcircuits.runs import Run

N_OVERLAY_HEADS = 4
N_OVERLAY_IMAGES = 3


def scan_heads(loaded: LoadedModel, batches: ImageBatches, config: AtlasConfig) -> tuple[HeadAtlas, list[tuple[int, str, torch.Tensor]]]:
    """Accumulate over all batches; also keep a few images (index, id, tensor) for overlays."""
    acc = new_accumulator(loaded.model, config)
    kept: list[tuple[int, str, torch.Tensor]] = []
    for batch in batches:
        accumulate(loaded.model, acc, batch.images_BCHW, list(batch.indices))
        room = N_OVERLAY_IMAGES - len(kept)
        kept += [(batch.indices[j], batch.paths[j], batch.images_BCHW[j : j + 1]) for j in range(min(room, len(batch.indices)))]
    return build_atlas(loaded.model, acc, config, loaded.model_id), kept


def overlay_heads(atlas: HeadAtlas) -> list[tuple[int, int]]:
    """The heads shown on real images: the most modular ones (by modular_score)."""
    ranked = sorted(atlas.rows, key=lambda r: -r["modular_score"])
    return [(r["layer"], r["head"]) for r in ranked[:N_OVERLAY_HEADS]]


def write_heads_outputs(run: Run, loaded: LoadedModel, atlas: HeadAtlas, kept, subdir: str = "heads") -> list[tuple[str, str]]:
    """Save the atlas and its figures in ``subdir`` of the run; return (path relative to the run, caption) of each figure."""
    folder = run.file(subdir) if subdir else run.path
    atlas.save(folder)
    figures = [
        (plot_atlas(atlas, folder / "atlas.png"), "Head atlas: mean offset kernel of every head around its query (centre), framed by kind."),
        (plot_modular_scores(atlas, folder / "modular_scores.png"), "modular_score with 95 % bootstrap intervals and this grid's baselines."),
        (plot_distance_vs_layer(atlas, folder / "distance_vs_layer.png"), "Mean attention distance per head and layer, with baselines."),
    ]
    preprocess = preprocess_config(loaded)
    layout = loaded.model.layout
    query = (layout.rows // 2, layout.cols // 2)
    maps = {index: patch_attention(loaded.model, image, query) for index, _, image in kept}
    for layer, head in overlay_heads(atlas):
        row = atlas.row(layer, head)
        panels = [(denormalize(image[0], preprocess.mean, preprocess.std), maps[index][layer, head], image_id) for index, image_id, image in kept]
        name = f"overlay_L{layer}H{head}.png"
        caption = f"Layer {layer} head {head} ({row['kind']}, modular_score {row['modular_score']:.2f}): attention from the centre patch"
        figures.append((plot_head_overlays(panels, query, folder / name, caption), caption))
    return [(str(path.relative_to(run.path)), caption) for path, caption in figures]


def summarize(atlas: HeadAtlas) -> str:
    counts = {}
    for r in atlas.rows:
        counts[r["kind"]] = counts.get(r["kind"], 0) + 1
    modular = ", ".join(f"L{layer}H{head}" for layer, head in atlas.heads_of_kind("modular")) or "none"
    return f"kinds: {counts}; modular heads: {modular}"


def print_summary(atlas: HeadAtlas) -> None:
    Console(stderr=True).print(summarize(atlas))
