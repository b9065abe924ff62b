"""What a sender head's output is replaced with when it is ablated.

A head that attends by position alone writes the same output at a given position for every
image, so per-position mean-ablation would leave it unchanged and it would look inert. The
default is therefore the mean over images *and* positions. Every table says which was used.

:func:`random_directions` gives the controls of an ablation: a change of the same norm as the
sender's, token by token, in a random direction.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from vitcircuits.models.hooked_vit import HookedViT
from vitcircuits.models.hooks import HookFn

AblationKind = Literal["mean", "position_mean", "zero", "resample"]


def check_ablation(kind: str) -> None:
    """Refuse an unknown ablation kind before any work is done."""
    if kind not in get_args(AblationKind):
        raise ValueError(f"unknown ablation {kind!r}; choose one of {', '.join(get_args(AblationKind))}")


@dataclass
class ZStats:
    """Running sums of every head's ``hook_z`` over images, overall and per token position."""

    sum_LHd: torch.Tensor
    sum_LNHd: torch.Tensor
    n_images: int = 0

    @classmethod
    def empty(cls, model: HookedViT) -> ZStats:
        cfg = model.cfg
        N = model.layout.n_tokens
        return cls(torch.zeros(cfg.n_layers, cfg.n_heads, cfg.d_head, dtype=torch.float64),
                   torch.zeros(cfg.n_layers, N, cfg.n_heads, cfg.d_head, dtype=torch.float64))

    @torch.no_grad()
    def update(self, model: HookedViT, images_BCHW: torch.Tensor) -> None:
        _, cache = model.run_with_cache(images_BCHW, names_filter=lambda n: n.endswith("attn.hook_z"))
        z_LBNHd = cache.stack("blocks.{}.attn.hook_z", model.cfg.n_layers).double().cpu()
        self.sum_LNHd += z_LBNHd.sum(1)
        self.sum_LHd += z_LBNHd.sum((1, 2))
        self.n_images += z_LBNHd.shape[1]

    def merge(self, other: ZStats) -> None:
        """Add the sums of other images."""
        self.sum_LHd += other.sum_LHd
        self.sum_LNHd += other.sum_LNHd
        self.n_images += other.n_images

    def mean_LHd(self) -> torch.Tensor:
        return (self.sum_LHd / (self.n_images * self.sum_LNHd.shape[1])).float()

    def position_mean_LNHd(self) -> torch.Tensor:
        return (self.sum_LNHd / self.n_images).float()


def ablated_z(kind: AblationKind, z_BNd: torch.Tensor, layer: int, head: int, stats: ZStats | None,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """The replacement for one head's ``z`` ``[B, N, Dh]`` in a batch.

    ``mean``: dataset mean over images and positions; ``position_mean``: dataset mean at each
    position; ``zero``; ``resample``: the same head's z from another image of the batch at a
    random other position (a derangement of images, and a permutation of positions).
    """
    if kind == "zero":
        return torch.zeros_like(z_BNd)
    if kind == "mean":
        return stats.mean_LHd()[layer, head].to(z_BNd).expand_as(z_BNd)
    if kind == "position_mean":
        return stats.position_mean_LNHd()[layer, :, head].to(z_BNd).expand_as(z_BNd)
    if kind == "resample":
        B, N, _ = z_BNd.shape
        image_perm = (torch.arange(B) + 1) % B if B > 1 else torch.zeros(1, dtype=torch.long)
        position_perm = torch.randperm(N, generator=generator)
        return z_BNd[image_perm][:, position_perm]
    raise ValueError(f"unknown ablation {kind!r}; choose mean, position_mean, zero or resample")


def ablation_hooks(heads: list[tuple[int, int]], kind: AblationKind, stats: ZStats | None,
                   generator: torch.Generator) -> list[tuple[str, HookFn]]:
    """``hook_z`` hooks replacing each head's ``z`` by :func:`ablated_z`."""
    def hook_for(layer: int, layer_heads: list[int]) -> HookFn:
        def replace(z_BNHd: torch.Tensor, hook) -> torch.Tensor:
            z_BNHd = z_BNHd.clone()
            for head in layer_heads:
                z_BNHd[:, :, head] = ablated_z(kind, z_BNHd[:, :, head], layer, head, stats, generator)
            return z_BNHd
        return replace

    layers = sorted({layer for layer, _ in heads})
    return [(f"blocks.{layer}.attn.hook_z", hook_for(layer, [h for at, h in heads if at == layer])) for layer in layers]


def random_directions(shape: Sequence[int], draw: int, seed: int) -> torch.Tensor:
    """Unit vectors along the last dim, i.i.d. Gaussian directions, the same for a given
    ``(seed, draw)`` whatever the edge."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + draw)
    x = torch.randn(*shape, generator=generator)
    return x / x.norm(dim=-1, keepdim=True)
