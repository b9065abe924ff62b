"""timm ``VisionTransformer`` / ``VisionTransformerDistilled`` → HookedViT."""
from __future__ import annotations

import re

import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Attention as TimmAttention
from timm.models.vision_transformer import Block as TimmBlock
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vitcircuits.models.config import ViTConfig
from vitcircuits.models.families import UnsupportedModelError

_KEY_RULES = [
    (r"^patch_embed\.proj\.", "embed.proj."),
    (r"^reg_token$", "reg_tokens"),
    (r"^norm_pre\.", "ln_pre."),
    (r"^blocks\.(\d+)\.norm1\.", r"blocks.\1.ln1."),
    (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.ln2."),
    (r"^norm\.", "ln_final."),
    (r"^fc_norm\.", "ln_final."),
]


def build_meta(arch: str, **model_args) -> nn.Module:
    """The timm model for ``arch`` on the meta device: its structure, without allocating weights."""
    try:
        return timm.create_model(arch, pretrained=False, device="meta", **model_args)
    except RuntimeError as err:
        raise UnsupportedModelError(f"timm cannot build architecture {arch!r}: {err}") from err


def _activation(act: nn.Module) -> str:
    if isinstance(act, nn.GELU):
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    if isinstance(act, timm.layers.GELU):
        return "gelu"
    if isinstance(act, timm.layers.GELUTanh):
        return "gelu_tanh"
    if isinstance(act, timm.layers.QuickGELU):
        return "quick_gelu"
    raise UnsupportedModelError(f"MLP activation {type(act).__name__} is not supported")


def _require(condition: bool, feature: str) -> None:
    if not condition:
        raise UnsupportedModelError(f"timm model uses {feature}, which HookedViT does not implement")


def config_from_timm(model: nn.Module) -> ViTConfig:
    """Read a :class:`ViTConfig` off a (meta-device) timm ViT, refusing unsupported features."""
    _require(isinstance(model, VisionTransformer), f"class {type(model).__name__} (not a VisionTransformer)")
    _require(model.attn_pool is None, "attention pooling")
    _require(model.pos_embed is not None, "no absolute position embedding")
    _require(not model.pool_include_prefix, "pooling over prefix tokens")
    _require(model.global_pool in ("token", "avg", ""), f"global_pool={model.global_pool!r}")
    _require(isinstance(model.patch_embed.norm, nn.Identity), "a norm in the patch embedding")
    block = model.blocks[0]
    _require(type(block) is TimmBlock, f"block type {type(block).__name__}")
    attn, mlp = block.attn, block.mlp
    _require(type(attn) is TimmAttention, f"attention type {type(attn).__name__}")
    _require(isinstance(attn.q_norm, nn.Identity) and isinstance(attn.norm, nn.Identity), "qk/scale norm")
    _require(getattr(attn, "gate", None) is None, "gated attention")
    _require(hasattr(mlp, "fc1") and hasattr(mlp, "fc2") and isinstance(mlp.norm, nn.Identity), f"MLP type {type(mlp).__name__}")
    _require(isinstance(block.norm1, nn.LayerNorm), f"norm type {type(block.norm1).__name__}")
    final = "pooled" if isinstance(model.fc_norm, nn.LayerNorm) else "tokens" if isinstance(model.norm, nn.LayerNorm) else "none"
    head = model.head if isinstance(model.head, nn.Linear) else None
    return ViTConfig(
        d_model=model.embed_dim,
        n_layers=len(model.blocks),
        n_heads=attn.num_heads,
        d_head=attn.head_dim,
        d_mlp=mlp.fc1.out_features,
        patch_size=tuple(model.patch_embed.patch_size),
        img_size=tuple(model.patch_embed.img_size),
        in_chans=model.patch_embed.proj.in_channels,
        class_token=model.cls_token is not None,
        dist_token=isinstance(model, VisionTransformerDistilled),
        n_registers=model.num_reg_tokens,
        pos_embed_prefix=not model.no_embed_class,
        patch_bias=model.patch_embed.proj.bias is not None,
        qkv_bias=attn.qkv.bias is not None,
        layer_scale=not isinstance(block.ls1, nn.Identity),
        pre_norm=isinstance(model.norm_pre, nn.LayerNorm),
        final_norm=final,
        pooling={"token": "token", "avg": "avg", "": "none"}[model.global_pool],
        activation=_activation(mlp.act),
        ln_eps=block.norm1.eps,
        n_classes=head.out_features if head is not None else 0,
        head_bias=head is None or head.bias is not None,
    )


def convert_state_dict(
    state_dict: dict[str, torch.Tensor], cfg: ViTConfig, source_img_size: tuple[int, int] | None = None
) -> dict[str, torch.Tensor]:
    """Rename timm keys to HookedViT keys and resample position embeddings to ``cfg``'s grid
    exactly as timm does (bicubic, antialiased, prefix tokens kept). ``source_img_size`` is the
    resolution the checkpoint was trained at; a square grid is assumed when it is unknown."""
    out = {}
    for key, value in state_dict.items():
        new_key = key
        for pattern, repl in _KEY_RULES:
            new_key = re.sub(pattern, repl, new_key)
        if new_key == "pos_embed":
            value = resample_pos_embed(value, cfg, source_img_size)
        out[new_key] = value
    return out


def resample_pos_embed(pos: torch.Tensor, cfg: ViTConfig, source_img_size: tuple[int, int] | None) -> torch.Tensor:
    """Position embeddings ``[1, prefix + grid, D]`` resampled to ``cfg``'s grid as timm does
    (bicubic, antialiased, prefix tokens kept); ``source_img_size`` is the resolution they were
    trained at (a square grid is assumed when it is None or does not fit)."""
    n_prefix = cfg.n_prefix if cfg.pos_embed_prefix else 0
    old_grid = None
    if source_img_size is not None:
        candidate = (source_img_size[0] // cfg.patch_size[0], source_img_size[1] // cfg.patch_size[1])
        old_grid = candidate if candidate[0] * candidate[1] == pos.shape[1] - n_prefix else None
    return resample_abs_pos_embed(pos, new_size=list(cfg.grid), old_size=old_grid, num_prefix_tokens=n_prefix)
