"""The ``compose`` stage: weight scores for all pairs; path patching of every head in the layers
that hold the atlas's modular and directional heads (each head's layer-mates are its controls);
the patch-shuffle control; verdicts."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from vitcircuits.composition.ablation import ZStats
from vitcircuits.composition.attribution import AttributionSums, agreement, attribution_batch
from vitcircuits.composition.circuits import EFFECT_OF_KIND, VerdictCriteria, build_circuits, control_stats
from vitcircuits.composition.patching import METRICS, PATHS, PatchEffects, PatchingConfig, path_patch_batch
from vitcircuits.composition.shuffle import shuffle_patches
from vitcircuits.composition.task_patching import EdgeKey, all_edges, task_edge_effects
from vitcircuits.composition.transfer import TransferConfig, TransferResult, transfer_curves
from vitcircuits.composition.weights import CompositionConfig, CompositionScores, composition_scores
from vitcircuits.heads.atlas import HeadAtlas
from vitcircuits.models.hooked_vit import HookedViT

SENDER_KINDS = ("modular", "directional")


@dataclass(frozen=True)
class ComposeConfig:
    """Settings of the composition stage."""

    weights: CompositionConfig = field(default_factory=CompositionConfig)
    """Weight-score settings (LN folding, centring, baseline samples)."""
    patching: PatchingConfig = field(default_factory=PatchingConfig)
    """Ablation kind (default: mean over images and positions) and radius."""
    criteria: VerdictCriteria = field(default_factory=VerdictCriteria)
    """Verdict thresholds."""
    max_patch_images: int | None = 64
    """Images used for path patching and the shuffle control, a seeded uniform sample of all
    (image folders are often sorted by class); None: all."""
    n_fallback_senders: int = 4
    """When the atlas finds no modular or directional head, the layers of this many heads with the
    highest modular_score become the sender layers."""
    top_receivers: int = 3
    """Candidate receivers kept per sender and input kind (by the larger of the two z-scores)."""
    transfer: TransferConfig = field(default_factory=TransferConfig)
    """Neighbour → centre probes (radius is capped to what the grid allows)."""
    max_transfer_images: int | None = 512
    """Images for the transfer probes (None: all)."""
    attribution_top: int = 40
    """The rank agreement of attribution with exact patching is also reported over this many
    patched triples with the largest estimates."""
    task_images: int = 64
    """Classifiers only: images (a seeded uniform sample of all) for task-level path patching, the
    drop of the margin of the model's clean prediction with one edge ablated
    (:mod:`~vitcircuits.composition.task_patching`); 0: off."""
    max_task_edges: int = 300
    """Task-level patching covers every edge when the model has at most this many (a small
    organism), else the ``task_candidates`` candidate rows with the largest weight or patch z."""
    task_candidates: int = 24
    """Candidate rows patched at task level on a larger model: each costs ``task_images`` forward passes."""


@dataclass
class CompositionResult:
    """Everything the composition stage measured; :mod:`vitcircuits.composition.outputs` writes it."""

    scores: CompositionScores
    senders: list[tuple[int, int, str]]
    """Patched heads with their atlas kind: all heads of the layers that hold a modular or directional head."""
    candidates: list[dict]
    circuits: list[dict]
    effects: dict[str, np.ndarray]
    """``clean``/``shuffled``: path-patching effects ``[S, 3 paths, L, H, metrics]`` of the patched senders."""
    patched: list[tuple[int, int]]
    """Heads patched, in ``effects`` order."""
    transfer: dict[str, TransferResult] = field(default_factory=dict)
    """Receptive-field probes: ``clean`` and with the sender heads / supported receivers ablated."""
    attribution: np.ndarray | None = None
    """Attribution-patching estimates ``[sender L, sender H, 3 paths, receiver L, receiver H]`` of every triple."""
    attribution_agreement: dict = field(default_factory=dict)
    """Rank agreement of attribution with exact path patching (:func:`~vitcircuits.composition.attribution.agreement`)."""
    task_effects: dict = field(default_factory=dict)
    """Task-level path patching: ``(sender L, H, receiver L, H, input)`` -> margin, log-prob and accuracy drops."""


def choose_sender_layers(atlas: HeadAtlas, n_fallback: int) -> list[int]:
    """Layers holding a modular or directional head (not the last layer, which has no receivers);
    if there are none, the layers of the ``n_fallback`` heads with the highest modular_score."""
    rows = [r for r in atlas.rows if r["layer"] < atlas.n_layers - 1]
    layers = {r["layer"] for r in rows if r["kind"] in SENDER_KINDS}
    if not layers:
        layers = {r["layer"] for r in sorted(rows, key=lambda r: -r["modular_score"])[:n_fallback]}
    return sorted(layers)


def _patch(model: HookedViT, batches: Iterable[torch.Tensor], heads: list[tuple[int, int]], stats: ZStats, config: PatchingConfig) -> PatchEffects:
    effects = PatchEffects(heads, model.cfg.n_layers, model.cfg.n_heads)
    for images_BCHW in batches:
        path_patch_batch(model, images_BCHW, heads, effects, stats, config)
    return effects


def run_composition(model: HookedViT, image_batches: Callable[[], Iterable[torch.Tensor]], atlas: HeadAtlas, config: ComposeConfig) -> CompositionResult:
    """Everything but writing files. ``image_batches()`` yields fresh image batches each call."""
    scores = composition_scores(model, config.weights)
    sender_layers = choose_sender_layers(atlas, config.n_fallback_senders)
    if not sender_layers:
        return CompositionResult(scores, [], [], [], {}, [])
    senders = [(layer, head, atlas.row(layer, head)["kind"]) for layer in sender_layers for head in range(model.cfg.n_heads)]
    heads = [(layer, head) for layer, head, _ in senders]
    stats = ZStats.empty(model)
    generator = torch.Generator().manual_seed(config.patching.seed)
    patch_batches, task_images_BCHW = _samples(image_batches, config, want_task=bool(model.cfg.n_classes and config.task_images))
    pairs = [(x, shuffle_patches(x, model.cfg.patch_size, generator)) for x in patch_batches]
    for images_BCHW, _ in pairs:
        stats.update(model, images_BCHW)
    clean = _patch(model, [x for x, _ in pairs], heads, stats, config.patching)
    attribution = AttributionSums(model.cfg.n_layers, model.cfg.n_heads)
    for images_BCHW, _ in pairs:
        attribution_batch(model, images_BCHW, attribution, stats, config.patching.ablation, config.patching.radius, config.patching.seed)
    estimates = attribution.mean().numpy()
    shuffled = _patch(model, [xs for _, xs in pairs], heads, stats, config.patching)
    kept_LH = attention_kept(model, pairs)
    candidates = _candidates(scores, senders, clean, shuffled, kept_LH, config)
    task = _task_effects(model, task_images_BCHW, candidates, stats, config) if task_images_BCHW is not None else {}
    for row in candidates:
        row["task_effect"] = task.get(_key(row), {}).get("margin_drop")
    circuits = build_circuits(candidates, config.criteria)
    ablations = {"modular/directional senders ablated": [(layer, head) for layer, head, kind in senders if kind in SENDER_KINDS]}
    supported = sorted({tuple(c["receivers"][0]) for c in circuits if c["verdict"] == "supported"})
    if supported:
        ablations["supported receivers ablated"] = supported
    rows, cols = model.layout.rows, model.layout.cols
    transfer_config = replace(config.transfer, radius=min(config.transfer.radius, (min(rows, cols) - 1) // 2))
    transfer = {}
    if transfer_config.radius >= 1:
        batches = _Reiterable(_limited(image_batches, config.max_transfer_images))
        transfer = transfer_curves(model, batches, transfer_config, {k: v for k, v in ablations.items() if v}, stats, config.patching.ablation)
    return CompositionResult(scores, senders, candidates, circuits, {"clean": clean.mean().numpy(), "shuffled": shuffled.mean().numpy()},
                             heads, transfer, estimates, agreement(estimates, clean.mean().numpy(), heads, config.attribution_top), task)


def _key(row: dict) -> EdgeKey:
    return row["sender_layer"], row["sender_head"], row["receiver_layer"], row["receiver_head"], row["kind"]


@torch.no_grad()
def _task_effects(model: HookedViT, images_BCHW: torch.Tensor, candidates: list[dict], stats: ZStats,
                  config: ComposeConfig) -> dict[EdgeKey, dict[str, float]]:
    """Task-level path patching of every edge (or the candidates, on a large model) on these
    images, against the model's clean predictions."""
    targets_B = torch.cat([model(images_BCHW[s : s + 64]).argmax(-1) for s in range(0, len(images_BCHW), 64)])
    edges = all_edges(model)
    if len(edges) > config.max_task_edges:
        strongest = sorted(candidates, key=lambda r: -max(r["weight_z"], r["patch_z"]))[: config.task_candidates]
        edges = [_key(r) for r in strongest]
    return task_edge_effects(model, images_BCHW, targets_B, edges, stats)


