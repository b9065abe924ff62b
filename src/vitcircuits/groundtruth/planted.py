"""Hand-built HookedViTs whose layer-0 heads have known, position-only attention patterns.

They are ground truth for head detectors (the head atlas) and for composition tests: the
attention of every planted head is fixed by token positions, whatever the image.

Residual stream (``N`` tokens, ``C = content_dims``, width ``D = N + C + L*H*C``)::

    pos      [0, N)                   one-hot of the token index (value 1), written by pos_embed
    content  [N, N + C)               +c_m, -c_m pairs, c = content_scale * W_m . patch (patch
                                      tokens only; the patch embedding writes nothing else)
    out(l,h) [N + C + (l*H + h)*C, +C)  the only dims that head (l, h) writes

Why layer 0 is position-only: every token's residual has mean exactly ``1/D`` (one-hot plus
zero-sum content pairs) and variance ``var0 + |c|^2/D`` with ``|c|`` tiny, so ``blocks.0.ln1``
(weight ``sqrt(var0 + eps)``, bias ``1/D``) returns the one-hot on the pos dims up to a factor
``1 - O(|c|^2)``. A planted head's key is that one-hot (``W_K`` = identity on pos dims) and the
query of token ``i`` is ``sharpness * sqrt(Dh)`` times the indicator of its target set, so the
score is ``sharpness`` on targets and 0 elsewhere; the global head has zero query weights.

Every planted head has the same value/output map: ``W_V`` copies the content dims into the first
``C`` head dims, ``W_O`` copies those into ``out(0, h)``. So head ``(0, h)`` adds, at query ``i``,
``sum_j pattern[i, j] * content_j`` (the target average of the content code) to its own slice.
Heads that are not planted (layer-0 heads beyond the planted ones, every head of later layers)
are random "fillers": Q/K/V ~ N(0, 1/D) over the whole stream and a weak output (std
``filler_scale / sqrt(Dh)``) into their own slice; they are absent from ``truth``. MLP weights are
zero, so MLPs write nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from vitcircuits.models import HookedViT, TokenLayout, ViTConfig
from vitcircuits.models.hooked_vit import LayerNorm

MODULAR = "modular"
"""Attends uniformly to the 8 Chebyshev-radius-1 neighbours of a patch (not itself)."""
DIRECTIONAL = "directional"
"""Attends to the patch at a fixed offset ``(dy, dx)``; to itself where that patch does not exist."""
SELF = "self"
"""Attends to itself."""
SINK = "cls/sink"
"""Attends to the class token, or to the first register when there is no class token."""
GLOBAL = "global"
"""Attends uniformly to every token."""

NEIGHBOUR_OFFSETS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))
"""The 8 ``(dy, dx)`` offsets of a modular head's targets."""


