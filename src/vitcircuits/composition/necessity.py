"""Is a circuit necessary? Accuracy per class group with the circuit's heads ablated, against as
many random heads of the same layers.

A head is ablated by replacing its ``blocks.L.attn.hook_z[:, :, h]`` with
:func:`~vitcircuits.composition.ablation.ablated_z` (default ``mean``: the mean over the images and
positions, from a :class:`~vitcircuits.composition.ablation.ZStats` of the same images). If the
heads are the circuit that solves some classes, those classes fall towards chance within their
group while the others stay, and random heads of the same layers do much less.

Class groups name sets of class indices (e.g. ``compositional`` and ``single_patch`` for the
shapes organism, whose ``config.json`` declares them as ``class_groups``); the
accuracy within a group counts a prediction correct only when it is the true class, so chance
within a group is ``1 / n_classes`` of the model, and ``1 / len(group)`` is also reported for a
model that still knows the group but not the class.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vitcircuits.composition.ablation import AblationKind, ZStats, ablation_hooks, check_ablation
from vitcircuits.engine import ImagePass
from vitcircuits.models.hooked_vit import HookedViT

Head = tuple[int, int]
Groups = Mapping[str, Sequence[int]]


@dataclass(frozen=True)
class NecessityConfig:
    """How the circuit and the random baselines are ablated."""

    draws: int = 20
    """Random head sets (each: as many heads per layer as the circuit has there, other heads first)."""
    ablation: AblationKind = "mean"
    """What an ablated head's ``z`` becomes (see :func:`~vitcircuits.composition.ablation.ablated_z`)."""
    seed: int = 0
    """Seeds the random head draws (and ``resample`` ablation)."""

    def __post_init__(self) -> None:
        check_ablation(self.ablation)


def circuit_heads(circuits: Iterable[dict], verdicts: Sequence[str] = ("supported",)) -> list[Head]:
    """Every sender and receiver head of the circuits (``circuits.json`` rows) with one of ``verdicts``."""
    heads = {(int(layer), int(head)) for c in circuits if c["verdict"] in verdicts for layer, head in [*c["senders"], *c["receivers"]]}
    return sorted(heads)


def random_heads_like(heads: Sequence[Head], n_heads: int, generator: np.random.Generator) -> list[Head]:
    """As many random heads in each layer as ``heads`` has there, drawn from the layer's other heads
    first; circuit heads are added only when too few others are left."""
    circuit = {tuple(h) for h in heads}
    chosen: list[Head] = []
    for layer in sorted({h[0] for h in circuit}):
        k = sum(1 for h in circuit if h[0] == layer)
        others = [h for h in range(n_heads) if (layer, h) not in circuit]
        picked = [int(h) for h in generator.choice(others, size=min(k, len(others)), replace=False)]
        if len(picked) < k:
            rest = [h for h in range(n_heads) if h not in picked]
            picked += [int(h) for h in generator.choice(rest, size=k - len(picked), replace=False)]
        chosen += [(layer, h) for h in sorted(picked)]
    return chosen


