"""Attribution patching: a first-order estimate of every sender → receiver path-patching effect
from one clean forward and one backward pass per batch.

The clean forward caches each layer's input residual and every head's ``z``. Each layer's
attention is then recomputed from that (detached) residual with q, k, v as leaves, so one
backward gives, for every receiver head, the gradient of its own metric with respect to its own
q, k and v; mapping those back through W_Q, W_K, W_V and ``ln1`` gives the gradient with respect
to the residual it reads through Q, K and V alone (the direct path, nothing downstream). The metrics are the path-patching ones:

- through Q and K: the receiver's renormalised neighbour mass (``d_neighbour``);
- through V: its summed output norm relative to clean (``d_out_norm``).

For a sender ``s`` with ablated-minus-clean output ``delta_s = (z_abl − z) W_O^s``, the estimate of
the effect on receiver ``r`` through input ``p`` is ``<grad_p^r, delta_s>``, summed over tokens.
All pairs cost one einsum per (sender, receiver layer) on top of the forward and backward.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from vitcircuits.composition.ablation import AblationKind, ZStats, ablated_z
from vitcircuits.heads.offsets import OffsetGeometry
from vitcircuits.models.hooked_vit import HookedViT


class AttributionSums:
    """Sums over images of the estimates ``[sender L, sender H, 3 paths, receiver L, receiver H]``."""

    def __init__(self, n_layers: int, n_heads: int) -> None:
        self.sum_LHPLH = torch.zeros(n_layers, n_heads, 3, n_layers, n_heads, dtype=torch.float64)
        self.n_images = 0

    def mean(self) -> torch.Tensor:
        return self.sum_LHPLH / max(self.n_images, 1)


def _layer_gradients(model: HookedViT, layer: int, resid_BND: torch.Tensor, neighbour_PP: torch.Tensor, W_O_HdD: torch.Tensor) -> list[torch.Tensor]:
    """Per-head gradients ``[H, B*N*D]`` of the receiver metrics w.r.t. the residual read
    through Q, K and V: gradients w.r.t. each head's q, k, v, mapped back through W_Q, W_K, W_V
    and ``ln1``. A head's metric depends only on its own q, k, v, so one backward separates heads."""
    block, cfg = model.blocks[layer], model.cfg
    H, Dh, start = cfg.n_heads, cfg.d_head, model.layout.patch_start
    B, N, D = resid_BND.shape
    ln = F.layer_norm(resid_BND, block.ln1.weight.shape, block.ln1.weight, block.ln1.bias, block.ln1.eps).detach()
    qkv_3BHNd = block.attn.qkv(ln).detach().reshape(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4)
    q, k, v = (t.clone().requires_grad_(True) for t in qkv_3BHNd)
    pattern_BHQK = ((q * Dh**-0.5) @ k.transpose(-1, -2)).softmax(-1)
    patches = pattern_BHQK[:, :, start:, start:]
    neighbour = ((patches / patches.sum(-1, keepdim=True)) * neighbour_PP).sum(-1).mean(-1)
    out_norm_BHN = torch.einsum("bhnd,hdD->bhnD", pattern_BHQK @ v, W_O_HdD).norm(dim=-1)[:, :, start:]
    out = out_norm_BHN.sum(-1) / out_norm_BHN.detach().sum(-1).clamp_min(1e-30)
    grad_q, grad_k = torch.autograd.grad(neighbour.sum(), (q, k), retain_graph=True)
    (grad_v,) = torch.autograd.grad(out.sum(), v)
    W_3HdD = block.attn.qkv.weight.detach().view(3, H, Dh, D)
    grads_3HX = _ln_backward(block.ln1, resid_BND, torch.einsum("rbhnd,rhdD->rhbnD", torch.stack([grad_q, grad_k, grad_v]), W_3HdD))
    return list(grads_3HX.reshape(3, H, -1))


def _ln_backward(ln, x_BND: torch.Tensor, grad_RHBND: torch.Tensor) -> torch.Tensor:
    """Pull gradients w.r.t. a LayerNorm's output back to its input, analytically (in place)."""
    sigma_BN1 = (x_BND.var(-1, unbiased=False, keepdim=True) + ln.eps).sqrt()
    x_hat_BND = (x_BND - x_BND.mean(-1, keepdim=True)) / sigma_BN1
    g = grad_RHBND.mul_(ln.weight.detach())
    mean_g = g.mean(-1, keepdim=True)
    mean_gx = (g * x_hat_BND).mean(-1, keepdim=True)
    return g.sub_(mean_g).sub_(x_hat_BND * mean_gx).div_(sigma_BN1)


def attribution_batch(model: HookedViT, images_BCHW: torch.Tensor, sums: AttributionSums, stats: ZStats | None,
                      ablation: AblationKind = "mean", radius: int = 1, seed: int = 0) -> None:
    """Add one batch's estimates for every (sender, later receiver, path) to ``sums``."""
    L = model.cfg.n_layers
    with torch.no_grad():
        _, cache = model.run_with_cache(images_BCHW, names_filter=lambda n: n.endswith(("hook_resid_pre", "attn.hook_z")))
    neighbour_PP = OffsetGeometry(model.layout.rows, model.layout.cols, radius).neighbour_mask_PP().to(images_BCHW.device, model.dtype)
    W_O = model.W_O
    with torch.enable_grad():
        grads = {layer: _layer_gradients(model, layer, cache[f"blocks.{layer}.hook_resid_pre"], neighbour_PP, W_O[layer]) for layer in range(1, L)}
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sl in range(L - 1):
            z_BNHd = cache[f"blocks.{sl}.attn.hook_z"]
            ablated = torch.stack([ablated_z(ablation, z_BNHd[:, :, h], sl, h, stats, generator) for h in range(z_BNHd.shape[2])], dim=2)
            delta_HX = torch.einsum("bnhd,hdD->hbnD", ablated - z_BNHd, W_O[sl]).reshape(z_BNHd.shape[2], -1)
            for rl in range(sl + 1, L):
                for p in range(3):
                    sums.sum_LHPLH[sl, :, p, rl] += (delta_HX @ grads[rl][p].T).double().cpu()
    sums.n_images += images_BCHW.shape[0]


def spearman(a, b) -> float:
    """Spearman rank correlation of two 1-D arrays (tied values share their average rank)."""

    def ranks(x) -> np.ndarray:
        _, inverse, counts = np.unique(np.asarray(x, dtype=float), return_inverse=True, return_counts=True)
        first = np.cumsum(counts) - counts
        return (first + (counts - 1) / 2)[inverse]

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra**2).sum() * (rb**2).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")
