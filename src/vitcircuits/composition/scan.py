"""The ``compose`` stage: every edge ``sender → later receiver → q/k/v`` of the model gets a
verdict (:mod:`~vitcircuits.composition.circuits`).

1. Weight scores of all pairs (corroboration).
2. Path patching of every head of every layer but the last into every later head, on a seeded
   uniform sample of the images, plus random-direction controls where the earlier heads alone are
   too few for a null: does the receiver read the sender (**composes**)?
3. On a second sample, task-grounded edge attribution (EAP-IG) over every edge, then exact
   task-level path patching of the edges it ranks highest (of every edge on a small model), each
   against other earlier senders into the same receiver input and random-direction controls:
   does the output use the edge (**matters**)?
4. The patch-shuffle control and the neighbour → centre transfer probes.

The head atlas only labels the senders; it chooses nothing.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from vitcircuits.composition.ablation import ZStats
from vitcircuits.composition.circuits import EdgeRow, build_circuits
from vitcircuits.composition.config import ComposeConfig
from vitcircuits.composition.edges import Steps, edge_rows, task_evidence
from vitcircuits.composition.evidence import fill_count
from vitcircuits.composition.patching import PatchEffects, PatchingConfig, path_patch_batch
from vitcircuits.composition.shuffle import shuffle_patches
from vitcircuits.composition.task_metric import TaskMetric
from vitcircuits.composition.task_patching import EdgeKey
from vitcircuits.composition.transfer import TooFewImages, TransferResult, transfer_curves
from vitcircuits.composition.weights import CompositionScores, composition_scores
from vitcircuits.engine import LOCAL, Engine, numbered
from vitcircuits.heads.atlas import HeadAtlas
from vitcircuits.models.hooked_vit import HookedViT
from vitcircuits.sampling import reservoir

SENDER_KINDS = ("modular", "directional")


@dataclass
class CompositionResult:
    """Everything the composition stage measured; :mod:`vitcircuits.stages.composition` writes it."""

    scores: CompositionScores
    senders: list[tuple[int, int, str]]
    """Every head but those of the last layer, with its atlas kind."""
    candidates: list[EdgeRow]
    """One row per edge with all its evidence and its verdict."""
    circuits: list[dict]
    effects: dict[str, np.ndarray]
    """``clean``/``shuffled``: path-patching effects ``[S, 3 paths, L, H, metrics]`` of the senders."""
    patched: list[tuple[int, int]]
    """Heads patched, in ``effects`` order."""
    transfer: dict[str, TransferResult] = field(default_factory=dict)
    """Receptive-field probes: ``clean`` and with the sender heads / supported receivers ablated."""
    transfer_skipped: str | None = None
    """Why there are no transfer probes, if there are none."""
    attribution: np.ndarray | None = None
    """Attributed drops of the task metric ``[sender L, sender H, 3 paths, receiver L, receiver H]``."""
    attribution_direct: np.ndarray | None = None
    """Attributed drops of the direct paths sender → output ``[L, H]``."""
    attribution_agreement: dict = field(default_factory=dict)
    """Rank agreement of attribution with the exact task-level checks."""
    task_effects: dict[EdgeKey, float] = field(default_factory=dict)
    """Exact task-level path patching: edge → mean drop of the task metric."""
    task_metric: dict = field(default_factory=dict)
    """What the task metric was: kind, target, clean mean, floor, images."""


def _patch_batch(heads: list[tuple[int, int]], stats: ZStats, config: PatchingConfig, random_draws: dict | None, model: HookedViT,
                 item: tuple[torch.Tensor, int]) -> PatchEffects:
    """One batch's path patching, from the batch and the number of images before it."""
    images_BCHW, first_image = item
    effects = PatchEffects(heads, model.cfg.n_layers, model.cfg.n_heads, random_draws)
    path_patch_batch(model, images_BCHW, heads, effects, stats, config, first_image)
    return effects


def _patch(model: HookedViT, batches: list[torch.Tensor], heads: list[tuple[int, int]], stats: ZStats, config: PatchingConfig,
           advance: Callable[[], None], engine: Engine, random_draws: dict[tuple[int, int], list[int]] | None = None) -> PatchEffects:
    """Path patching of every batch, batch by batch on ``engine``'s model replicas, merged in order."""
    effects = PatchEffects(heads, model.cfg.n_layers, model.cfg.n_heads, random_draws)
    for part in engine.map_items(model, partial(_patch_batch, heads, stats, config, random_draws), numbered(batches), advance):
        effects.merge(part)
    return effects