def _in_group(labels_B: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    return torch.isin(labels_B, torch.tensor(sorted(classes), dtype=labels_B.dtype))


def group_accuracy(predictions_B: torch.Tensor, labels_B: torch.Tensor, groups: Groups) -> dict[str, float]:
    """``overall`` and one accuracy per class group; every group must hold images."""
    correct_B = (predictions_B == labels_B).double()
    report = {"overall": float(correct_B.mean())}
    for name, classes in groups.items():
        in_group_B = _in_group(labels_B, classes)
        if not in_group_B.any():
            raise ValueError(f"class group {name!r} has no labelled image")
        report[name] = float(correct_B[in_group_B].mean())
    return report


class LabelledBatches:
    """Re-iterable ``(images_BCHW, labels_B)`` of the labelled images (label ≥ 0) among ``batches``
    (an iterable of :class:`~vitcircuits.data.loader.ImageBatch`, e.g. ``ImageOptions.batches``)."""

    def __init__(self, batches: Iterable) -> None:
        self.batches = batches

    def __iter__(self):
        for batch in self.batches:
            if (pair := labelled(batch)) is not None:
                yield pair


def labelled(batch) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(images_BCHW, labels_B)`` of the labelled images (label ≥ 0) of an image batch, or None."""
    if batch.labels_B is None or not (keep_B := batch.labels_B >= 0).any():
        return None
    return batch.images_BCHW[keep_B], batch.labels_B[keep_B]


@dataclass(frozen=True)
class ZStatsPass(ImagePass[ZStats]):
    """:func:`zstats_of` as an :class:`~vitcircuits.engine.ImagePass` over image batches (of the
    labelled images, or with ``labelled_only=False`` of every image)."""

    labelled_only: bool = True

    def start(self, model: HookedViT) -> ZStats:
        return ZStats.empty(model)

    def step(self, model: HookedViT, stats: ZStats, batch) -> ZStats:
        pair = labelled(batch) if self.labelled_only else (batch.images_BCHW, batch.labels_B)
        if pair is not None:
            stats.update(model, pair[0].to(model.device, model.dtype))
        return stats

    def merge(self, first: ZStats, later: ZStats) -> ZStats:
        first.merge(later)
        return first


@dataclass(frozen=True)
class PredictionsPass(ImagePass[dict[str, list[torch.Tensor]]]):
    """:func:`ablated_predictions` as an :class:`~vitcircuits.engine.ImagePass` over image batches:
    ``{condition: predictions, "labels": labels}`` lists, in image order. The ``resample``
    ablation is seeded per batch by its first image index, so any split of the images gives the
    same predictions."""

    conditions: dict[str, list[Head]]
    stats: ZStats | None
    config: NecessityConfig

    def start(self, model: HookedViT) -> dict[str, list[torch.Tensor]]:
        return {"labels": [], **{name: [] for name in self.conditions}}

    def step(self, model: HookedViT, part: dict[str, list[torch.Tensor]], batch) -> dict[str, list[torch.Tensor]]:
        if (pair := labelled(batch)) is not None:
            generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + int(batch.indices[0]))
            hooks = _condition_hooks(self.conditions, self.stats, self.config, generator)
            for name, predictions_B in _predict(model, pair[0], hooks).items():
                part[name].append(predictions_B)
            part["labels"].append(pair[1].cpu())
        return part

    def merge(self, first: dict[str, list[torch.Tensor]], later: dict[str, list[torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
        return {name: first[name] + later[name] for name in first}


@torch.no_grad()
def zstats_of(model: HookedViT, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> ZStats:
    """Every head's ``hook_z`` sums over the images of ``batches`` (for mean ablation)."""
    stats = ZStats.empty(model)
    for images_BCHW, _ in batches:
        stats.update(model, images_BCHW.to(model.device, model.dtype))
    return stats


@torch.no_grad()
def ablated_predictions(model: HookedViT, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], conditions: Mapping[str, Sequence[Head]],
                        stats: ZStats | None, config: NecessityConfig = NecessityConfig()) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Predicted classes under every condition (name -> heads to ablate; no heads: clean), in one
    pass over ``batches`` of ``(images_BCHW, labels_B)``; returns ``({name: predictions_B}, labels_B)``."""
    hooks = _condition_hooks(conditions, stats, config, torch.Generator().manual_seed(config.seed))
    predictions: dict[str, list[torch.Tensor]] = {name: [] for name in conditions}
    labels = []
    for images_BCHW, labels_B in batches:
        labels.append(labels_B.cpu())
        for name, predictions_B in _predict(model, images_BCHW, hooks).items():
            predictions[name].append(predictions_B)
    return joined_predictions({"labels": labels, **predictions})


def _condition_hooks(conditions: Mapping[str, Sequence[Head]], stats: ZStats | None, config: NecessityConfig,
                     generator: torch.Generator) -> dict[str, list]:
    return {name: ablation_hooks(list(heads), config.ablation, stats, generator) if heads else [] for name, heads in conditions.items()}


@torch.no_grad()
def _predict(model: HookedViT, images_BCHW: torch.Tensor, hooks: Mapping[str, list]) -> dict[str, torch.Tensor]:
    images_BCHW = images_BCHW.to(model.device, model.dtype)
    predictions = {}
    for name, condition_hooks in hooks.items():
        with model.hooks(condition_hooks):
            predictions[name] = model(images_BCHW).argmax(-1).cpu()
    return predictions


def joined_predictions(parts: dict[str, list[torch.Tensor]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``({condition: predictions_B}, labels_B)`` from per-batch lists."""
    if not parts["labels"]:
        raise ValueError("no labelled images: necessity needs class labels (a labels.tsv beside the images, or class folders)")
    return {name: torch.cat(p) for name, p in parts.items() if name != "labels"}, torch.cat(parts["labels"])


