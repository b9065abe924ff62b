"""``vitcircuits hunt``: every stage, resumable, then ``report.html``.

Stages: overview (model card, predictions/accuracy, attention maps) → heads (the head atlas)
→ composition (weight scores, path patching, edge attribution, task-level checks, shuffle control, verdicts)
→ necessity (accuracy per class group with the supported circuits' heads ablated, against random
heads of the same layers; classifiers with labelled images only) → sae
(an SAE after the strongest composition receiver, with held-out metrics and downstream fidelity)
→ features (circuit dependence and compositional features) → report. Each stage
writes its outputs into the run folder; the report is built from those files, so it can be
rebuilt from a finished or resumed run."""
from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from vitcircuits.composition.circuits import VERDICTS
from vitcircuits.composition.config import ComposeConfig
from vitcircuits.composition.necessity import LabelledBatches, NecessityConfig, circuit_heads, necessity_report
from vitcircuits.composition.outputs import write_composition
from vitcircuits.composition.scan import run_composition
from vitcircuits.composition.task_metric import TaskMetric, fit_probe
from vitcircuits.files import read_json, write_json, write_text
from vitcircuits.heads.atlas import AtlasConfig, HeadAtlas
from vitcircuits.heads.scan import scan_heads, summarize, write_heads_outputs
from vitcircuits.inputs import ImageOptions, ModelOptions, check_folder_classes, images_manifest, preprocess_config
from vitcircuits.models.loading import LoadedModel
from vitcircuits.report.attention_maps import default_queries, patch_attention, plot_head_grid
from vitcircuits.report.figures import denormalize
from vitcircuits.report.page import write_report
from vitcircuits.runs import Run
from vitcircuits.sae.dependence import DependenceConfig
from vitcircuits.sae.stage import AnalyzeConfig, SAEStageConfig, TooFewRows, choose_hook, run_sae_analyze, run_sae_train
from vitcircuits.stages import StageRunner


@dataclass(frozen=True)
class HuntConfig:
    """Options of the hunt that are not about the model or the images."""

    n_attention_images: int = 2
    """Images for which every head's attention map is drawn in the overview."""
    atlas: AtlasConfig = field(default_factory=AtlasConfig)
    """Head-atlas settings."""
    compose: ComposeConfig = field(default_factory=ComposeConfig)
    """Composition settings."""
    necessity: NecessityConfig = field(default_factory=lambda: NecessityConfig(draws=10))
    """Circuit-ablation settings (random same-layer head sets to compare with)."""
    max_necessity_images: int | None = 512
    """Labelled images for the necessity stage (None: all); it costs ``draws + 2`` forward passes over them."""
    sae: SAEStageConfig = field(default_factory=SAEStageConfig)
    """SAE settings; its hook (None by default) is chosen from the composition circuits."""
    analyze: AnalyzeConfig = field(default_factory=AnalyzeConfig)
    """Feature-analysis settings."""

    @classmethod
    def quick(cls) -> HuntConfig:
        """A small, fast pass (``--quick``): fewer bootstrap replicates, patching and task images,
        fewer edges checked exactly on a large model, a smaller SAE trained for one epoch, fewer
        features tested. Every stage still runs."""
        return cls(
            atlas=AtlasConfig(n_boot=50),
            compose=ComposeConfig(max_patch_images=16, max_transfer_images=128, task_images=32, task_candidates=8, n_boot=200),
            necessity=NecessityConfig(draws=4),
            max_necessity_images=128,
            sae=SAEStageConfig(epochs=1, expansion=4, fidelity_images=64),
            analyze=AnalyzeConfig(dependence=DependenceConfig(n_features=16, n_examples=4, n_control_draws=2), zstats_images=32),
        )


@torch.no_grad()
def run_overview(run: Run, loaded: LoadedModel, images: ImageOptions, config: HuntConfig) -> None:
    """Predictions (and accuracy where labels exist) over all images, and attention-map grids."""
    model = loaded.model
    batches = images.batches(loaded)
    check_folder_classes(loaded, batches)
    rows, to_draw = [], []
    for batch in batches:
        out = model(batch.images_BCHW)
        preds = out.argmax(-1).tolist() if model.cfg.n_classes else [None] * len(batch.indices)
        labels = batch.labels_B.tolist() if batch.labels_B is not None else [-1] * len(batch.indices)
        rows += [(i, p, label, pred) for i, p, label, pred in zip(batch.indices, batch.paths, labels, preds)]
        room = config.n_attention_images - len(to_draw)
        to_draw += [(batch.indices[j], batch.paths[j], batch.images_BCHW[j : j + 1]) for j in range(min(room, len(batch.indices)))]
    pre = preprocess_config(loaded)
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
    images_section = images_manifest(batches)
    write_json(out_dir / "summary.json", {"accuracy": accuracy, "n_labelled": len(labelled), "figures": figures, "images": images_section})
    run.write_manifest(images=images_section)