@contextmanager
def progress_steps(enabled: bool) -> Iterator[Steps]:
    """A rich progress display whose ``steps(description, total)`` adds a bar and returns its advance."""
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), disable=not enabled) as bar:
        def steps(description: str, total: int) -> Callable[[], None]:
            task = bar.add_task(description, total=total)
            return lambda: bar.advance(task)
        yield steps


def random_controls(layer: int, n_heads: int, n_layers: int) -> list[int]:
    """Per random-direction draw of a sender in ``layer``, the last receiver layer whose null needs
    it: receivers in layer ``r`` have ``n_heads * r - 1`` other earlier senders, and draw ``k``
    tops up their null while that count is short of :data:`~vitcircuits.composition.evidence.MIN_NULL`
    by more than ``k``."""
    return [max(r for r in range(layer + 1, n_layers) if fill_count(n_heads * r - 1) > draw)
            for draw in range(fill_count(n_heads * (layer + 1) - 1))]


def resolve_metric(model: HookedViT, choice: str, probe: TaskMetric | None = None) -> TaskMetric:
    """The task metric ``choice`` names (:attr:`ComposeConfig.task_metric`); ``probe`` is the fitted
    probe metric that ``probe`` needs."""
    if choice == "probe":
        if probe is None or probe.probe_CD is None:
            raise ValueError("task metric 'probe' needs a linear probe fitted on labelled images")
        return probe
    if choice == "margin" and not model.cfg.n_classes:
        raise ValueError("task metric 'margin' needs a classifier; this model has no head (use embedding or probe)")
    if choice not in ("auto", "margin", "embedding"):
        raise ValueError(f"unknown task metric {choice!r}; choose auto, margin, embedding or probe")
    return TaskMetric("margin" if choice == "margin" or (choice == "auto" and model.cfg.n_classes) else "embedding")


def run_composition(model: HookedViT, image_batches: Callable[[], Iterable[torch.Tensor]], atlas: HeadAtlas, config: ComposeConfig,
                    probe: TaskMetric | None = None, progress: bool = False, engine: Engine = LOCAL) -> CompositionResult:
    """Everything but writing files. ``image_batches()`` yields the image batches; it is called once,
    so the images are decoded once (the samples and the transfer probes' images are kept from that
    pass); ``probe`` is the fitted probe metric when ``config.task_metric`` is ``probe``;
    ``progress`` shows progress bars; path patching and the exact task-level checks run on
    ``engine``'s model replicas."""
    with progress_steps(progress) as steps:
        return _run(model, image_batches, atlas, config, probe, steps, engine)


