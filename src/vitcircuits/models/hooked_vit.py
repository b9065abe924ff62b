"""HookedViT: one readable implementation of the pre-norm ViT family, with hook points.

Data flow (names are the hook points)::

    images_BCHW ─ embed ─ hook_embed ─(+ prefix tokens, + hook_pos_embed)─ ln_pre?
      └─ blocks.l: hook_resid_pre ─ ln1 ─ attn ─ ls1 ─ hook_attn_out ─(+)─ hook_resid_mid
                   ─ ln2 ─ mlp ─ ls2 ─ hook_mlp_out ─(+)─ hook_resid_post
      └─ ln_final (tokens or pooled) ─ pool ─ head (+ head_dist for DeiT)

Attention uses PyTorch's fused scaled-dot-product kernel unless a hook asks for the scores or
the pattern; then it is computed explicitly, so ``hook_pattern`` is exactly what the model uses.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vitcircuits.models.config import ViTConfig
from vitcircuits.models.hooks import HookedRootModule, HookPoint
from vitcircuits.models.weights import WeightViewsMixin


class LayerNorm(nn.Module):
    """LayerNorm whose output (after the affine) is ``hook_normalized``."""

    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))
        self.hook_normalized = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hook_normalized(F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps))


class LayerScale(nn.Module):
    """Per-channel scale ``gamma`` on a block's attention or MLP output."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": quick_gelu,
}


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm's parameter layout)."""

    def __init__(self, cfg: ViTConfig, blocked: bool = False) -> None:
        super().__init__()
        self.n_heads, self.d_head = cfg.n_heads, cfg.d_head
        self.scale = cfg.d_head**-0.5
        self.mask_NN: torch.Tensor | None
        self.register_buffer("mask_NN", cfg.layout.neighbour_block_NN() if blocked else None, persistent=False)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.n_heads * cfg.d_head, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.n_heads * cfg.d_head, cfg.d_model)
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()
        self.hook_attn_scores, self.hook_pattern = HookPoint(), HookPoint()
        self.hook_z = HookPoint()
        self.hook_result = HookPoint()

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        B, N, _ = x_BND.shape
        qkv_BN3Hd = self.qkv(x_BND).reshape(B, N, 3, self.n_heads, self.d_head)
        q_BNHd, k_BNHd, v_BNHd = qkv_BN3Hd.unbind(2)
        q_BHNd = self.hook_q(q_BNHd).transpose(1, 2)
        k_BHNd = self.hook_k(k_BNHd).transpose(1, 2)
        v_BHNd = self.hook_v(v_BNHd).transpose(1, 2)
        if self.hook_attn_scores.has_hooks or self.hook_pattern.has_hooks:
            scores_BHQK = (q_BHNd * self.scale) @ k_BHNd.transpose(-2, -1)
            scores_BHQK = self.hook_attn_scores(scores_BHQK if self.mask_NN is None else scores_BHQK + self.mask_NN.to(scores_BHQK.dtype))
            pattern_BHQK = self.hook_pattern(scores_BHQK.softmax(dim=-1, dtype=torch.float32).to(q_BHNd.dtype))
            z_BHNd = pattern_BHQK @ v_BHNd
        else:
            mask_NN = None if self.mask_NN is None else self.mask_NN.to(q_BHNd.dtype)
            z_BHNd = F.scaled_dot_product_attention(q_BHNd, k_BHNd, v_BHNd, attn_mask=mask_NN)
        z_BNHd = self.hook_z(z_BHNd.transpose(1, 2))
        if self.hook_result.has_hooks:
            W_O_DHd = self.proj.weight.view(-1, self.n_heads, self.d_head)
            result_BNHD = self.hook_result(torch.einsum("bnhd,Dhd->bnhD", z_BNHd, W_O_DHd))
            return result_BNHD.sum(dim=2) + self.proj.bias
        return self.proj(z_BNHd.reshape(B, N, self.n_heads * self.d_head))


class MLP(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_mlp)
        self.fc2 = nn.Linear(cfg.d_mlp, cfg.d_model)
        self.act = ACTIVATIONS[cfg.activation]
        self.hook_pre, self.hook_post = HookPoint(), HookPoint()

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.hook_post(self.act(self.hook_pre(self.fc1(x_BND)))))


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig, layer: int) -> None:
        super().__init__()
        self.ln1 = LayerNorm(cfg.d_model, cfg.ln_eps)
        self.attn = Attention(cfg, blocked=layer in cfg.neighbour_blocked_layers)
        self.ls1 = LayerScale(cfg.d_model) if cfg.layer_scale else nn.Identity()
        self.ln2 = LayerNorm(cfg.d_model, cfg.ln_eps)
        self.mlp = MLP(cfg)
        self.ls2 = LayerScale(cfg.d_model) if cfg.layer_scale else nn.Identity()
        self.hook_resid_pre, self.hook_resid_mid, self.hook_resid_post = HookPoint(), HookPoint(), HookPoint()
        self.hook_attn_out, self.hook_mlp_out = HookPoint(), HookPoint()

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        resid_pre = self.hook_resid_pre(x_BND)
        resid_mid = self.hook_resid_mid(resid_pre + self.hook_attn_out(self.ls1(self.attn(self.ln1(resid_pre)))))
        return self.hook_resid_post(resid_mid + self.hook_mlp_out(self.ls2(self.mlp(self.ln2(resid_mid)))))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.d_model, cfg.patch_size, stride=cfg.patch_size, bias=cfg.patch_bias)

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return self.proj(images_BCHW).flatten(2).transpose(1, 2)


