"""The evidence of every edge: the task-level part (edge attribution, exact checks and their
nulls) and one row per edge with its three lines of evidence and its verdict
(:mod:`~vitcircuits.composition.circuits` defines them)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from vitcircuits.composition.ablation import ZStats
from vitcircuits.composition.circuits import EdgeRow, verdict
from vitcircuits.composition.config import ComposeConfig
from vitcircuits.composition.edge_attribution import (
    EdgeAttribution,
    EdgeAttributionConfig,
    attribution_chunk,
    edge_attribution_batch,
    spearman,
)
from vitcircuits.composition.evidence import MIN_NULL, Line, below_floor, bootstrap_intervals, fill_count, judge
from vitcircuits.composition.patching import METRICS, PATHS, QUERY_SETS, VERDICT_METRIC, PatchEffects
from vitcircuits.composition.task_metric import TaskMetric
from vitcircuits.composition.task_patching import EdgeDrops, EdgeKey, all_edges, edge_drops
from vitcircuits.composition.weights import CompositionScores
from vitcircuits.engine import LOCAL, Engine
from vitcircuits.models.hooked_vit import HookedViT

Steps = Callable[[str, int], Callable[[], None]]
"""``steps(description, total)`` starts a progress bar and returns its ``advance()``."""


def no_steps(description: str, total: int) -> Callable[[], None]:
    return lambda: None


@dataclass
class TaskEvidence:
    """What the task-level part of the stage measured."""

    attribution_LHJLH: np.ndarray
    """Attributed drops ``[sender L, sender H, 3 paths, receiver L, receiver H]``."""
    direct_LH: np.ndarray
    """Attributed drops of the direct paths sender → output."""
    drops: EdgeDrops
    """Exact per-image drops of the checked edges, their null senders and random controls."""
    checked: list[EdgeKey]
    """Edges checked exactly: all, or the top of the attribution."""
    null_senders: dict[EdgeKey, list[EdgeKey]]
    """Per checked edge at or above the floor: the other-sender edges of its null."""
    floor: float
    description: dict

    def estimate(self, edge: EdgeKey) -> float:
        sl, sh, rl, rh, kind = edge
        return float(self.attribution_LHJLH[sl, sh, PATHS.index(kind), rl, rh])

    def agreement(self, n_top: int) -> dict:
        """Spearman correlation of the attributed and the exact drops over the checked edges, and
        over the ``n_top`` of them with the largest exact drops."""
        exact = np.array([self.drops.mean(e) for e in self.checked])
        est = np.array([self.estimate(e) for e in self.checked])
        top = np.argsort(-exact)[:n_top]
        rho = lambda a, b: spearman(a, b) if len(a) > 1 and np.ptp(a) > 0 and np.ptp(b) > 0 else None  # noqa: E731
        return {"n_checked": len(self.checked), "spearman_checked": rho(est, exact), "n_top": int(top.size),
                "spearman_top": rho(est[top], exact[top])}


CHECK_CHUNK = 8
"""Ablated runs per unit of spread work (edges, or random-direction draws)."""


def _drops_chunk(images_BCHW: torch.Tensor, targets: torch.Tensor, stats: ZStats, metric: TaskMetric, seed: int, clean_I: torch.Tensor,
                 model: HookedViT, item: tuple[list[EdgeKey], dict[EdgeKey, int]]):
    edges, n_random = item
    part = edge_drops(model, images_BCHW, targets, edges, stats, metric, n_random, seed=seed, into=EdgeDrops(clean_I))
    return part.drops, part.random


def spread_drops(engine: Engine, model: HookedViT, images_BCHW: torch.Tensor, targets: torch.Tensor, edges: Sequence[EdgeKey],
                 stats: ZStats, metric: TaskMetric, n_random: dict[EdgeKey, int], seed: int, into: EdgeDrops,
                 advance_of: Callable[[int], Callable[[], None]]) -> None:
    """:func:`~vitcircuits.composition.task_patching.edge_drops` of the edges not yet in ``into``
    and their random draws, in chunks of about :data:`CHECK_CHUNK` runs spread over ``engine``'s
    model replicas (``advance_of(n_chunks)`` gives the progress callback). Each edge and each draw
    is computed alone, so the chunking does not change the result."""
    units = [([e], {}) for e in edges if e not in into.drops] + [([], {e: k}) for e, k in n_random.items() if k]
    chunks: list[tuple[list[EdgeKey], dict[EdgeKey, int]]] = []
    cost = CHECK_CHUNK
    for unit_edges, unit_random in units:
        if cost >= CHECK_CHUNK:
            chunks.append(([], {}))
            cost = 0
        chunks[-1][0].extend(unit_edges)
        chunks[-1][1].update(unit_random)
        cost += len(unit_edges) + sum(unit_random.values())
    fn = partial(_drops_chunk, images_BCHW.cpu(), targets.cpu(), stats, metric, seed, into.clean_I)
    for drops, random in engine.map_items(model, fn, chunks, advance_of(len(chunks))):
        into.drops.update(drops)
        into.random.update(random)


def _attribute_chunk(metric: TaskMetric, stats: ZStats, config: EdgeAttributionConfig, model: HookedViT,
                     item: tuple[torch.Tensor, torch.Tensor]) -> EdgeAttribution:
    """The attribution sums of one chunk of images (``item``: images and their targets)."""
    sums = EdgeAttribution(model.cfg.n_layers, model.cfg.n_heads)
    images_BCHW, targets = item
    edge_attribution_batch(model, images_BCHW.to(model.device, model.dtype), targets.to(model.device), metric, stats, sums, config)
    return sums


@torch.no_grad()
def task_evidence(model: HookedViT, images_BCHW: torch.Tensor, stats: ZStats, metric: TaskMetric, config: ComposeConfig,
                  steps: Steps = no_steps, engine: Engine = LOCAL) -> TaskEvidence:
    """Edge attribution over every edge, exact checks of all edges (small model) or of the top
    ``task_candidates``, and the nulls of the checked edges that reach the floor; the checks run
    on ``engine``'s model replicas. ``steps`` reports progress."""
    H = model.cfg.n_heads
    images_BCHW = images_BCHW.to(model.device, model.dtype)
    chunks = images_BCHW.split(attribution_chunk(model))
    clean = [metric.output(model, x) for x in chunks]
    targets_chunks = [metric.targets(out) for out in clean]
    clean_I = torch.cat([metric.value(out.double(), t) for out, t in zip(clean, targets_chunks)]).cpu()
    targets = torch.cat(targets_chunks)
    sums = EdgeAttribution(model.cfg.n_layers, H)
    items = [(x.cpu(), t.cpu()) for x, t in zip(chunks, targets_chunks)]
    attribute = partial(_attribute_chunk, metric, stats, config.attribution)
    for part in engine.map_items(model, attribute, items, steps("composition: edge attribution", len(chunks))):
        sums.merge(part)
    est_LHJLH, direct_LH = (t.numpy() for t in sums.mean())
    edges = all_edges(model)
    everything = len(edges) <= config.max_task_edges
    estimate = lambda e: est_LHJLH[e[0], e[1], PATHS.index(e[4]), e[2], e[3]]  # noqa: E731
    checked = edges if everything else sorted(edges, key=lambda e: -estimate(e))[: config.task_candidates]
    seed = config.patching.seed
    drops = EdgeDrops(clean_I)
    spread_drops(engine, model, images_BCHW, targets, checked, stats, metric, {}, seed, drops, partial(steps, "composition: exact checks"))
    floor = metric.floor(drops.clean_I)
    null_senders, n_random = {}, {}
    for edge in checked:
        if drops.mean(edge) < floor:
            continue
        sl, sh, rl, rh, kind = edge
        earlier = [(layer, head) for layer in range(rl) for head in range(H)]
        if not everything and len(earlier) > MIN_NULL + 1:
            rng = np.random.default_rng([seed, rl, rh, PATHS.index(kind)])
            earlier = [earlier[i] for i in sorted(rng.choice(len(earlier), MIN_NULL + 1, replace=False))]
        others = [(layer, head, rl, rh, kind) for layer, head in earlier if (layer, head) != (sl, sh)][: len(earlier) if everything else MIN_NULL]
        null_senders[edge] = others
        n_random[edge] = fill_count(len(others))
    needed = sorted({other for others in null_senders.values() for other in others})
    spread_drops(engine, model, images_BCHW, targets, needed, stats, metric, n_random, seed, drops,
                 partial(steps, "composition: nulls of the checks"))
    description = {"kind": metric.kind, "probe": metric.probe_CD is not None, "n_images": len(images_BCHW),
                   "target": {"embedding": "the clean final tokens", "margin": "the clean prediction"}[metric.kind],
                   "clean_mean": float(drops.clean_I.mean()), "floor": floor, "attribution_steps": config.attribution.steps,
                   "n_edges": len(edges), "n_checked": len(checked), "n_null_edges": len(needed)}
    return TaskEvidence(est_LHJLH, direct_LH, drops, checked, null_senders, floor, description)