PATCH_BATCH = 32
"""Images per path-patching batch when they are a sample."""


def _samples(image_batches: Callable[[], Iterable[torch.Tensor]], config: ComposeConfig,
             want_task: bool) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """One pass over the images for both: the path-patching batches (all images, or a seeded
    uniform sample of ``max_patch_images``; image folders are often sorted by class) and, with
    ``want_task``, the task-patching images (a seeded uniform sample of ``task_images``)."""
    seed = config.patching.seed
    if config.max_patch_images is None:
        patch_batches = list(image_batches())
        return patch_batches, _reservoir(patch_batches, [config.task_images], seed)[0] if want_task else None
    sizes = [config.max_patch_images, config.task_images] if want_task else [config.max_patch_images]
    patch_BCHW, *task = _reservoir(image_batches(), sizes, seed)
    return list(patch_BCHW.split(PATCH_BATCH)), task[0] if want_task else None


class _Reiterable:
    """An iterable that calls a generator function on every iteration."""

    def __init__(self, make: Callable[[], Iterable[torch.Tensor]]) -> None:
        self.make = make

    def __iter__(self):
        return iter(self.make())


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


def _limited(image_batches: Callable[[], Iterable[torch.Tensor]], max_images: int | None) -> Callable[[], Iterable[torch.Tensor]]:
    def gen():
        seen = 0
        for images_BCHW in image_batches():
            if max_images is not None and seen >= max_images:
                return
            take = images_BCHW if max_images is None else images_BCHW[: max_images - seen]
            seen += take.shape[0]
            yield take
    return gen


