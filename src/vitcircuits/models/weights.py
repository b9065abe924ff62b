"""Per-head weight views and LayerNorm folding.

Shapes follow TransformerLens: ``W_Q/W_K/W_V [L, H, D, Dh]``, ``W_O [L, H, Dh, D]``,
``b_Q/b_K/b_V [L, H, Dh]``, ``b_O [L, D]``. ``W_O`` and ``b_O`` include the block's layer-scale,
so they are what a head actually writes into the residual stream.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class WeightViewsMixin:
    """Stacked per-head weights of a HookedViT (detached copies; edit the modules to change them)."""

    def _qkv_weight(self, which: int) -> torch.Tensor:
        cfg = self.cfg
        inner = cfg.n_heads * cfg.d_head
        W = torch.stack([b.attn.qkv.weight[which * inner : (which + 1) * inner] for b in self.blocks])
        return W.detach().view(cfg.n_layers, cfg.n_heads, cfg.d_head, cfg.d_model).transpose(-1, -2)

    def _qkv_bias(self, which: int) -> torch.Tensor:
        cfg = self.cfg
        inner = cfg.n_heads * cfg.d_head
        biases = [
            b.attn.qkv.bias[which * inner : (which + 1) * inner].detach()
            if b.attn.qkv.bias is not None
            else torch.zeros(inner, device=self.device, dtype=self.dtype)
            for b in self.blocks
        ]
        return torch.stack(biases).view(cfg.n_layers, cfg.n_heads, cfg.d_head)

    def _layer_scale(self, block: nn.Module) -> torch.Tensor:
        gamma = getattr(block.ls1, "gamma", None)
        return gamma.detach() if gamma is not None else torch.ones(self.cfg.d_model, device=self.device, dtype=self.dtype)

    @property
    def W_Q(self) -> torch.Tensor:
        return self._qkv_weight(0)

    @property
    def W_K(self) -> torch.Tensor:
        return self._qkv_weight(1)

    @property
    def W_V(self) -> torch.Tensor:
        return self._qkv_weight(2)

    @property
    def b_Q(self) -> torch.Tensor:
        return self._qkv_bias(0)

    @property
    def b_K(self) -> torch.Tensor:
        return self._qkv_bias(1)

    @property
    def b_V(self) -> torch.Tensor:
        return self._qkv_bias(2)

    @property
    def W_O(self) -> torch.Tensor:
        cfg = self.cfg
        W = []
        for b in self.blocks:
            W_DHd = b.attn.proj.weight.detach().view(cfg.d_model, cfg.n_heads, cfg.d_head)
            W.append(W_DHd.permute(1, 2, 0) * self._layer_scale(b))
        return torch.stack(W)

    @property
    def b_O(self) -> torch.Tensor:
        return torch.stack([b.attn.proj.bias.detach() * self._layer_scale(b) for b in self.blocks])

    @property
    def W_pos(self) -> torch.Tensor:
        """Position embeddings ``[N_pos, D]`` (prefix tokens included iff ``cfg.pos_embed_prefix``)."""
        return self.pos_embed.detach()[0]

    @property
    def W_E(self) -> torch.Tensor:
        """Patch embedding as a matrix ``[C*ph*pw, D]`` acting on flattened patches."""
        return self.embed.proj.weight.detach().flatten(1).T


def _fold_into_linear(ln: nn.Module, linear: nn.Linear) -> nn.Linear:
    """Return a Linear equal to ``linear(ln_affine(x))`` for normalised ``x``."""
    w, b = ln.weight.detach(), ln.bias.detach()
    folded = torch.nn.utils.skip_init(nn.Linear, linear.in_features, linear.out_features, bias=True,
                                      device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        folded.weight.copy_(linear.weight * w)
        bias = linear.weight @ b
        if linear.bias is not None:
            bias = bias + linear.bias
        folded.bias.copy_(bias)
    return folded


def _reset_affine(ln: nn.Module) -> None:
    with torch.no_grad():
        ln.weight.fill_(1.0)
        ln.bias.zero_()


def fold_layer_norm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with each LayerNorm's scale and bias folded into the linear layer it
    feeds (ln1 → qkv, ln2 → fc1, ln_final → head). The folded LayerNorms keep only centring and
    scaling, so ``ln1.hook_normalized`` becomes TransformerLens's normalised residual. Outputs are
    unchanged. ``ln_pre`` writes into the residual stream, not into a linear layer, so it stays."""
    folded = copy.deepcopy(model)
    for block in folded.blocks:
        block.attn.qkv = _fold_into_linear(block.ln1, block.attn.qkv)
        _reset_affine(block.ln1)
        block.mlp.fc1 = _fold_into_linear(block.ln2, block.mlp.fc1)
        _reset_affine(block.ln2)
    if folded.ln_final is not None and folded.head is not None:
        folded.head = _fold_into_linear(folded.ln_final, folded.head)
        if folded.head_dist is not None:
            folded.head_dist = _fold_into_linear(folded.ln_final, folded.head_dist)
        _reset_affine(folded.ln_final)
    folded.cfg = folded.cfg.replace(qkv_bias=True, head_bias=folded.cfg.head_bias or folded.head is not None)
    folded.setup_hooks()
    return folded
