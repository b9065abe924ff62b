"""The ``overview`` stage: predictions (and accuracy where labels exist) over every image, and
attention-map grids of every head for the first few images."""
from __future__ import annotations

import csv
import io

import torch

from vitcircuits.files import write_json, write_text
from vitcircuits.inputs import ImageSet, check_folder_classes, images_manifest
from vitcircuits.layout import LAYOUT
from vitcircuits.models.loading import LoadedModel
from vitcircuits.plotting.attention import default_queries, patch_attention, plot_head_grid
from vitcircuits.plotting.figures import denormalize
from vitcircuits.runs import Run


@torch.no_grad()
def run_overview(run: Run, loaded: LoadedModel, images: ImageSet, n_attention_images: int) -> None:
    """Predictions over all images, and attention-map grids of the first ``n_attention_images``."""
    model = loaded.model
    batches = images.batches()
    check_folder_classes(loaded, images)
    rows, to_draw = [], []
    for batch in batches:
        out = model(batch.images_BCHW)
        preds = out.argmax(-1).tolist() if model.cfg.n_classes else [None] * len(batch.indices)
        labels = batch.labels_B.tolist() if batch.labels_B is not None else [-1] * len(batch.indices)
        rows += [(i, p, label, pred) for i, p, label, pred in zip(batch.indices, batch.paths, labels, preds)]
        room = n_attention_images - len(to_draw)
        to_draw += [(batch.indices[j], batch.paths[j], batch.images_BCHW[j : j + 1]) for j in range(min(room, len(batch.indices)))]
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
    images_section = images_manifest(batches)
    write_json(run.file(LAYOUT.overview_summary), {"accuracy": accuracy, "n_labelled": len(labelled), "figures": figures, "images": images_section})
    run.write_manifest(images=images_section)