def _run(model: HookedViT, image_batches: Callable[[], Iterable[torch.Tensor]], atlas: HeadAtlas, config: ComposeConfig,
         probe: TaskMetric | None, steps: Steps, engine: Engine) -> CompositionResult:
    scores = composition_scores(model, config.weights)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    if L < 2:
        return CompositionResult(scores, [], [], [], {}, [])
    metric = resolve_metric(model, config.task_metric, probe)
    senders = [(layer, head, atlas.row(layer, head).kind) for layer in range(L - 1) for head in range(H)]
    heads = [(layer, head) for layer, head, _ in senders]
    stats = ZStats.empty(model)
    generator = torch.Generator().manual_seed(config.patching.seed)
    grid = min(model.layout.rows, model.layout.cols)
    transfer_config = replace(config.transfer, radius=min(config.transfer.radius, (grid - 1) // 2))
    transfer_images = config.max_transfer_images if transfer_config.radius >= 1 else 0
    patch_batches, task_images_BCHW, transfer_batches = _samples(image_batches(), config, config.task_images > 0, transfer_images)
    pairs = [(x, shuffle_patches(x, model.cfg.patch_size, generator)) for x in patch_batches]
    for images_BCHW, _ in pairs:
        stats.update(model, images_BCHW)
    draws = {(layer, head): random_controls(layer, H, L) for layer, head in heads}
    clean = _patch(model, [x for x, _ in pairs], heads, stats, config.patching, steps("composition: path patching", len(pairs)), engine, draws)
    shuffled = _patch(model, [xs for _, xs in pairs], heads, stats, config.patching, steps("composition: shuffled images", len(pairs)), engine)
    kept_LH = attention_kept(model, pairs)
    task = task_evidence(model, task_images_BCHW, stats, metric, config, steps, engine) if task_images_BCHW is not None else None
    rows = edge_rows(scores, senders, clean, shuffled, kept_LH, task, model.layout.patch_start > 0, config)
    circuits = build_circuits(rows, config.criteria)
    ablations = {"modular/directional senders ablated": [(layer, head) for layer, head, kind in senders if kind in SENDER_KINDS]}
    supported = sorted({tuple(c["receivers"][0]) for c in circuits if c["verdict"] == "supported"})
    if supported:
        ablations["supported receivers ablated"] = supported
    transfer, transfer_skipped = {}, None if transfer_config.radius >= 1 else f"a patch grid {grid} wide has no ring of neighbours around an inner patch"
    if transfer_config.radius >= 1:
        try:
            transfer = transfer_curves(model, transfer_batches, transfer_config, {k: v for k, v in ablations.items() if v}, stats,
                                       config.patching.ablation, engine)
        except TooFewImages as err:
            transfer_skipped = f"too few images for the transfer probes: {err}"
    result = CompositionResult(scores, senders, rows, circuits, {"clean": clean.mean()[: len(heads)].numpy(), "shuffled": shuffled.mean().numpy()},
                               heads, transfer, transfer_skipped)
    if task is not None:
        result.attribution, result.attribution_direct = task.attribution_LHJLH, task.direct_LH
        result.task_effects = {edge: task.drops.mean(edge) for edge in task.checked}
        result.attribution_agreement = task.agreement(config.agreement_top)
        result.task_metric = task.description
    return result


PATCH_BATCH = 32
"""Images per path-patching batch when they are a sample."""


def _samples(batches: Iterable[torch.Tensor], config: ComposeConfig, want_task: bool,
             transfer_images: int | None) -> tuple[list[torch.Tensor], torch.Tensor | None, list[torch.Tensor]]:
    """One pass over the images for everything the stage needs: the path-patching batches (all
    images, or a seeded uniform sample of ``max_patch_images``; image folders are often sorted by
    class), with ``want_task`` the task-patching images (a seeded uniform sample of
    ``task_images``), and the batches of the first ``transfer_images`` images (None: all) for the
    transfer probes, which read them twice."""
    seed = config.patching.seed
    transfer: list[torch.Tensor] = []

    def keeping_transfer():
        seen = 0
        for images_BCHW in batches:
            if transfer_images is None or seen < transfer_images:
                transfer.append(images_BCHW if transfer_images is None else images_BCHW[: transfer_images - seen])
                seen += transfer[-1].shape[0]
            yield images_BCHW

    if config.max_patch_images is None:
        patch_batches = list(keeping_transfer())
        return patch_batches, _reservoir(patch_batches, [config.task_images], seed)[0] if want_task else None, transfer
    sizes = [config.max_patch_images, config.task_images] if want_task else [config.max_patch_images]
    patch_BCHW, *task = _reservoir(keeping_transfer(), sizes, seed)
    return list(patch_BCHW.split(PATCH_BATCH)), task[0] if want_task else None, transfer


@torch.no_grad()
def attention_kept(model: HookedViT, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> np.ndarray:
    """``[L, H]``: 1 − mean total-variation distance between each head's attention rows (patch
    queries, renormalised over patch keys) on an image and on its patch-shuffled copy, position
    by position. 1 for a head that attends by position alone."""
    start = model.layout.patch_start
    total, n = None, 0
    is_pattern = lambda name: name.endswith("hook_pattern")  # noqa: E731
    for images_BCHW, shuffled_BCHW in pairs:
        _, a = model.run_with_cache(images_BCHW, names_filter=is_pattern)
        _, b = model.run_with_cache(shuffled_BCHW, names_filter=is_pattern)
        pa = a.stack("blocks.{}.attn.hook_pattern", model.cfg.n_layers)[:, :, :, start:, start:].double()
        pb = b.stack("blocks.{}.attn.hook_pattern", model.cfg.n_layers)[:, :, :, start:, start:].double()
        pa, pb = pa / pa.sum(-1, keepdim=True), pb / pb.sum(-1, keepdim=True)
        tv_LH = 0.5 * (pa - pb).abs().sum(-1).mean(-1).sum(1)
        total = tv_LH if total is None else total + tv_LH
        n += images_BCHW.shape[0]
    return (1.0 - total / n).cpu().numpy()


def _reservoir(batches: Iterable[torch.Tensor], sizes: Sequence[int], seed: int) -> list[torch.Tensor]:
    """Seeded uniform samples of images (:func:`~vitcircuits.sampling.reservoir`), stacked."""
    images = (image_CHW for images_BCHW in batches for image_CHW in images_BCHW)
    return [torch.stack(sample) for sample in reservoir(images, sizes, seed)]
