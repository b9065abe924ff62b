"""Task-level path patching: how much a classifier's answer depends on one ``sender → receiver →
q/k/v`` edge.

One edge is path-ablated at a time: the receiver head's query, key or value input is computed from the
residual stream with the sender head's output replaced by its mean-ablated output
(:class:`~vitcircuits.composition.ablation.ZStats` mean over images and positions); every other
head, including the receiver's other inputs, sees the clean stream, and the rest of the model runs
on from there. The edge's **task effect** is the mean drop of the target class's logit margin
(:func:`margin`; the target is the label, or the model's clean prediction); the drops of the
target's log-probability and of the accuracy are kept beside it.

Path patching into the receiver (:mod:`vitcircuits.composition.patching`) asks whether the
receiver's attention or output changes; this asks whether the model's answer does. A head pair can
compose strongly in a way the task does not use, or weakly in the one way it does. The organism
benchmark (:mod:`vitcircuits.groundtruth.organism_benchmark`) takes these effects, measured on many
fresh images, as the organism's ground truth.

:func:`edge_drops` is the same ablation for any :class:`~vitcircuits.composition.task_metric.TaskMetric`
(a classifier's margin, a backbone's final tokens, a probe), per image, with random-direction
controls: the receiver reads a change of the sender's per-token norm in a seeded random direction.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vitcircuits.composition.ablation import ZStats, random_directions
from vitcircuits.composition.patching import PATHS
from vitcircuits.composition.task_metric import TaskMetric, margin
from vitcircuits.models.hooked_vit import HookedViT

EdgeKey = tuple[int, int, int, int, str]
"""``(sender_layer, sender_head, receiver_layer, receiver_head, input)``."""


def _head_output(model: HookedViT, layer: int, head: int, z_BNd: torch.Tensor) -> torch.Tensor:
    """What head ``(layer, head)`` with ``z`` adds to the residual stream (bias excluded) ``[B, N, D]``;
    ``W_O`` includes the block's layer-scale."""
    return z_BNd @ model.W_O[layer, head]


def _ln1(block, x_BND: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x_BND, block.ln1.weight.shape, block.ln1.weight, block.ln1.bias, block.ln1.eps)


@torch.no_grad()
def edge_logits(model: HookedViT, images_BCHW: torch.Tensor, edge: EdgeKey, stats: ZStats,
                direction_BND: torch.Tensor | None = None, metric: TaskMetric | None = None) -> torch.Tensor:
    """The model's output (logits ``[B, C]`` for a classifier; what ``metric`` reads, when given)
    with the one path ``edge`` mean-ablated (see the module docstring). With ``direction_BND``
    (unit vectors per token), the receiver instead reads a change of the same per-token norm as
    the sender's, in that direction: a random-direction control."""
    sl, sh, rl, rh, kind = edge
    if not sl < rl:
        raise ValueError(f"edge {edge}: the sender must be in an earlier layer than the receiver")
    mean_d = stats.mean_LHd()[sl, sh].to(images_BCHW.device, model.dtype)
    block = model.blocks[rl]
    d_head, n_heads = model.cfg.d_head, model.cfg.n_heads
    saved: dict[str, torch.Tensor] = {}

    def sender_delta(z_BNHd, hook):
        delta_BND = _head_output(model, sl, sh, mean_d.expand_as(z_BNHd[:, :, sh]) - z_BNHd[:, :, sh])
        if direction_BND is not None:
            delta_BND = direction_BND.to(delta_BND) * delta_BND.norm(dim=-1, keepdim=True)
        saved["delta"] = delta_BND
        return z_BNHd

    def resid(x_BND, hook):
        saved["resid"] = x_BND
        return x_BND

    def receiver_input(t_BNHd, hook):
        x_BND = _ln1(block, saved["resid"] + saved["delta"])
        row = PATHS.index(kind) * n_heads * d_head + rh * d_head
        weight_dD = block.attn.qkv.weight[row : row + d_head]
        bias_d = block.attn.qkv.bias[row : row + d_head] if block.attn.qkv.bias is not None else None
        t_BNHd = t_BNHd.clone()
        t_BNHd[:, :, rh] = F.linear(x_BND, weight_dD, bias_d)
        return t_BNHd

    hooks = [(f"blocks.{sl}.attn.hook_z", sender_delta), (f"blocks.{rl}.hook_resid_pre", resid), (f"blocks.{rl}.attn.hook_{kind}", receiver_input)]
    with model.hooks(hooks):
        return metric.output(model, images_BCHW) if metric is not None else model(images_BCHW)