def necessity_conditions(heads: Sequence[Head], n_heads: int, config: NecessityConfig) -> dict[str, list[Head]]:
    """What is ablated: nothing (``clean``), the ``circuit`` heads, and ``config.draws`` random
    same-layer head sets (``random0`` …)."""
    circuit = sorted({(int(layer), int(head)) for layer, head in heads})
    if not circuit:
        raise ValueError("no circuit heads to ablate (no circuit with the requested verdict)")
    generator = np.random.default_rng(config.seed)
    draws = [random_heads_like(circuit, n_heads, generator) for _ in range(config.draws)]
    return {"clean": [], "circuit": circuit, **{f"random{i}": d for i, d in enumerate(draws)}}


def necessity_report(model: HookedViT, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], heads: Sequence[Head], groups: Groups,
                     config: NecessityConfig = NecessityConfig(), stats: ZStats | None = None) -> dict:
    """Clean accuracy, accuracy with ``heads`` ablated, and with ``config.draws`` random same-layer
    head sets ablated (each draw's numbers, and their mean, std and 5-95 % range), per group. A
    group with no labelled image is left out, with the reason, in ``groups_left_out``.

    ``batches`` must be re-iterable when ``stats`` is None (one pass for the statistics, one for
    the predictions); the statistics default to those of the same images. (On an image set with an
    engine: :class:`ZStatsPass`, :class:`PredictionsPass`, then :func:`assemble_report`.)
    """
    conditions = necessity_conditions(heads, model.cfg.n_heads, config)
    stats = stats if stats is not None else zstats_of(model, batches)
    predictions, labels_B = ablated_predictions(model, batches, conditions, stats, config)
    return assemble_report(model, conditions, predictions, labels_B, groups, config)


def assemble_report(model: HookedViT, conditions: Mapping[str, Sequence[Head]], predictions: Mapping[str, torch.Tensor],
                    labels_B: torch.Tensor, groups: Groups, config: NecessityConfig) -> dict:
    """The report of :func:`necessity_report` from the predictions under every condition."""
    circuit = list(conditions["circuit"])
    draws = [conditions[f"random{i}"] for i in range(config.draws)]
    empty = sorted(name for name, classes in groups.items() if not _in_group(labels_B, classes).any())
    groups = {name: classes for name, classes in groups.items() if name not in empty}
    accuracy = {name: group_accuracy(p, labels_B, groups) for name, p in predictions.items()}
    keys = ["overall", *groups]
    random_rows = [{"heads": [list(h) for h in d], "overlap_with_circuit": len(set(d) & set(circuit)), **accuracy[f"random{i}"]}
                   for i, d in enumerate(draws)]

    def summary(key: str) -> dict:
        values = np.array([row[key] for row in random_rows], dtype=float)
        return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                "p05": float(np.quantile(values, 0.05)), "p95": float(np.quantile(values, 0.95)),
                "fraction_at_or_below_circuit": float((values <= accuracy["circuit"][key]).mean())}

    return {
        "n_images": len(labels_B),
        "n_classes": model.cfg.n_classes,
        "ablation": config.ablation,
        "seed": config.seed,
        "groups": {name: sorted(int(c) for c in classes) for name, classes in groups.items()},
        "groups_left_out": {name: "no labelled image of its classes among these images" for name in empty},
        "chance": {"model": 1.0 / model.cfg.n_classes, **{name: 1.0 / len(classes) for name, classes in groups.items()}},
        "clean": accuracy["clean"],
        "circuit": {"heads": [list(h) for h in circuit], **accuracy["circuit"]},
        "random": {"n_draws": config.draws, **({key: summary(key) for key in keys} if draws else {}), "draws": random_rows},
    }


def format_report(report: dict) -> str:
    """A text table of :func:`necessity_report`: clean, circuit ablated, random heads (mean ± std)."""
    keys = ["overall", *report["groups"]]
    lines = [f"{'condition':<26}" + "".join(f"{key:>20}" for key in keys),
             f"{'clean':<26}" + "".join(f"{report['clean'][key]:>20.3f}" for key in keys),
             f"{'circuit heads ablated':<26}" + "".join(f"{report['circuit'][key]:>20.3f}" for key in keys)]
    if report["random"]["n_draws"]:
        random = report["random"]
        lines.append(f"{'random heads (mean ± std)':<26}" + "".join(f"{random[key]['mean']:>12.3f} ± {random[key]['std']:.3f}" for key in keys))
    return "\n".join(lines)
