"""The ``overview`` stage: predictions (and accuracy where labels exist) over every image, and
attention-map grids of every head for the first few images."""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field

import torch

from vitcircuits.engine import ImagePass
from vitcircuits.files import write_json, write_text
from vitcircuits.inputs import ImageSet, check_folder_classes, images_manifest
from vitcircuits.layout import LAYOUT
from vitcircuits.models.hooked_vit import HookedViT
from vitcircuits.models.loading import LoadedModel
from vitcircuits.plotting.attention import default_queries, patch_attention, plot_head_grid
from vitcircuits.plotting.figures import denormalize
from vitcircuits.runs import Run


@dataclass
class Predicted:
    """A partial overview: ``(index, id, label, prediction)`` rows and the first images to draw."""

    rows: list[tuple] = field(default_factory=list)
    to_draw: list[tuple[int, str, torch.Tensor]] = field(default_factory=list)


@dataclass(frozen=True)
class PredictionPass(ImagePass[Predicted]):
    """Predictions over images (an :class:`~vitcircuits.engine.ImagePass`), keeping the first ``n_draw`` images."""

    n_draw: int

    def start(self, model: HookedViT) -> Predicted:
        return Predicted()

    @torch.no_grad()
    def step(self, model: HookedViT, part: Predicted, batch) -> Predicted:
        out = model(batch.images_BCHW)
        preds = out.argmax(-1).tolist() if model.cfg.n_classes else [None] * len(batch.indices)
        labels = batch.labels_B.tolist() if batch.labels_B is not None else [-1] * len(batch.indices)
        part.rows += [(i, p, label, pred) for i, p, label, pred in zip(batch.indices, batch.paths, labels, preds)]
        room = self.n_draw - len(part.to_draw)
        part.to_draw += [(batch.indices[j], batch.paths[j], batch.images_BCHW[j : j + 1]) for j in range(min(room, len(batch.indices)))]
        return part

    def merge(self, first: Predicted, later: Predicted) -> Predicted:
        return Predicted(first.rows + later.rows, (first.to_draw + later.to_draw)[: self.n_draw])


def run_overview(run: Run, loaded: LoadedModel, images: ImageSet, n_attention_images: int) -> None:
    """Predictions over all images, and attention-map grids of the first ``n_attention_images``."""
    model = loaded.model
    check_folder_classes(loaded, images)
    streamed = images.map(loaded, PredictionPass(n_attention_images))
    rows, to_draw = streamed.result.rows, streamed.result.to_draw
    pre = images.preprocess
    figures = []
    for index, image_id, image_1CHW in to_draw:
        image_HW3 = denormalize(image_1CHW[0], pre.mean, pre.std)
        for query in default_queries(model.layout.rows, model.layout.cols):
            maps = patch_attention(model, image_1CHW, query)
            name = f"{LAYOUT.overview}/attention_img{index}_q{query[0]}-{query[1]}.png"
            caption = f"{image_id}: attention from query patch (row {query[0]}, col {query[1]}), every layer and head"
            plot_head_grid(image_HW3, maps, query, run.file(name), caption)
            figures.append((name, caption))
    labelled = [r for r in rows if r[2] >= 0 and r[3] is not None]
    accuracy = sum(r[2] == r[3] for r in labelled) / len(labelled) if labelled else None
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["image_index", "image", "label", "prediction"])
    writer.writerows(rows)
    write_text(run.file(LAYOUT.predictions), buf.getvalue())
    images_section = images_manifest(streamed.summary)
    write_json(run.file(LAYOUT.overview_summary), {"accuracy": accuracy, "n_labelled": len(labelled), "figures": figures, "images": images_section})
    run.write_manifest(images=images_section)
