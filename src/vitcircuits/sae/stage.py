"""The SAE stages: ``sae train`` (harvest → train → held-out metrics → downstream fidelity) and
``sae analyze`` (feature statistics → circuit dependence → compositional ranking → galleries).

Both write into a folder of a run: ``activations/`` (the harvest shards), ``training/``
(checkpoints), ``sae/`` (SAELens layout), ``metrics.json``; and ``features/`` (statistics,
``dependence.csv``, ``features.json``, figures).
"""
from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from vitcircuits.cache import CacheConfig, check_hooks, provenance, write_cache
from vitcircuits.composition.ablation import ZStats
from vitcircuits.data.augment import AugmentConfig
from vitcircuits.files import read_json, write_json, write_text
from vitcircuits.inputs import ImageOptions, preprocess_config
from vitcircuits.models.loading import LoadedModel
from vitcircuits.sae.dependence import DependenceConfig, circuit_dependence, circuit_heads_from, hook_layer
from vitcircuits.sae.features import FeatureStatsConfig, feature_stats
from vitcircuits.sae.fidelity import FidelityConfig, downstream_fidelity
from vitcircuits.sae.gallery import plot_dependence, plot_feature_gallery, plot_mean_maps, sae_feature_maps
from vitcircuits.sae.harvest import ShardReader, training_batches
from vitcircuits.sae.io import load_sae, save_sae
from vitcircuits.sae.metrics import evaluate_sae
from vitcircuits.sae.model import SAEConfig
from vitcircuits.sae.train import TrainConfig, train_sae
from vitcircuits.stages import config_hash


@dataclass(frozen=True)
class SAEStageConfig:
    """What to harvest and how to train (``sae train``)."""

    hook: str | None = None
    """Hook to decompose; None: the residual after the strongest supported composition receiver's
    layer (:func:`choose_hook`)."""
    architecture: str = "topk"
    """``topk``, ``batchtopk`` or ``relu``."""
    k: int = 32
    """Active latents per token (TopK, BatchTopK)."""
    expansion: int = 8
    """Dictionary size as a multiple of the hook width."""
    l1_coefficient: float = 5.0
    """L1 weight (ReLU)."""
    epochs: int = 4
    """Passes over the training rows."""
    batch_size: int = 1024
    """Rows per optimiser step."""
    lr: float = 4e-4
    """Peak Adam learning rate (warm-up 5% of steps, linear decay over the last 20%)."""
    views: int = 1
    """Views per image in the harvest (1 + random crops/flips)."""
    holdout_every: int = 10
    """Images with index % holdout_every == 0 are held out for every metric."""
    shuffle_rows: int = 65536
    """Rows of the training shuffle buffer."""
    shard_rows: int = 65536
    """Rows per harvest shard."""
    include_prefix: bool = False
    """Also harvest (and splice) CLS/register tokens."""
    fidelity_images: int = 256
    """Held-out images used for downstream fidelity."""
    seed: int = 0
    """Seeds the initialisation, data order and augmentation."""


@dataclass(frozen=True)
class AnalyzeConfig:
    """Feature analysis settings (``sae analyze``)."""

    stats: FeatureStatsConfig = field(default_factory=FeatureStatsConfig)
    """Top activating patches kept per feature."""
    dependence: DependenceConfig = field(default_factory=DependenceConfig)
    """Features analysed, examples per feature, interventions and the compositional thresholds."""
    zstats_images: int = 64
    """Images for the head means used by the circuit ablation."""
    gallery_features: int = 8
    """Features shown in each gallery."""


MIN_TRAIN_ROWS = 256
"""Fewest training rows an SAE is trained on: four optimiser steps of :data:`MIN_BATCH` rows."""
MIN_BATCH = 64
"""Smallest batch the SAE batch is scaled down to when the rows are few."""


class TooFewRows(ValueError):
    """The harvest holds too few training or held-out rows for an SAE (the message says which)."""