def run_heads(run: Run, loaded: LoadedModel, images: ImageOptions, config: AtlasConfig, subdir: str = "heads") -> HeadAtlas:
    """The head atlas over all images, saved with its figures in ``subdir`` of the run."""
    batches = images.batches(loaded)
    atlas, kept = scan_heads(loaded, batches, config)
    figures = write_heads_outputs(run, loaded, atlas, kept, subdir)
    write_json(run.file(subdir) / "figures.json", figures)
    run.write_manifest(images=images_manifest(batches), heads={"summary": summarize(atlas)})
    return atlas


def run_compose(run: Run, loaded: LoadedModel, images: ImageOptions, config: ComposeConfig, atlas_dir: str = "heads",
                out_dir: str = "composition") -> None:
    """Weight scores, path patching, edge attribution and task-level checks, shuffle control and a
    verdict for every edge."""
    atlas = HeadAtlas.load(run.file(atlas_dir))
    probe = fit_image_probe(loaded, images) if config.task_metric == "probe" else None
    result = run_composition(loaded.model, lambda: (b.images_BCHW for b in images.batches(loaded)), atlas, config, probe, progress=True)
    cfg = loaded.model.cfg
    figures = write_composition(run.file(out_dir), result, cfg.n_layers, cfg.n_heads)
    write_json(run.file(out_dir) / "figures.json", [(str(p.relative_to(run.path)), c) for p, c in figures])
    counts = {v: sum(row["verdict"] == v for row in result.candidates) for v in VERDICTS}
    run.write_manifest(composition={"verdicts": counts, "ablation": config.patching.ablation})


@torch.no_grad()
def fit_image_probe(loaded: LoadedModel, images: ImageOptions) -> TaskMetric:
    """A linear probe on the model's pooled output over the labelled images (one pass)."""
    features, labels = [], []
    for images_BCHW, labels_B in LabelledBatches(images.batches(loaded)):
        features.append(loaded.model(images_BCHW).float().cpu())
        labels.append(labels_B.cpu())
    if not labels:
        raise ValueError(f"--task-metric probe needs labelled images; {images.images} has none")
    labels_B = torch.cat(labels)
    return fit_probe(torch.cat(features), labels_B, int(labels_B.max()) + 1)


def _circuits(run: Run) -> list[dict]:
    return read_json(run.file("composition/circuits.json"))["circuits"]


def run_necessity(run: Run, loaded: LoadedModel, images: ImageOptions, config: HuntConfig) -> None:
    """Ablate the supported circuits' heads; ``necessity/necessity.json`` says why when it cannot."""
    overview = read_json(run.file("overview/summary.json"))
    heads = circuit_heads(_circuits(run))
    reason = ("the model has no classification head" if not loaded.model.cfg.n_classes else
              "the images have no class labels" if not overview["n_labelled"] else
              "no supported circuit" if not heads else None)
    if reason:
        write_json(run.file("necessity/necessity.json"), {"skipped": reason})
        return
    limit = min(filter(None, (images.max_images, config.max_necessity_images)), default=None)
    groups = dict(loaded.pretrained_cfg.get("class_groups") or {})
    report = necessity_report(loaded.model, LabelledBatches(replace(images, max_images=limit).batches(loaded)), heads, groups, config.necessity)
    write_json(run.file("necessity/necessity.json"), report)
    run.write_manifest(necessity={"heads": report["circuit"]["heads"], "clean": report["clean"], "circuit": report["circuit"]["overall"]})


def run_sae(run: Run, loaded: LoadedModel, images: ImageOptions, config: SAEStageConfig) -> None:
    """Train the SAE at the configured hook, or after the strongest supported composition receiver;
    with too few rows, ``sae/metrics.json`` says why it was skipped."""
    hook, reason = (config.hook, "given") if config.hook else choose_hook(_circuits(run), loaded.model.cfg.n_layers)
    try:
        metrics = run_sae_train(run.file("sae"), loaded, images, config, hook, reason)
    except TooFewRows as err:
        write_json(run.file("sae/metrics.json"), {"hook": hook, "skipped": f"{hook}: {err}"})
        run.write_manifest(sae={"hook": hook, "skipped": str(err)})
        return
    run.write_manifest(sae={"hook": hook, "hook_reason": reason, "held_out": {k: v for k, v in metrics["held_out"].items() if k != "density_histogram"}})