def _candidates(scores: CompositionScores, senders, clean: PatchEffects, shuffled: PatchEffects, kept_LH: np.ndarray,
                config: ComposeConfig) -> list[dict]:
    """Every patched head is a sender; its layer-mates are its controls."""
    patched = [(layer, head) for layer, head, _ in senders]
    clean_mean, shuffled_mean = clean.mean().numpy(), shuffled.mean().numpy()
    index = {head: i for i, head in enumerate(patched)}
    L, H = clean_mean.shape[2:4]
    rows = []
    for s_idx, (sl, sh, sender_kind) in enumerate(senders):
        controls = [(sl, h) for h in range(H) if h != sh]
        for p, kind in enumerate(PATHS):
            metric = METRICS.index(EFFECT_OF_KIND[kind].removeprefix("patch_"))
            weight_z, weight = scores.z(kind), scores.scores(kind)
            per_receiver = []
            for rl in range(sl + 1, L):
                for rh in range(H):
                    effect_of = {head: clean_mean[index[head], p, rl, rh, metric] for head in patched if head[0] == sl}
                    control_mean, control_std = control_stats(effect_of, (sl, sh), controls)
                    effect = float(effect_of[(sl, sh)])
                    mates = np.array([weight[sl, h, rl, rh] for h in range(H) if h != sh])
                    weight_within = (weight[sl, sh, rl, rh] - mates.mean()) / max(mates.std(ddof=1) if mates.size > 1 else 0.0, 1e-6)
                    per_receiver.append({
                        "sender_layer": sl, "sender_head": sh, "sender_kind": sender_kind, "receiver_layer": rl, "receiver_head": rh,
                        "kind": kind, "weight_score": float(weight[sl, sh, rl, rh]), "baseline_mean": scores.baseline_mean[kind],
                        "baseline_std": scores.baseline_std[kind], "weight_z": float(weight_z[sl, sh, rl, rh]),
                        "weight_z_within": float(weight_within),
                        "patch_effect": effect, "control_mean": control_mean, "control_std": control_std,
                        "patch_z": (effect - control_mean) / control_std, "ablation": config.patching.ablation,
                        "shuffle_effect": float(shuffled_mean[s_idx, p, rl, rh, metric]),
                        "attention_kept": float(kept_LH[rl, rh]),
                    })
            per_receiver.sort(key=lambda r: -max(r["weight_z"], r["patch_z"]))
            rows.extend(per_receiver[: config.top_receivers])
    return rows


def _reservoir(batches: Iterable[torch.Tensor], sizes: Sequence[int], seed: int) -> list[torch.Tensor]:
    """Uniform random samples of ``n`` images (all, if fewer) for each ``n`` of ``sizes``, from one
    pass over a stream of batches with memory for the samples only (reservoir sampling, each with
    its own generator seeded ``seed``); each sample in stream order."""
    generators = [torch.Generator().manual_seed(seed) for _ in sizes]
    kept: list[list[tuple[int, torch.Tensor]]] = [[] for _ in sizes]
    seen = 0
    for images_BCHW in batches:
        for image_CHW in images_BCHW:
            for n, sample, generator in zip(sizes, kept, generators):
                if len(sample) < n:
                    sample.append((seen, image_CHW))
                else:
                    slot = int(torch.randint(seen + 1, (1,), generator=generator))
                    if slot < n:
                        sample[slot] = (seen, image_CHW)
            seen += 1
    return [torch.stack([image for _, image in sorted(sample, key=lambda item: item[0])]) for sample in kept]