@dataclass(frozen=True)
class PlantedConfig:
    """Shape and planted heads of a :func:`build_planted_heads` model.

    Layer-0 heads, in order: ``modular``, one ``directional`` head per entry of ``offsets``,
    ``self``, ``sink``, ``global``; then random fillers up to ``n_heads``.
    """

    grid: tuple[int, int] = (8, 8)
    """Patch-grid ``(rows, cols)``; images are ``grid * patch_size`` pixels."""
    patch_size: int = 4
    """Square patch side in pixels."""
    n_layers: int = 2
    """Blocks; only layer 0 has planted heads."""
    n_heads: int = 6
    """Heads per layer; at least ``4 + len(offsets)`` (the planted heads of layer 0)."""
    offsets: tuple[tuple[int, int], ...] = ((0, -1), (-1, 0))
    """``(dy, dx)`` of each directional head: ``(0, -1)`` is the patch to the left, ``(-1, 0)`` above."""
    class_token: bool = True
    """Prepend a class token (the sink head's target)."""
    registers: int = 0
    """Register tokens; without a class token the first register is the sink."""
    content_dims: int = 8
    """Residual dims holding image content (even: stored as +/- pairs)."""
    content_scale: float = 0.002
    """Gain of the content code relative to the positional one-hot (1). Patterns depend on the
    image only through logit changes of about ``sharpness * |c|^2 / 2``, where ``|c|`` is about
    ``content_scale * pixel_std * sqrt(content_dims)`` (< 0.01 logit for pixel std 3)."""
    sharpness: float = 12.0
    """Logit margin between a target and a non-target key (target mass >= 0.95 needs about
    ``log(19 * N)``)."""
    filler_scale: float = 0.1
    """Output gain of the random filler heads."""
    seed: int = 0
    """Seed of the content projection and the filler heads."""

    def __post_init__(self) -> None:
        if self.content_dims < 2 or self.content_dims % 2:
            raise ValueError(f"content_dims must be a positive even number, got {self.content_dims}")
        if not self.class_token and self.registers < 1:
            raise ValueError("the sink head needs a class token or at least one register")
        if any(offset == (0, 0) for offset in self.offsets) or len(set(self.offsets)) != len(self.offsets):
            raise ValueError(f"offsets must be distinct and non-zero, got {self.offsets}")
        if self.n_heads < len(self.planted_kinds):
            raise ValueError(f"n_heads={self.n_heads} is fewer than the {len(self.planted_kinds)} planted heads")

    @property
    def planted_kinds(self) -> tuple[str, ...]:
        """Kind of each planted layer-0 head, in head order."""
        return (MODULAR, *[DIRECTIONAL] * len(self.offsets), SELF, SINK, GLOBAL)

    @property
    def n_tokens(self) -> int:
        return int(self.class_token) + self.registers + self.grid[0] * self.grid[1]

    @property
    def d_model(self) -> int:
        return self.n_tokens + self.content_dims * (1 + self.n_layers * self.n_heads)

    @property
    def vit_config(self) -> ViTConfig:
        """The HookedViT architecture (planted and random models share it)."""
        return ViTConfig(
            d_model=self.d_model,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            d_head=max(self.n_tokens, self.content_dims),
            d_mlp=self.content_dims,
            patch_size=(self.patch_size, self.patch_size),
            img_size=(self.grid[0] * self.patch_size, self.grid[1] * self.patch_size),
            class_token=self.class_token,
            n_registers=self.registers,
            patch_bias=False,
            pooling="token" if self.class_token else "avg",
        )


@dataclass(frozen=True)
class PlantedModel:
    """A planted (or random) HookedViT with its ground truth."""

    model: HookedViT
    config: PlantedConfig
    truth: dict[tuple[int, int], str]
    """``(layer, head) -> kind`` for planted heads only (empty for :func:`random_like`)."""
    offsets: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)
    """``(layer, head) -> (dy, dx)`` of each directional head."""
    target_masks: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    """``(layer, head) -> [N, N]`` bool, ``[query, key]`` True where the key is a target."""

    @property
    def layout(self) -> TokenLayout:
        return self.model.layout

    @property
    def sink_index(self) -> int:
        """Token the sink head attends to: the class token, else the first register."""
        layout = self.layout
        return layout.cls_index if layout.cls_index is not None else layout.register_slice[0]

    @property
    def pos_slice(self) -> slice:
        """Residual dims of the positional one-hot."""
        return slice(0, self.config.n_tokens)

    @property
    def content_slice(self) -> slice:
        """Residual dims of the content code (+/- pairs)."""
        return slice(self.config.n_tokens, self.config.n_tokens + self.config.content_dims)

    def out_slice(self, layer: int, head: int) -> slice:
        """Residual dims that head ``(layer, head)`` writes (and nothing else writes)."""
        cfg = self.config
        start = cfg.n_tokens + cfg.content_dims * (1 + layer * cfg.n_heads + head)
        return slice(start, start + cfg.content_dims)