def _matters_lines(task: TaskEvidence, n_boot: int, seed: int) -> dict[EdgeKey, Line]:
    values_IE = np.stack([task.drops.drops[e].numpy() for e in task.checked], axis=1)
    lo_E, hi_E = bootstrap_intervals(values_IE, n_boot, seed)
    lines = {}
    for j, edge in enumerate(task.checked):
        effect = task.drops.mean(edge)
        if edge not in task.null_senders:
            lines[edge] = below_floor(effect, lo_E[j], hi_E[j], task.floor)
            continue
        others = task.null_senders[edge]
        null = [task.drops.mean(o) for o in others] + task.drops.random.get(edge, [])[: fill_count(len(others))]
        lines[edge] = judge(effect, lo_E[j], hi_E[j], null, task.floor)
    return lines


def edge_rows(scores: CompositionScores, senders: list[tuple[int, int, str]], clean: PatchEffects, shuffled: PatchEffects,
              kept_LH: np.ndarray, task: TaskEvidence | None, has_prefix: bool, config: ComposeConfig) -> list[EdgeRow]:
    """One row per edge whose sender is in ``senders`` (module docstring of
    :mod:`~vitcircuits.composition.circuits`)."""
    S = len(senders)
    index = {(layer, head): i for i, (layer, head, _) in enumerate(senders)}
    fills_of: dict[tuple[int, int], list[int]] = {}
    for j, (layer, head, _, _) in enumerate(clean.randoms):
        fills_of.setdefault((layer, head), []).append(S + j)
    per_image = clean.per_image().double().numpy()
    I, _, P, L, H, Q = per_image.shape
    mean = per_image.mean(0)
    lo, hi = (a.reshape(S, P, L, H, Q) for a in bootstrap_intervals(per_image[:, :S].reshape(I, -1), config.n_boot, config.patching.seed))
    shuffled_mean = shuffled.mean().numpy()
    matters = _matters_lines(task, config.n_boot, config.patching.seed) if task is not None else {}
    query_sets = QUERY_SETS if has_prefix else QUERY_SETS[:1]
    weights = {kind: (scores.scores(kind), scores.z(kind), scores.silent[kind]) for kind in PATHS}
    rows = []
    for i, (sl, sh, sender_kind) in enumerate(senders):
        for p, kind in enumerate(PATHS):
            weight, weight_z, silent = weights[kind]
            floor = config.criteria.composes_floor(kind)
            for rl in range(sl + 1, L):
                others = [index[(layer, head)] for layer in range(rl) for head in range(H) if (layer, head) != (sl, sh)]
                null_rows = others + fills_of.get((sl, sh), [])[: fill_count(len(others))]
                for rh in range(H):
                    lines = {qs: judge(mean[i, p, rl, rh, q], lo[i, p, rl, rh, q], hi[i, p, rl, rh, q], mean[null_rows, p, rl, rh, q], floor)
                             for q, qs in enumerate(query_sets)}
                    read_at = [qs for qs, line in lines.items() if line.beyond]
                    edge = (sl, sh, rl, rh, kind)
                    line = matters.get(edge)
                    earlier = np.delete(weight[:rl, :, rl, rh].ravel(), sl * H + sh)
                    rows.append(EdgeRow(**{
                        "sender_layer": sl, "sender_head": sh, "sender_kind": sender_kind, "receiver_layer": rl, "receiver_head": rh,
                        "kind": kind, "verdict": verdict(bool(read_at), line.beyond if line else None),
                        "silent": bool(silent[sl, sh, rl, rh]), "read_at": read_at,
                        "composes_patch": lines["patch"].as_dict(), "composes_prefix": lines["prefix"].as_dict() if "prefix" in lines else None,
                        "ablation": config.patching.ablation, "matters": line.as_dict() if line else None,
                        "attribution": task.estimate(edge) if task is not None else None,
                        "weight_score": float(weight[sl, sh, rl, rh]), "baseline_mean": scores.baseline_mean[kind],
                        "baseline_std": scores.baseline_std[kind], "weight_z": float(weight_z[sl, sh, rl, rh]),
                        "weight_percentile": float((earlier < weight[sl, sh, rl, rh]).mean()) if earlier.size else None,
                        "shuffle_effect": float(shuffled_mean[i, p, rl, rh, METRICS.index(VERDICT_METRIC[kind])]),
                        "attention_kept": float(kept_LH[rl, rh]),
                    }))
    return rows
