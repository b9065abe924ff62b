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

from dataclasses import asdict, dataclass, field
from pathlib import Path

from vitcircuits.composition.config import ComposeConfig
from vitcircuits.composition.necessity import NecessityConfig
from vitcircuits.engine import EngineOptions
from vitcircuits.files import read_json, write_json
from vitcircuits.heads.atlas import AtlasConfig
from vitcircuits.inputs import ImageOptions, ModelOptions
from vitcircuits.layout import LAYOUT
from vitcircuits.models.loading import LoadedModel
from vitcircuits.report.page import write_report
from vitcircuits.runs import Run
from vitcircuits.sae.dependence import DependenceConfig
from vitcircuits.stages import Stage, StageRunner
from vitcircuits.stages.composition import run_compose
from vitcircuits.stages.features import AnalyzeConfig, features_stage
from vitcircuits.stages.heads import run_heads
from vitcircuits.stages.necessity import necessity_stage
from vitcircuits.stages.overview import run_overview
from vitcircuits.stages.sae import SAEStageConfig, run_sae


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


def _composed(config: HuntConfig, done: dict) -> dict:
    """What the composition verdicts depend on (the stages after it read them)."""
    return {"atlas": asdict(config.atlas), "compose": asdict(config.compose)}


STAGES = (
    Stage("overview", (LAYOUT.overview,), (), lambda c, done: {"n_attention_images": c.n_attention_images},
          lambda run, loaded, images, c: run_overview(run, loaded, images, c.n_attention_images)),
    Stage("heads", (LAYOUT.heads,), (), lambda c, done: {"atlas": asdict(c.atlas)},
          lambda run, loaded, images, c: run_heads(run, loaded, images, c.atlas)),
    Stage("composition", (LAYOUT.composition,), (LAYOUT.atlas,), _composed,
          lambda run, loaded, images, c: run_compose(run, loaded, images, c.compose)),
    Stage("necessity", (LAYOUT.necessity,), (LAYOUT.overview_summary, LAYOUT.circuits),
          lambda c, done: {**_composed(c, done), "necessity": asdict(c.necessity), "max_images": c.max_necessity_images},
          lambda run, loaded, images, c: necessity_stage(run, loaded, images, c.necessity, c.max_necessity_images)),
    Stage("sae", (LAYOUT.sae,), (LAYOUT.circuits,), lambda c, done: {**_composed(c, done), "sae": asdict(c.sae)},
          lambda run, loaded, images, c: run_sae(run, loaded, images, c.sae)),
    Stage("features", (LAYOUT.features,), (LAYOUT.sae_metrics, LAYOUT.circuits),
          lambda c, done: {**_composed(c, done), "sae": asdict(c.sae), "analyze": asdict(c.analyze)},
          lambda run, loaded, images, c: features_stage(run, loaded, images, c.analyze)),
    Stage("report", (LAYOUT.report,), (LAYOUT.overview_summary,), lambda c, done: {"upstream": {n: r["hash"] for n, r in done.items() if n != "report"}},
          lambda run, loaded, images, c: write_report(run, loaded)),
)
"""``hunt``, in order. Each stage's hash covers the model, its weights' sha256, the image list and
``depends_on``; the report's covers every other stage's hash (and a stage that ran makes every
later one run)."""


def check_truth(data: object, n_layers: int, n_heads: int) -> int:
    """Validate a known-circuit document (the ``truth.json`` layout of
    :func:`vitcircuits.groundtruth.organism_benchmark.truth_document`) against the model's shape;
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
    write_json(run.file(LAYOUT.truth), data)


def hunt(out: str, model: ModelOptions, images: ImageOptions, config: HuntConfig, *, force: bool = False, resume: bool = False,
         truth: str | Path | None = None, engine: EngineOptions = EngineOptions()) -> str:
    """Run every stage (skipping finished ones when resuming); returns the report path. ``truth``: a
    file of known causal edges to set the verdicts against in the report; ``engine``: where the
    image passes run (the results do not depend on it, so it is not part of any stage's hash)."""
    run_config = {"model": model.to_dict(), "images": images.to_dict(), "hunt": asdict(config)}
    run = Run.create(out, "hunt", run_config, force=force, resume=resume)
    if force:
        run.file(LAYOUT.stages).unlink(missing_ok=True)
        run.file(LAYOUT.truth).unlink(missing_ok=True)
    with run.timed("load_model"):
        loaded = model.load()
    if truth is not None:
        copy_truth(run, truth, loaded)
    started = engine.start(model, loaded)
    run.write_manifest(model=loaded.manifest(), seed=model.seed, engine=started.describe())
    runner = StageRunner(run)
    image_set = images.open(loaded, started)
    key = {"model": model.to_dict(), "weights": loaded.weights_sha256, "images": images.to_dict(), "image_list_sha256": image_set.image_list_sha256}
    for stage in STAGES:
        runner.stage(stage.name, {**key, **stage.depends_on(config, runner.done)},
                     lambda stage=stage: stage.body(run, loaded, image_set, config), outputs=stage.outputs, reads=stage.reads)
    run.write_manifest(outputs={"report": LAYOUT.report, "stages": runner.done})
    return str(run.file(LAYOUT.report))
