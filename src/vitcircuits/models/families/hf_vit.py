"""transformers ViT, DeiT and CLIP-vision → HookedViT: :func:`convert` reads a loaded transformers
model's modules by role and returns ``(ViTConfig, state_dict)``, and nothing else (loading,
hashing and the hub are :mod:`vitcircuits.models.loading`'s). Both the transformers 5 module layout
(``attention.q_proj``, ``mlp.fc1``) and the 4.x one (``attention.attention.query``,
``intermediate.dense``) are understood.
"""
from __future__ import annotations

import torch
from torch import nn

from vitcircuits.models.config import ViTConfig
from vitcircuits.models.families import UnsupportedModelError
from vitcircuits.models.families.timm_vit import resample_pos_embed

_ACTIVATIONS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "quick_gelu": "quick_gelu"}
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}
_ROLES = {
    "q": ("attention.q_proj", "attention.attention.query", "self_attn.q_proj"),
    "k": ("attention.k_proj", "attention.attention.key", "self_attn.k_proj"),
    "v": ("attention.v_proj", "attention.attention.value", "self_attn.v_proj"),
    "o": ("attention.o_proj", "attention.output.dense", "self_attn.out_proj"),
    "ln1": ("layernorm_before", "layer_norm1"),
    "ln2": ("layernorm_after", "layer_norm2"),
    "fc1": ("mlp.fc1", "intermediate.dense"),
    "fc2": ("mlp.fc2", "output.dense"),
}


def _find(module: nn.Module, paths: tuple[str, ...]) -> nn.Module:
    for path in paths:
        try:
            return module.get_submodule(path)
        except AttributeError:
            continue
    raise UnsupportedModelError(f"{type(module).__name__} has none of the submodules {paths}")


def _layers(encoder_owner: nn.Module) -> nn.ModuleList:
    return _find(encoder_owner, ("layers", "encoder.layer", "encoder.layers"))


def _activation(name: str) -> str:
    if name not in _ACTIVATIONS:
        raise UnsupportedModelError(f"activation {name!r} is not supported")
    return _ACTIVATIONS[name]


def _linear_state(prefix: str, linear: nn.Linear) -> dict[str, torch.Tensor]:
    out = {f"{prefix}.weight": linear.weight}
    if linear.bias is not None:
        out[f"{prefix}.bias"] = linear.bias
    return out


def _blocks_state(layers: nn.ModuleList) -> dict[str, torch.Tensor]:
    state = {}
    for i, layer in enumerate(layers):
        q, k, v = (_find(layer, _ROLES[r]) for r in "qkv")
        state[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q.weight, k.weight, v.weight])
        if q.bias is not None:
            state[f"blocks.{i}.attn.qkv.bias"] = torch.cat([q.bias, k.bias, v.bias])
        state |= _linear_state(f"blocks.{i}.attn.proj", _find(layer, _ROLES["o"]))
        for role in ("ln1", "ln2"):
            state |= _linear_state(f"blocks.{i}.{role}", _find(layer, _ROLES[role]))
        for role in ("fc1", "fc2"):
            state |= _linear_state(f"blocks.{i}.mlp.{role}", _find(layer, _ROLES[role]))
    return state


def _base_config(hf_cfg, img_size, **fields) -> ViTConfig:
    size = img_size or hf_cfg.image_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    patch = hf_cfg.patch_size
    return ViTConfig(
        d_model=hf_cfg.hidden_size,
        n_layers=hf_cfg.num_hidden_layers,
        n_heads=hf_cfg.num_attention_heads,
        d_head=hf_cfg.hidden_size // hf_cfg.num_attention_heads,
        d_mlp=hf_cfg.intermediate_size,
        patch_size=(patch, patch) if isinstance(patch, int) else tuple(patch),
        img_size=size,
        in_chans=hf_cfg.num_channels,
        activation=_activation(hf_cfg.hidden_act),
        ln_eps=hf_cfg.layer_norm_eps,
        **fields,
    )