def all_edges(model: HookedViT, sender_layers: Sequence[int] | None = None) -> list[EdgeKey]:
    """Every ``(sender, later receiver, q/k/v)`` triple, senders from ``sender_layers`` (default all)."""
    cfg = model.cfg
    layers = range(cfg.n_layers) if sender_layers is None else sender_layers
    return [(sl, sh, rl, rh, kind) for sl in layers for sh in range(cfg.n_heads) for rl in range(sl + 1, cfg.n_layers)
            for rh in range(cfg.n_heads) for kind in PATHS]


@torch.no_grad()
def task_edge_effects(model: HookedViT, images_BCHW: torch.Tensor, labels_B: torch.Tensor, edges: Sequence[EdgeKey], stats: ZStats,
                      batch_size: int = 500) -> dict[EdgeKey, dict[str, float]]:
    """Per edge, on these images with that one path mean-ablated: ``margin_drop`` (mean drop of
    :func:`margin`), ``logprob_drop`` (of the target's log-probability) and ``accuracy_drop``
    (agreement with ``labels_B``: true labels, or the clean predictions)."""
    images_BCHW = images_BCHW.to(model.device, model.dtype)
    chunks = [(images_BCHW[s : s + batch_size], labels_B[s : s + batch_size].to(images_BCHW.device)) for s in range(0, len(labels_B), batch_size)]

    def score(logits_of) -> torch.Tensor:
        totals = torch.zeros(3, dtype=torch.float64)
        for images, labels in chunks:
            logits_BC = logits_of(images).double()
            totals += torch.stack([margin(logits_BC, labels).sum(), logits_BC.log_softmax(-1).gather(1, labels[:, None]).sum(),
                                   (logits_BC.argmax(-1) == labels).double().sum()]).cpu()
        return totals / len(labels_B)

    clean = score(model)
    out = {}
    for edge in edges:
        drop = (clean - score(lambda images: edge_logits(model, images, edge, stats))).tolist()
        out[edge] = dict(zip(("margin_drop", "logprob_drop", "accuracy_drop"), drop))
    return out


@dataclass
class EdgeDrops:
    """Per-image drops of a :class:`~vitcircuits.composition.task_metric.TaskMetric` with single
    edges path-ablated, and of their random-direction controls."""

    clean_I: torch.Tensor
    """The metric on the clean run, per image (float64, CPU)."""
    drops: dict[EdgeKey, torch.Tensor] = field(default_factory=dict)
    """Edge -> ``[I]`` drop per image."""
    random: dict[EdgeKey, list[float]] = field(default_factory=dict)
    """Edge -> the mean drop of each random-direction draw (same per-token norm as the edge's change)."""

    def mean(self, edge: EdgeKey) -> float:
        return float(self.drops[edge].mean())


@torch.no_grad()
def edge_drops(model: HookedViT, images_BCHW: torch.Tensor, targets: torch.Tensor, edges: Sequence[EdgeKey], stats: ZStats,
               metric: TaskMetric, n_random: Mapping[EdgeKey, int] | None = None, seed: int = 0, batch_size: int = 256,
               into: EdgeDrops | None = None, advance: Callable[[], None] = lambda: None) -> EdgeDrops:
    """The drop of ``metric`` per image for each edge of ``edges`` (skipping those already in
    ``into``), and random-direction controls of it up to ``n_random[edge]`` draws (draw ``k`` is the
    same direction for every edge). ``targets`` come from :meth:`TaskMetric.targets` on the clean
    outputs; without ``into`` the clean run is measured here. ``advance`` is called after every
    ablated run."""
    images_BCHW = images_BCHW.to(model.device, model.dtype)
    n = len(images_BCHW)
    spans = [(s, min(n, s + batch_size)) for s in range(0, n, batch_size)]

    def values(output_of) -> torch.Tensor:
        return torch.cat([metric.value(output_of(s, e).double(), targets[s:e].to(model.device)).cpu() for s, e in spans])

    out = into if into is not None else EdgeDrops(values(lambda s, e: metric.output(model, images_BCHW[s:e])))
    for edge in edges:
        if edge not in out.drops:
            out.drops[edge] = out.clean_I - values(lambda s, e: edge_logits(model, images_BCHW[s:e], edge, stats, metric=metric))
            advance()
    wanted = n_random or {}
    for draw in range(max(wanted.values(), default=0)):
        directions = None
        for edge, k in wanted.items():
            if draw >= k or len(out.random.get(edge, [])) != draw:  # draws below ``draw`` are there already
                continue
            if directions is None:
                directions = random_directions((n, model.layout.n_tokens, model.cfg.d_model), draw, seed)
            drop = out.clean_I - values(lambda s, e: edge_logits(model, images_BCHW[s:e], edge, stats, directions[s:e], metric))
            out.random.setdefault(edge, []).append(float(drop.mean()))
            advance()
    return out