def run_features(run: Run, loaded: LoadedModel, images: ImageOptions, config: AnalyzeConfig) -> None:
    if "skipped" in read_json(run.file("sae/metrics.json")):
        return
    summary = run_sae_analyze(run.file("sae"), loaded, images, _circuits(run), config)
    run.write_manifest(features={"n_analysed": summary["n_features_analysed"], "n_compositional": summary["n_compositional"]})


def check_truth(data: object, n_layers: int, n_heads: int) -> int:
    """Validate a known-circuit document (the ``truth.json`` layout of
    :func:`vitcircuits.testing.organism_benchmark.truth_document`) against the model's shape;
    return its number of causal edges. Raises ValueError naming what is wrong."""
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    missing = [key for key in ("source", "images", "threshold", "edges") if key not in data]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    if not isinstance(data["edges"], list):
        raise ValueError("'edges' is not a list")
    for i, row in enumerate(data["edges"]):
        edge = row.get("edge") if isinstance(row, dict) else None
        ok = (isinstance(edge, list) and len(edge) == 5 and all(isinstance(v, int) and not isinstance(v, bool) for v in edge[:4])
              and edge[4] in ("q", "k", "v") and 0 <= edge[0] < edge[2] < n_layers and 0 <= edge[1] < n_heads and 0 <= edge[3] < n_heads
              and isinstance(row.get("margin_drop"), (int, float)) and not isinstance(row.get("margin_drop"), bool)
              and isinstance(row.get("causal"), bool))
        if not ok:
            raise ValueError(f"edge {i} is not [sender layer, sender head, receiver layer, receiver head, q|k|v] of this "
                             f"{n_layers}-layer, {n_heads}-head model with a numeric margin_drop and a true/false causal")
    return sum(row["causal"] for row in data["edges"])


def copy_truth(run: Run, truth: str | Path, loaded: LoadedModel) -> None:
    """Validate a known-circuit file against the model and copy it into the run."""
    data = read_json(truth)
    try:
        n_causal = check_truth(data, loaded.model.cfg.n_layers, loaded.model.cfg.n_heads)
    except ValueError as err:
        raise ValueError(f"{truth}: not a truth file for this model ({err})") from None
    run.write_manifest(truth={"file": str(truth), "n_causal": n_causal})
    write_json(run.file("truth.json"), data)


def hunt(out: str, model: ModelOptions, images: ImageOptions, config: HuntConfig, *, force: bool = False, resume: bool = False,
         truth: str | Path | None = None) -> str:
    """Run every stage (skipping finished ones when resuming); returns the report path. ``truth``: a
    file of known causal edges to set the verdicts against in the report."""
    run_config = {"model": model.to_dict(), "images": images.to_dict(), "hunt": asdict(config)}
    run = Run.create(out, "hunt", run_config, force=force, resume=resume)
    if force:
        run.file("stages.json").unlink(missing_ok=True)
        run.file("truth.json").unlink(missing_ok=True)
    with run.timed("load_model"):
        loaded = model.load()
    if truth is not None:
        copy_truth(run, truth, loaded)
    run.write_manifest(model=loaded.manifest(), seed=model.seed)
    stages = StageRunner(run)
    image_list = images.batches(loaded, progress=False).summary().image_list_sha256
    inputs = {"model": model.to_dict(), "weights": loaded.weights_sha256, "images": images.to_dict(), "image_list_sha256": image_list}
    compose_inputs = {**inputs, "atlas": asdict(config.atlas), "compose": asdict(config.compose)}
    stages.stage("overview", {**inputs, "n_attention_images": config.n_attention_images},
                 lambda: run_overview(run, loaded, images, config), outputs=["overview"])
    stages.stage("heads", {**inputs, "atlas": asdict(config.atlas)}, lambda: run_heads(run, loaded, images, config.atlas), outputs=["heads"])
    stages.stage("composition", compose_inputs, lambda: run_compose(run, loaded, images, config.compose), outputs=["composition"])
    stages.stage("necessity", {**compose_inputs, "necessity": asdict(config.necessity), "max_images": config.max_necessity_images},
                 lambda: run_necessity(run, loaded, images, config), outputs=["necessity"])
    stages.stage("sae", {**compose_inputs, "sae": asdict(config.sae)}, lambda: run_sae(run, loaded, images, config.sae), outputs=["sae"])
    stages.stage("features", {**compose_inputs, "sae": asdict(config.sae), "analyze": asdict(config.analyze)},
                 lambda: run_features(run, loaded, images, config.analyze), outputs=["sae/features"])
    stages.stage("report", {**inputs, "always": json.dumps(stages.done, sort_keys=True)}, lambda: write_report(run, loaded),
                 outputs=["report.html"])
    run.write_manifest(outputs={"report": "report.html", "stages": stages.done})
    return str(run.file("report.html"))