def fitted_batch(n_train: int, batch_size: int) -> int:
    """The batch size for ``n_train`` rows: ``batch_size``, or when that leaves fewer than four
    steps per epoch the largest power of two that gives four (at least :data:`MIN_BATCH`)."""
    if n_train < MIN_TRAIN_ROWS:
        raise TooFewRows(f"only {n_train} training rows (an SAE needs at least {MIN_TRAIN_ROWS}); use more images or more views")
    if n_train >= 4 * batch_size:
        return batch_size
    return max(MIN_BATCH, 1 << ((n_train // 4).bit_length() - 1))


def choose_hook(circuits: list[dict], n_layers: int) -> tuple[str, str]:
    """``(hook, reason)``: the residual after the layer of the strongest supported receiver (the
    circuits are sorted strongest first); without one, after the middle layer."""
    supported = [c for c in circuits if c["verdict"] == "supported"]
    if supported:
        layer, head = supported[0]["receivers"][0]
        return f"blocks.{layer}.hook_resid_post", f"after the strongest supported composition receiver L{layer}H{head}"
    layer = n_layers // 2
    return f"blocks.{layer}.hook_resid_post", "no supported composition circuit: the middle layer"


def run_sae_train(folder: Path, loaded: LoadedModel, images: ImageOptions, config: SAEStageConfig, hook: str, reason: str,
                  progress: bool = True) -> dict:
    """Harvest ``hook`` (resumable), train the SAE (resumable from its checkpoints), evaluate it on
    held-out images and splice it into the model; write ``metrics.json`` and return it."""
    model = loaded.model
    check_hooks(model, (hook,))
    cache_config = CacheConfig((hook,), config.include_prefix, config.shard_rows, views=config.views, augment=AugmentConfig(seed=config.seed))
    batches = images.batches(loaded, progress=progress)
    made_from = provenance(loaded, batches)
    writer = write_cache(folder / "activations", model, batches, cache_config, made_from)
    reader = ShardReader(folder / "activations", hook)
    n_train = sum(int(((r.image_index_N % config.holdout_every) != 0).sum()) for r in reader.rows())
    if n_train == reader.n_rows:
        raise TooFewRows(f"no held-out rows (images whose index is a multiple of {config.holdout_every}) to measure an SAE on")
    batch_size = fitted_batch(n_train, config.batch_size)
    steps = max(1, config.epochs * n_train // batch_size)
    width = reader.width
    sae_config = SAEConfig(d_in=width, d_sae=width * config.expansion, architecture=config.architecture, k=config.k,
                           l1_coefficient=config.l1_coefficient, hook_name=hook, hook_layer=_layer_or_minus_one(hook))
    train_config = TrainConfig(lr=config.lr, warmup_steps=max(1, steps // 20), total_steps=steps, batch_size=batch_size,
                               seed=config.seed, checkpoint_every=max(1, steps // 10), log_every=max(1, steps // 50),
                               init_sample_rows=min(n_train, 16384))
    rows = training_batches(reader, batch_size, config.epochs, config.holdout_every, config.shuffle_rows, config.seed)
    data_key = config_hash({"index": {k: writer.index[k] for k in ("config", "made_from")}, "holdout_every": config.holdout_every})
    sae, history = train_sae(rows, sae_config, train_config, out_dir=folder / "training", resume=True, progress=progress, data_key=data_key)
    evaluation = evaluate_sae(sae, (r.acts_ND for r in reader.split(True, config.holdout_every)))
    fidelity = downstream_fidelity(model, sae, hook, _held_out_batches(loaded, images, config), FidelityConfig(include_prefix=config.include_prefix),
                                   progress=progress)
    save_sae(sae, folder / "sae")
    metrics = {
        "hook": hook, "hook_reason": reason, "sae": asdict(sae_config), "train": asdict(train_config), "stage": asdict(config),
        "n_rows": reader.n_rows, "n_train_rows": n_train, "steps": steps, "batch_size": batch_size, "made_from": made_from,
        "held_out": {"n_tokens": evaluation.n_tokens, "l0": evaluation.l0, "explained_variance": evaluation.explained_variance,
                     "dead_fraction": evaluation.dead_fraction, "dense_fraction": evaluation.dense_fraction,
                     "density_histogram": {"log10_edges": evaluation.histogram.edges.tolist(), "counts": evaluation.histogram.counts.tolist()}},
        "fidelity": fidelity, "history": history,
    }
    write_json(folder / "metrics.json", metrics)
    return metrics


def run_sae_analyze(folder: Path, loaded: LoadedModel, images: ImageOptions, circuits: list[dict] | None, config: AnalyzeConfig,
                    progress: bool = True) -> dict:
    """Feature statistics over the harvested patch rows of the original images (not the augmented
    views, whose patches are not image patches), circuit dependence on
    each analysed feature's top patches, the compositional ranking and galleries, in ``features/``."""
    model = loaded.model
    metrics = read_json(folder / "metrics.json")
    hook = metrics["hook"]
    sae = load_sae(folder / "sae")
    reader = ShardReader(folder / "activations", hook)
    grid = (model.layout.rows, model.layout.cols)
    stats = feature_stats(sae, _patch_rows(reader), grid, config.stats, progress=progress)
    out = folder / "features"
    stats.save(out)
    heads = circuit_heads_from(circuits or [], _layer_or_minus_one(hook))
    zstats = ZStats.empty(model)
    for n, batch in enumerate(images.batches(loaded, progress=False)):
        if n * images.batch_size >= config.zstats_images:
            break
        zstats.update(model, batch.images_BCHW)
    load = images.image_loader(loaded)
    rows = circuit_dependence(model, sae, hook, load, stats, heads, zstats, config.dependence, progress=progress)
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_text(out / "dependence.csv", buf.getvalue())
    pre = preprocess_config(loaded)
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
    write_json(out / "features.json", summary)
    return summary



def _patch_rows(reader: ShardReader):
    for rows in reader.rows():
        kept = rows.select((rows.view_N == 0) & (rows.row_N >= 0))
        yield kept.acts_ND, kept.image_index_N, kept.row_N, kept.col_N


def _layer_or_minus_one(hook: str) -> int:
    layer = hook_layer(hook)
    return -1 if layer is None else layer


def _held_out_batches(loaded: LoadedModel, images: ImageOptions, config: SAEStageConfig) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Up to ``fidelity_images`` held-out images with their labels, in batches."""
    out, n = [], 0
    for batch in images.batches(loaded, progress=False):
        keep = [j for j, i in enumerate(batch.indices) if i % config.holdout_every == 0][: config.fidelity_images - n]
        if keep:
            out.append((batch.images_BCHW[keep], None if batch.labels_B is None else batch.labels_B[keep]))
            n += len(keep)
        if n >= config.fidelity_images:
            break
    return out
