"""``vitcircuits hunt``: the end-to-end job. Stages so far: overview (model card, accuracy,
attention maps of every head) → report. Later stages (head atlas, composition, SAEs) slot in
between."""
from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass

import torch

from vitcircuits.inputs import ImageOptions, ModelOptions, images_manifest
from vitcircuits.models.loading import LoadedModel
from vitcircuits.report import html
from vitcircuits.report.attention_maps import default_queries, patch_attention, plot_head_grid
from vitcircuits.report.figures import denormalize
from vitcircuits.runs import Run, write_json, write_text


@dataclass(frozen=True)
class HuntConfig:
    """Options of the hunt that are not about the model or the images."""

    n_attention_images: int = 2
    """Images for which every head's attention map is drawn."""


@dataclass
class Overview:
    accuracy: float | None
    n_labelled: int
    figures: list[tuple[str, str]]


@torch.no_grad()
def run_overview(run: Run, loaded: LoadedModel, images: ImageOptions, config: HuntConfig) -> Overview:
    """Predictions (and accuracy where labels exist) over all images, and attention-map grids."""
    model = loaded.model
    batches = images.batches(loaded)
    rows, to_draw = [], []
    for batch in batches:
        out = model(batch.images_BCHW)
        preds = out.argmax(-1).tolist() if model.cfg.n_classes else [None] * len(batch.indices)
        labels = batch.labels_B.tolist() if batch.labels_B is not None else [-1] * len(batch.indices)
        rows += [(i, p, label, pred) for i, p, label, pred in zip(batch.indices, batch.paths, labels, preds)]
        room = config.n_attention_images - len(to_draw)
        to_draw += [(batch.indices[j], batch.paths[j], batch.images_BCHW[j : j + 1]) for j in range(min(room, len(batch.indices)))]
    pre = batches.loader.dataset.config
    out_dir = run.file("overview")
    figures = []
    for index, image_id, image_1CHW in to_draw:
        image_HW3 = denormalize(image_1CHW[0], pre.mean, pre.std)
        for query in default_queries(model.layout.rows, model.layout.cols):
            maps = patch_attention(model, image_1CHW, query)
            name = f"attention_img{index}_q{query[0]}-{query[1]}.png"
            caption = f"{image_id}: attention from query patch (row {query[0]}, col {query[1]}), every layer and head"
            plot_head_grid(image_HW3, maps, query, out_dir / name, caption)
            figures.append((f"overview/{name}", caption))
    labelled = [r for r in rows if r[2] >= 0 and r[3] is not None]
    accuracy = sum(r[2] == r[3] for r in labelled) / len(labelled) if labelled else None
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["image_index", "image", "label", "prediction"])
    writer.writerows(rows)
    write_text(out_dir / "predictions.csv", buf.getvalue())
    run.write_manifest(images=images_manifest(batches))
    return Overview(accuracy=accuracy, n_labelled=len(labelled), figures=figures)


def model_card(loaded: LoadedModel) -> list[tuple[str, str]]:
    cfg, layout = loaded.model.cfg, loaded.model.layout
    n_params = sum(p.numel() for p in loaded.model.parameters())
    return [
        ("model", loaded.model_id),
        ("family / architecture", f"{loaded.family} / {loaded.arch}"),
        ("weights sha256", loaded.weights_sha256 or "RANDOM WEIGHTS"),
        ("parameters", f"{n_params:,}"),
        ("layers × heads × head width", f"{cfg.n_layers} × {cfg.n_heads} × {cfg.d_head}"),
        ("residual width / MLP width", f"{cfg.d_model} / {cfg.d_mlp}"),
        ("input / patch", f"{cfg.img_size[0]}×{cfg.img_size[1]} px / {cfg.patch_size[0]}×{cfg.patch_size[1]} px"),
        ("token layout", f"CLS={layout.cls_index}, DIST={layout.dist_index}, registers={layout.n_registers}, "
                         f"patches {layout.rows}×{layout.cols} from token {layout.patch_start}"),
        ("pooling / final norm / head", f"{cfg.pooling} / {cfg.final_norm} / {cfg.n_classes or 'none'}"),
    ]


def write_report(run: Run, loaded: LoadedModel, images: ImageOptions, overview: Overview) -> str:
    """``report.html``: model and data card, accuracy, attention maps."""
    manifest = run.manifest.get("images", {})
    data_rows = [
        ("source", images.images),
        ("images used / skipped", f"{manifest.get('n_ok')} / {manifest.get('n_skipped')}"),
        ("image list sha256", manifest.get("image_list_sha256")),
    ]
    if overview.accuracy is not None:
        data_rows.append(("top-1 accuracy", f"{overview.accuracy:.3f} on {overview.n_labelled} labelled images"))
    sections = [
        html.section("Model", html.table(model_card(loaded)), "model"),
        html.section("Data", html.table(data_rows), "data"),
        html.section(
            "Attention maps",
            html.paragraph("Each cell: one head's attention from the outlined query patch to every patch "
                           "(prefix tokens omitted, scaled to the cell's maximum).")
            + "".join(html.figure(run.file(path), caption) for path, caption in overview.figures),
            "attention",
        ),
    ]
    if loaded.random_weights:
        sections.insert(0, html.paragraph("This model has RANDOM weights: nothing here describes a trained model.", "note"))
    path = run.file("report.html")
    write_text(path, html.page(f"vitcircuits report: {loaded.model_id}", sections))
    return str(path)


def hunt(out: str, model: ModelOptions, images: ImageOptions, config: HuntConfig, *, force: bool = False, resume: bool = False) -> str:
    """Run every stage; returns the report path."""
    run = Run.create(out, "hunt", {"model": model.to_dict(), "images": images.to_dict(), "hunt": asdict(config)}, force=force, resume=resume)
    with run.timed("load_model"):
        loaded = model.load()
    run.write_manifest(model=loaded.manifest(), seed=model.seed)
    with run.timed("overview"):
        overview = run_overview(run, loaded, images, config)
    write_json(run.file("overview/summary.json"), {"accuracy": overview.accuracy, "n_labelled": overview.n_labelled})
    with run.timed("report"):
        report = write_report(run, loaded, images, overview)
    run.write_manifest(outputs={"report": "report.html"})
    return report
