"""Scanning images into a head atlas: attention statistics accumulated batch by batch, then
metrics, kinds and baselines (:func:`~vitcircuits.heads.atlas.build_atlas`)."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from rich.console import Console

from vitcircuits.heads.atlas import AtlasConfig, HeadAtlas, accumulate, build_atlas, new_accumulator
from vitcircuits.models.hooked_vit import HookedViT

N_OVERLAY_HEADS = 4
N_OVERLAY_IMAGES = 3


def scan_heads(model: HookedViT, batches: Iterable, config: AtlasConfig, model_id: str) -> tuple[HeadAtlas, list[tuple[int, str, torch.Tensor]]]:
    """Accumulate over all ``batches`` (each with ``images_BCHW``, ``indices`` and ``paths``, the
    image ids); also keep a few images (index, id, tensor) for overlays."""
    acc = new_accumulator(model, config)
    kept: list[tuple[int, str, torch.Tensor]] = []
    for batch in batches:
        accumulate(model, acc, batch.images_BCHW, list(batch.indices))
        room = N_OVERLAY_IMAGES - len(kept)
        kept += [(batch.indices[j], batch.paths[j], batch.images_BCHW[j : j + 1]) for j in range(min(room, len(batch.indices)))]
    return build_atlas(model, acc, config, model_id), kept


def overlay_heads(atlas: HeadAtlas) -> list[tuple[int, int]]:
    """The heads shown on real images: the most modular ones (by modular_score)."""
    ranked = sorted(atlas.rows, key=lambda r: -r.modular_score)
    return [(r.layer, r.head) for r in ranked[:N_OVERLAY_HEADS]]


def summarize(atlas: HeadAtlas) -> str:
    counts = {}
    for r in atlas.rows:
        counts[r.kind] = counts.get(r.kind, 0) + 1
    modular = ", ".join(f"L{layer}H{head}" for layer, head in atlas.heads_of_kind("modular")) or "none"
    return f"kinds: {counts}; modular heads: {modular}"


def print_summary(atlas: HeadAtlas) -> None:
    Console(stderr=True).print(summarize(atlas))
