"""The ``features`` stage (``hunt`` and ``sae analyze``): feature statistics → circuit dependence →
compositional ranking → galleries, in the run's ``sae/features/`` (statistics,
``dependence.csv``, ``features.json``, figures)."""
from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass, field
from functools import partial, reduce
from pathlib import Path

from rich.progress import Progress

from vitcircuits.composition.necessity import ZStatsPass
from vitcircuits.files import read_json, write_json, write_text
from vitcircuits.inputs import ImageSet
from vitcircuits.layout import LAYOUT
from vitcircuits.models.loading import LoadedModel
from vitcircuits.runs import Run
from vitcircuits.sae.dependence import DependenceConfig, circuit_dependence, circuit_heads_from
from vitcircuits.sae.features import FeatureAccumulator, FeatureStatsConfig, feature_accumulator
from vitcircuits.sae.gallery import plot_dependence, plot_feature_gallery, plot_mean_maps, sae_feature_maps
from vitcircuits.sae.harvest import ShardReader
from vitcircuits.sae.io import load_sae
from vitcircuits.stages.composition import read_circuits
from vitcircuits.stages.sae import layer_or_minus_one


@dataclass(frozen=True)
class AnalyzeConfig:
    """Feature analysis settings (``sae analyze``)."""

    stats: FeatureStatsConfig = field(default_factory=FeatureStatsConfig)
    """Top activating patches kept per feature."""
    dependence: DependenceConfig = field(default_factory=DependenceConfig)
    """Features analysed, examples per feature, interventions and the compositional thresholds."""
    zstats_images: int = 64
    """Images (the first of the set) for the head means used by the circuit ablation."""
    gallery_features: int = 8
    """Features shown in each gallery."""


def features_stage(run: Run, loaded: LoadedModel, images: ImageSet, config: AnalyzeConfig) -> None:
    """``hunt``'s stage: analyse the SAE of this run against its circuits (nothing when the SAE
    stage was skipped)."""
    if "skipped" in read_json(run.file(LAYOUT.sae_metrics)):
        return
    summary = run_features(run.path, loaded, images, read_circuits(run.path), config)
    run.write_manifest(features={"n_analysed": summary["n_features_analysed"], "n_compositional": summary["n_compositional"]})


def run_features(root: Path, loaded: LoadedModel, images: ImageSet, circuits: list[dict] | None, config: AnalyzeConfig,
                 progress: bool = True) -> dict:
    """Feature statistics over the harvested patch rows of the original images (not the augmented
    views, whose patches are not image patches), circuit dependence on
    each analysed feature's top patches, the compositional ranking and galleries, in ``features/``."""
    model = loaded.model
    folder = root / LAYOUT.sae
    hook = read_json(root / LAYOUT.sae_metrics)["hook"]
    sae = load_sae(root / LAYOUT.sae_weights)
    reader = ShardReader(root / LAYOUT.activations, hook)
    grid = (model.layout.rows, model.layout.cols)
    shards = list(range(len(reader.index["shards"])))
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("feature statistics (shards)", total=len(shards))
        parts = images.engine.map_items(model, partial(_shard_statistics, sae, reader, grid, config.stats), shards,
                                        lambda: bar.advance(task))
    stats = reduce(FeatureAccumulator.merge, parts).result()
    out = root / LAYOUT.features
    stats.save(out)
    heads = circuit_heads_from(circuits or [], layer_or_minus_one(hook))
    zstats = images.first(config.zstats_images).map(loaded, ZStatsPass(labelled_only=False), progress=False).result
    load = images.load
    rows = circuit_dependence(model, sae, hook, load, stats, heads, zstats, config.dependence, progress=progress)
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_text(root / LAYOUT.dependence_csv, buf.getvalue())
    pre = images.preprocess
    top = [r["feature"] for r in rows[: config.gallery_features]]
    figures = []
    if top:
        figures.append((plot_feature_gallery(load, stats, top, out / "gallery_compositional.png", model.cfg.patch_size,
                                             sae_feature_maps(model, sae, hook), pre.mean, pre.std, dependence_rows=rows),
                        "Most compositional features: top patches (boxed) with the feature's activation overlaid."))
        figures.append((plot_mean_maps(stats, top, out / "mean_maps.png"), "Mean activation over grid positions of the same features."))
        figures.append((plot_dependence(rows, out / "dependence.png"),
                        "Circuit dependence: activation drop when the neighbours are occluded vs. when the circuit heads are ablated "
                        "(beyond random heads of the same layers); colour: drop when the centre patch is occluded."))
    summary = {"hook": hook, "circuit_heads": [list(h) for h in heads], "n_features_analysed": len(rows),
               "n_compositional": sum(bool(r["compositional"]) for r in rows), "top": rows[:20], "config": asdict(config),
               "figures": [(str(p.relative_to(folder)), c) for p, c in figures]}
    write_json(root / LAYOUT.features_json, summary)
    return summary


def _shard_statistics(sae, reader: ShardReader, grid: tuple[int, int], config: FeatureStatsConfig, model, shard: int) -> FeatureAccumulator:
    """The feature statistics of one harvest shard (run on any model replica; the model is unused)."""
    return feature_accumulator(sae, _patch_rows(reader, [shard]), grid, config)


def _patch_rows(reader: ShardReader, order: list[int]):
    for rows in reader.rows(order):
        kept = rows.select((rows.view_N == 0) & (rows.row_N >= 0))
        yield kept.acts_ND, kept.image_index_N, kept.row_N, kept.col_N