def target_mask(kind: str, layout: TokenLayout, offset: tuple[int, int] | None = None, sink: int | None = None) -> torch.Tensor:
    """``[N, N]`` bool ``[query, key]``: the keys a head of ``kind`` attends to.

    Prefix-token queries attend to themselves except for the sink and global kinds; patch
    queries of a modular head with no neighbour (1x1 grid) and of a directional head whose
    offset leaves the grid attend to themselves too.
    """
    N = layout.n_tokens
    mask_NN = torch.zeros(N, N, dtype=torch.bool)
    if kind == GLOBAL:
        return mask_NN.fill_(True)
    if kind == SINK:
        mask_NN[:, sink] = True
        return mask_NN
    mask_NN.fill_diagonal_(True)
    if kind == SELF:
        return mask_NN
    deltas = NEIGHBOUR_OFFSETS if kind == MODULAR else (offset,)
    for row in range(layout.rows):
        for col in range(layout.cols):
            keys = [
                layout.patch_index(row + dy, col + dx)
                for dy, dx in deltas
                if 0 <= row + dy < layout.rows and 0 <= col + dx < layout.cols
            ]
            if keys:
                query = layout.patch_index(row, col)
                mask_NN[query, query] = False
                mask_NN[query, keys] = True
    return mask_NN


def build_planted_heads(cfg: PlantedConfig) -> PlantedModel:
    """A HookedViT whose layer-0 heads are planted as described in the module docstring."""
    vit_cfg = cfg.vit_config
    model = HookedViT(vit_cfg).eval()
    generator = torch.Generator().manual_seed(cfg.seed)
    N, C, D, H, Dh = cfg.n_tokens, cfg.content_dims, vit_cfg.d_model, vit_cfg.n_heads, vit_cfg.d_head
    planted = PlantedModel(model=model, config=cfg, truth={})
    sink = planted.sink_index
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        for module in model.modules():
            if isinstance(module, LayerNorm):
                module.weight.fill_(1.0)
        fan_in = 3 * cfg.patch_size**2
        content_W_mP = torch.randn(C // 2, fan_in, generator=generator) * cfg.content_scale / math.sqrt(fan_in)
        conv_W = model.embed.proj.weight.view(D, fan_in)
        conv_W[N : N + C : 2] = content_W_mP
        conv_W[N + 1 : N + C : 2] = -content_W_mP
        model.pos_embed[0, :, :N] = torch.eye(N)
        var0 = (D - 1) / D**2  # variance of a one-hot: ln1 then maps the pure positional code to itself
        model.blocks[0].ln1.weight.fill_(math.sqrt(var0 + vit_cfg.ln_eps))
        model.blocks[0].ln1.bias.fill_(1.0 / D)
        directional = iter(cfg.offsets)
        for layer, block in enumerate(model.blocks):
            W_Q, W_K, W_V = block.attn.qkv.weight.view(3, H, Dh, D).unbind(0)
            W_O_DHd = block.attn.proj.weight.view(D, H, Dh)
            for head in range(H):
                out = planted.out_slice(layer, head)
                if layer > 0 or head >= len(cfg.planted_kinds):
                    for W in (W_Q, W_K, W_V):
                        W[head] = torch.randn(Dh, D, generator=generator) / math.sqrt(D)
                    W_O_DHd[out, head] = torch.randn(C, Dh, generator=generator) * cfg.filler_scale / math.sqrt(Dh)
                    continue
                kind = cfg.planted_kinds[head]
                offset = next(directional) if kind == DIRECTIONAL else None
                mask_NN = target_mask(kind, model.layout, offset=offset, sink=sink)
                if kind != GLOBAL:
                    W_Q[head, :N, :N] = cfg.sharpness * math.sqrt(Dh) * mask_NN.T.to(W_Q.dtype)
                W_K[head, :N, :N] = torch.eye(N)
                W_V[head, :C, N : N + C] = torch.eye(C)
                W_O_DHd[out, head, :C] = torch.eye(C)
                planted.truth[(layer, head)] = kind
                planted.target_masks[(layer, head)] = mask_NN
                if offset is not None:
                    planted.offsets[(layer, head)] = offset
    return planted


def random_like(cfg: PlantedConfig) -> PlantedModel:
    """Negative control: the same architecture with HookedViT's random init (seeded by
    ``cfg.seed``) and an empty ``truth``."""
    model = HookedViT(cfg.vit_config).eval()
    model.init_weights(generator=torch.Generator().manual_seed(cfg.seed))
    return PlantedModel(model=model, config=cfg, truth={})