class HookedViT(WeightViewsMixin, HookedRootModule):
    """A ViT whose every intermediate activation has a TransformerLens-style hook point.

    Build it from a :class:`ViTConfig` (random init) or, usually, with
    :func:`vitcircuits.models.loading.load_model`.
    """

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.layout = cfg.layout
        D = cfg.d_model
        self.embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.dist_token else None
        self.reg_tokens = nn.Parameter(torch.zeros(1, cfg.n_registers, D)) if cfg.n_registers else None
        n_pos = self.layout.n_tokens if cfg.pos_embed_prefix else self.layout.n_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, D))
        self.ln_pre = LayerNorm(D, cfg.ln_eps) if cfg.pre_norm else None
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layers))
        self.ln_final = LayerNorm(D, cfg.ln_eps) if cfg.final_norm != "none" else None
        self.head = nn.Linear(D, cfg.n_classes, bias=cfg.head_bias) if cfg.n_classes else None
        has_dist_head = cfg.n_classes and cfg.dist_token and cfg.dist_head
        self.head_dist = nn.Linear(D, cfg.n_classes, bias=cfg.head_bias) if has_dist_head else None
        self.hook_embed, self.hook_pos_embed = HookPoint(), HookPoint()
        self.init_weights()
        self.setup_hooks()

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Random init (truncated-normal linears, small embeddings). Loaders overwrite every
        parameter; random weights are only used when asked for explicitly."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                fan_in = math.prod(module.weight.shape[1:])
                nn.init.trunc_normal_(module.weight, std=fan_in**-0.5, generator=generator)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for p in (self.cls_token, self.dist_token, self.reg_tokens, self.pos_embed):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02, generator=generator)

    @property
    def device(self) -> torch.device:
        return self.pos_embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pos_embed.dtype

    def embed_tokens(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """Images → the residual stream entering block 0, ``[B, N, D]``."""
        expected = (self.cfg.in_chans, *self.cfg.img_size)
        if tuple(images_BCHW.shape[1:]) != expected:
            raise ValueError(f"expected images of shape [B, {', '.join(map(str, expected))}], got {list(images_BCHW.shape)}")
        images_BCHW = images_BCHW.to(device=self.device, dtype=self.dtype, non_blocking=True)
        patches_BPD = self.hook_embed(self.embed(images_BCHW))
        B = patches_BPD.shape[0]
        prefix = [t.expand(B, -1, -1) for t in (self.cls_token, self.dist_token, self.reg_tokens) if t is not None]
        pos_BND = self.hook_pos_embed(self.pos_embed.expand(B, -1, -1))
        if self.cfg.pos_embed_prefix:
            x_BND = torch.cat([*prefix, patches_BPD], dim=1) + pos_BND
        else:
            x_BND = torch.cat([*prefix, patches_BPD + pos_BND], dim=1)
        return self.ln_pre(x_BND) if self.ln_pre is not None else x_BND

    def forward(self, images_BCHW: torch.Tensor, stop_at_layer: int | None = None) -> torch.Tensor:
        """Run the model.

        Returns logits ``[B, n_classes]`` when the model has a head, pooled features ``[B, D]``
        otherwise, all final tokens ``[B, N, D]`` with ``pooling='none'``; or, with
        ``stop_at_layer=l``, the residual stream entering block ``l`` (``[B, N, D]``).
        """
        x_BND = self.embed_tokens(images_BCHW)
        for block in self.blocks[:stop_at_layer]:
            x_BND = block(x_BND)
        if stop_at_layer is not None:
            return x_BND
        return self.forward_head(x_BND)

    def forward_head(self, x_BND: torch.Tensor) -> torch.Tensor:
        """Final norm, pooling and classifier, from the residual stream after the last block."""
        cfg = self.cfg
        if cfg.final_norm == "tokens":
            x_BND = self.ln_final(x_BND)
        if cfg.pooling == "none":
            return x_BND
        if cfg.pooling == "token":
            x_BD = x_BND[:, 0]
        else:
            x_BD = x_BND[:, self.layout.patch_start :].mean(dim=1)
        if cfg.final_norm == "pooled":
            x_BD = self.ln_final(x_BD)
        if self.head is None:
            return x_BD
        if self.head_dist is not None:
            return (self.head(x_BD) + self.head_dist(x_BND[:, self.layout.dist_index])) / 2
        return self.head(x_BD)
