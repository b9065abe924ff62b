"""Weights-only positional kernels: the attention each head would give by position alone.

For layer l, the input is the position-only residual stream — position embeddings, plus the
prefix tokens' learned embeddings and the patch embedding's bias (what a blank, mean-coloured
image contributes) — passed through that layer's ``ln1`` and its W_Q, W_K. No image is used.
For layers after the first this ignores what earlier layers add, so it answers "does this
head's QK circuit read position directly?".
"""
from __future__ import annotations

import torch

from vitcircuits.heads.offsets import HeadStatsAccumulator
from vitcircuits.models.hooked_vit import HookedViT


@torch.no_grad()
def positional_patterns(model: HookedViT) -> torch.Tensor:
    """``[L, H, N, N]`` attention patterns from the position-only residual stream."""
    cfg, layout = model.cfg, model.layout
    x_ND = torch.zeros(layout.n_tokens, cfg.d_model, dtype=torch.float64)
    pos = model.pos_embed.detach()[0].double()
    if cfg.pos_embed_prefix:
        x_ND += pos
    else:
        x_ND[layout.patch_start :] += pos
    prefix = [t for t in (model.cls_token, model.dist_token, model.reg_tokens) if t is not None]
    if prefix:
        x_ND[: layout.patch_start] += torch.cat(prefix, dim=1)[0].double()
    if model.embed.proj.bias is not None:
        x_ND[layout.patch_start :] += model.embed.proj.bias.detach().double()
    if model.ln_pre is not None:
        x_ND = torch.nn.functional.layer_norm(x_ND, (cfg.d_model,), model.ln_pre.weight.double(), model.ln_pre.bias.double(), cfg.ln_eps)
    W_Q, W_K, b_Q, b_K = (w.double() for w in (model.W_Q, model.W_K, model.b_Q, model.b_K))
    patterns = []
    for layer, block in enumerate(model.blocks):
        ln = block.ln1
        x = torch.nn.functional.layer_norm(x_ND, (cfg.d_model,), ln.weight.double(), ln.bias.double(), ln.eps)
        q_HNd = torch.einsum("nd,hde->hne", x, W_Q[layer]) + b_Q[layer][:, None]
        k_HNd = torch.einsum("nd,hde->hne", x, W_K[layer]) + b_K[layer][:, None]
        scores_HNN = q_HNd @ k_HNd.transpose(-1, -2) * cfg.d_head**-0.5
        if block.attn.mask_NN is not None:
            scores_HNN = scores_HNN + block.attn.mask_NN.double()
        patterns.append(scores_HNN.softmax(-1))
    return torch.stack(patterns)


def positional_accumulator(model: HookedViT, radius: int) -> HeadStatsAccumulator:
    """The positional patterns summarised like one image's empirical patterns."""
    acc = HeadStatsAccumulator(model.layout, model.cfg.n_layers, model.cfg.n_heads, radius, model.cfg.patch_size, n_boot=2)
    patterns_LHNN = positional_patterns(model)
    for layer in range(model.cfg.n_layers):
        acc.update(layer, patterns_LHNN[layer][None], [0])
    return acc


def pattern_agreement(empirical_LHPP: torch.Tensor, positional_LHPP: torch.Tensor) -> torch.Tensor:
    """1 − mean total-variation distance between matching rows of two renormalised patch
    patterns (per query), ``[L, H]``: 1 when the head attends exactly as position alone predicts."""
    tv = 0.5 * (empirical_LHPP - positional_LHPP).abs().sum(-1)
    return 1.0 - tv.mean(-1)