def convert_vit_or_deit(model: nn.Module, img_size) -> tuple[ViTConfig, dict[str, torch.Tensor]]:
    """``ViTModel``/``ViTForImageClassification``/``DeiT*`` (with or without teacher head)."""
    hf_cfg = model.config
    backbone = getattr(model, hf_cfg.model_type, model)
    emb = backbone.embeddings
    heads = [m for m in (getattr(model, n, None) for n in ("classifier", "cls_classifier")) if isinstance(m, nn.Linear)]
    dist = getattr(model, "distillation_classifier", None)
    has_dist = getattr(emb, "distillation_token", None) is not None
    if getattr(backbone, "pooler", None) is not None:
        raise UnsupportedModelError("the pooler layer (dense + tanh) is not supported; load without add_pooling_layer")
    cfg = _base_config(
        hf_cfg,
        img_size,
        qkv_bias=getattr(hf_cfg, "qkv_bias", True),
        dist_token=has_dist,
        dist_head=isinstance(dist, nn.Linear),
        n_classes=heads[0].out_features if heads else 0,
    )
    state = {
        "cls_token": emb.cls_token,
        "pos_embed": resample_pos_embed(emb.position_embeddings, cfg, (hf_cfg.image_size, hf_cfg.image_size)),
        **_linear_state("embed.proj", emb.patch_embeddings.projection),
        **_blocks_state(_layers(backbone)),
        **_linear_state("ln_final", backbone.layernorm),
    }
    if has_dist:
        state["dist_token"] = emb.distillation_token
    if heads:
        state |= _linear_state("head", heads[0])
    if isinstance(dist, nn.Linear):
        state |= _linear_state("head_dist", dist)
    return cfg, state


def convert_clip_vision(model: nn.Module, img_size) -> tuple[ViTConfig, dict[str, torch.Tensor]]:
    """``CLIPVisionModel``/``CLIPVisionModelWithProjection``/``CLIPModel`` (vision tower)."""
    vision = getattr(model, "vision_model", model)
    hf_cfg = vision.config
    proj = getattr(model, "visual_projection", None)
    emb = vision.embeddings
    cfg = _base_config(
        hf_cfg,
        img_size,
        patch_bias=emb.patch_embedding.bias is not None,
        pre_norm=True,
        final_norm="pooled",
        n_classes=proj.out_features if proj is not None else 0,
        head_bias=proj is not None and proj.bias is not None,
    )
    state = {
        "cls_token": emb.class_embedding.view(1, 1, -1),
        "pos_embed": resample_pos_embed(emb.position_embedding.weight[None], cfg, (hf_cfg.image_size, hf_cfg.image_size)),
        **_linear_state("embed.proj", emb.patch_embedding),
        **_linear_state("ln_pre", vision.pre_layrnorm),
        **_blocks_state(_layers(vision.encoder)),
        **_linear_state("ln_final", vision.post_layernorm),
    }
    if proj is not None:
        state |= _linear_state("head", proj)
    return cfg, state


CONVERTERS = {"vit": convert_vit_or_deit, "deit": convert_vit_or_deit, "clip_vision_model": convert_clip_vision, "clip": convert_clip_vision}
"""transformers ``model_type`` → converter."""


def convert(model: nn.Module, model_type: str, img_size) -> tuple[ViTConfig, dict[str, torch.Tensor]]:
    """A transformers model of ``model_type`` as ``(ViTConfig, HookedViT state dict)``."""
    if model_type not in CONVERTERS:
        raise UnsupportedModelError(f"transformers model_type {model_type!r} is not supported (vit, deit, clip)")
    return CONVERTERS[model_type](model, img_size)


def pretrained_cfg_from_processor(processor: dict, cfg: ViTConfig) -> dict:
    """A timm-style pretrained_cfg from a transformers ``preprocessor_config.json``."""
    size = processor.get("size") or {}
    squash = "height" in size
    return {
        "input_size": [cfg.in_chans, *cfg.img_size],
        "interpolation": _RESAMPLE.get(processor.get("resample", 2), "bilinear"),
        "crop_pct": 1.0,
        "crop_mode": "squash" if squash else "center",
        "mean": list(processor.get("image_mean", (0.5, 0.5, 0.5))),
        "std": list(processor.get("image_std", (0.5, 0.5, 0.5))),
    }
