"""The ``sae`` stage (``hunt`` and ``sae train``): harvest → train → held-out metrics → downstream
fidelity, into the run's ``sae/`` folder: ``activations/`` (the harvest shards), ``training/``
(checkpoints), ``sae/`` (SAELens layout) and ``metrics.json``. With too few rows, ``hunt`` records
why the stage was skipped instead.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from vitcircuits.cache import CacheConfig, harvest
from vitcircuits.data.augment import AugmentConfig
from vitcircuits.files import write_json
from vitcircuits.inputs import ImageSet, provenance
from vitcircuits.layout import LAYOUT
from vitcircuits.models.hooks import check_hooks
from vitcircuits.models.loading import LoadedModel
from vitcircuits.runs import Run
from vitcircuits.sae.dependence import hook_layer
from vitcircuits.sae.fidelity import FidelityConfig, downstream_fidelity
from vitcircuits.sae.harvest import ShardReader, training_batches
from vitcircuits.sae.io import save_sae
from vitcircuits.sae.metrics import evaluate_sae
from vitcircuits.sae.model import SAEConfig
from vitcircuits.sae.parallel import train_data_parallel
from vitcircuits.sae.train import TrainConfig, train_sae
from vitcircuits.stages import config_hash
from vitcircuits.stages.composition import read_circuits


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
    processes: int = 1
    """Training processes (data-parallel, :mod:`vitcircuits.sae.parallel`): gloo on the CPU, one
    GPU each with nccl on ``cuda``; the SAE is the one process's up to float rounding."""


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


def run_sae(run: Run, loaded: LoadedModel, images: ImageSet, config: SAEStageConfig) -> None:
    """``hunt``'s stage: train the SAE at the configured hook, or after the strongest supported
    composition receiver; with too few rows, ``metrics.json`` says why it was skipped."""
    hook, reason = (config.hook, "given") if config.hook else choose_hook(read_circuits(run.path), loaded.model.cfg.n_layers)
    try:
        metrics = run_sae_train(run, loaded, images, config, hook, reason)
    except TooFewRows as err:
        write_json(run.file(LAYOUT.sae_metrics), {"hook": hook, "skipped": f"{hook}: {err}"})
        run.write_manifest(sae={"hook": hook, "skipped": str(err)})
        return
    run.write_manifest(sae={"hook": hook, "hook_reason": reason, "held_out": {k: v for k, v in metrics["held_out"].items() if k != "density_histogram"}})


def run_sae_train(run: Run, loaded: LoadedModel, images: ImageSet, config: SAEStageConfig, hook: str, reason: str,
                  progress: bool = True) -> dict:
    """Harvest ``hook`` (resumable), train the SAE (resumable from its checkpoints), evaluate it on
    held-out images and splice it into the model; write ``metrics.json`` and return it."""
    model = loaded.model
    check_hooks(model, (hook,))
    cache_config = CacheConfig((hook,), config.include_prefix, config.shard_rows, views=config.views, augment=AugmentConfig(seed=config.seed))
    made_from = provenance(loaded, images)
    index, streamed = harvest(run.file(LAYOUT.activations), images, loaded, cache_config, made_from, keep_every=config.holdout_every,
                              keep_max=config.fidelity_images, progress=progress)
    held_out = streamed.result.kept
    reader = ShardReader(run.file(LAYOUT.activations), hook)
    n_train = reader.n_training_rows(config.holdout_every)
    if n_train == reader.n_rows:
        raise TooFewRows(f"no held-out rows (images whose index is a multiple of {config.holdout_every}) to measure an SAE on")
    batch_size = fitted_batch(n_train, config.batch_size)
    steps = max(1, config.epochs * n_train // batch_size)
    width = reader.width
    sae_config = SAEConfig(d_in=width, d_sae=width * config.expansion, architecture=config.architecture, k=config.k,
                           l1_coefficient=config.l1_coefficient, hook_name=hook, hook_layer=layer_or_minus_one(hook))
    train_config = TrainConfig(lr=config.lr, warmup_steps=max(1, steps // 20), total_steps=steps, batch_size=batch_size,
                               seed=config.seed, checkpoint_every=max(1, steps // 10), log_every=max(1, steps // 50),
                               init_sample_rows=min(n_train, 16384))
    rows = partial(_training_rows, run.file(LAYOUT.activations), hook, batch_size, config)
    data_key = config_hash({"index": {k: index.index[k] for k in ("config", "made_from")}, "holdout_every": config.holdout_every})
    train = partial(train_sae, sae_config=sae_config, train_config=train_config, out_dir=run.file(LAYOUT.sae_training), resume=True,
                    data_key=data_key)
    if config.processes > 1:
        sae, history = train_data_parallel(config.processes, rows, train, model.device.type)
    else:
        sae, history = train(rows(), progress=progress, device=model.device)
    evaluation = evaluate_sae(sae, (r.acts_ND for r in reader.split(True, config.holdout_every)))
    fidelity = downstream_fidelity(model, sae, hook, held_out, FidelityConfig(include_prefix=config.include_prefix),
                                   progress=progress)
    save_sae(sae, run.file(LAYOUT.sae_weights))
    metrics = {
        "hook": hook, "hook_reason": reason, "sae": asdict(sae_config), "train": asdict(train_config), "stage": asdict(config),
        "n_rows": reader.n_rows, "n_train_rows": n_train, "steps": steps, "batch_size": batch_size, "made_from": made_from,
        "held_out": {"n_tokens": evaluation.n_tokens, "l0": evaluation.l0, "explained_variance": evaluation.explained_variance,
                     "dead_fraction": evaluation.dead_fraction, "dense_fraction": evaluation.dense_fraction,
                     "density_histogram": {"log10_edges": evaluation.histogram.edges.tolist(), "counts": evaluation.histogram.counts.tolist()}},
        "fidelity": fidelity, "history": history,
    }
    write_json(run.file(LAYOUT.sae_metrics), metrics)
    return metrics


def _training_rows(folder: Path, hook: str, batch_size: int, config: SAEStageConfig):
    """The seeded stream of training batches from a harvest (built in each training process)."""
    return training_batches(ShardReader(folder, hook), batch_size, config.epochs, config.holdout_every, config.shuffle_rows, config.seed)


def layer_or_minus_one(hook: str) -> int:
    """The block a hook is in, or -1 for hooks before the first block."""
    layer = hook_layer(hook)
    return -1 if layer is None else layer
