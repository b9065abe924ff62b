"""The ``heads`` stage: the head atlas over every image (:func:`~vitcircuits.heads.scan.scan_heads`),
saved with its figures and overlays of the most modular heads on images."""
from __future__ import annotations

from vitcircuits.files import write_json
from vitcircuits.heads.atlas import AtlasConfig, HeadAtlas, build_atlas
from vitcircuits.heads.figures import plot_atlas, plot_distance_vs_layer, plot_head_overlays, plot_modular_scores
from vitcircuits.heads.scan import AtlasPass, overlay_heads, summarize
from vitcircuits.inputs import ImageSet, images_manifest
from vitcircuits.layout import LAYOUT
from vitcircuits.models.loading import LoadedModel
from vitcircuits.plotting.attention import patch_attention
from vitcircuits.plotting.figures import denormalize
from vitcircuits.runs import Run


def run_heads(run: Run, loaded: LoadedModel, images: ImageSet, config: AtlasConfig) -> HeadAtlas:
    """The head atlas over all images, saved with its figures in the run's heads folder."""
    streamed = images.map(loaded, AtlasPass(config))
    atlas = build_atlas(loaded.model, streamed.result.acc, config, loaded.model_id)
    write_json(run.file(LAYOUT.heads_figures), write_heads_outputs(run, loaded, images, atlas, streamed.result.kept))
    run.write_manifest(images=images_manifest(streamed.summary), heads={"summary": summarize(atlas)})
    return atlas


def write_heads_outputs(run: Run, loaded: LoadedModel, images: ImageSet, atlas: HeadAtlas, kept) -> list[tuple[str, str]]:
    """Save the atlas and its figures; return (path relative to the run, caption) of each figure."""
    folder = run.file(LAYOUT.heads)
    atlas.save(folder)
    figures = [
        (plot_atlas(atlas, folder / "atlas.png"), "Head atlas: mean offset kernel of every head around its query (centre), framed by kind."),
        (plot_modular_scores(atlas, folder / "modular_scores.png"), "modular_score with 95 % bootstrap intervals and this grid's baselines."),
        (plot_distance_vs_layer(atlas, folder / "distance_vs_layer.png"), "Mean attention distance per head and layer, with baselines."),
    ]
    preprocess = images.preprocess
    layout = loaded.model.layout
    query = (layout.rows // 2, layout.cols // 2)
    maps = {index: patch_attention(loaded.model, image, query) for index, _, image in kept}
    for layer, head in overlay_heads(atlas):
        row = atlas.row(layer, head)
        panels = [(denormalize(image[0], preprocess.mean, preprocess.std), maps[index][layer, head], image_id) for index, image_id, image in kept]
        name = f"overlay_L{layer}H{head}.png"
        caption = f"Layer {layer} head {head} ({row.kind}, modular_score {row.modular_score:.2f}): attention from the centre patch"
        figures.append((plot_head_overlays(panels, query, folder / name, caption), caption))
    return [(str(path.relative_to(run.path)), caption) for path, caption in figures]
