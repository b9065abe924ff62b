"""Task-grounded attribution of every edge: EAP-IG along the mean-ablation path.

An **edge** is ``sender head → receiver head → q/k/v`` (the receiver reads the sender's output
through that one input), or ``sender head → output`` (the direct path into the final residual
stream). Its exact effect is what :mod:`~vitcircuits.composition.task_patching` measures: the drop
of a :class:`~vitcircuits.composition.task_metric.TaskMetric` with that one path mean-ablated.

The estimate (edge attribution patching with integrated gradients, as in Hanna et al. 2024,
"Have Faith in Faithfulness", in its activation-interpolation form): with
``delta_s = (z̄_s − z_s) W_O^s`` the change of sender ``s``'s output when it is mean-ablated, at
every token of the clean run,

    drop(s → r, p) ≈ − Σ_tokens  delta_s · (1/K) Σ_k  ∂metric/∂x_{r,p} |_{α_k}

where ``x_{r,p}`` is the residual stream as receiver ``r`` reads it through input ``p`` alone (its
query, key or value: the head-space gradient of ``p`` pulled back through ``W_p^r`` and ``ln1``,
:class:`LNPullBack`), and the gradients are taken on runs where
*every* head's output is moved a fraction ``α_k = (k − ½)/K`` of the way to its mean
(``z ← z + α (z̄ − z)``, ``k = 1..K``, the midpoint rule). For the direct path ``x`` is the final
residual stream. ``K = 1`` is plain EAP at ``α = ½``; the gradient at the clean run (``α = 0``) is
blind to a metric that is flat there (the embedding metric's distance), which the path average is
not.

Cost per batch: one clean forward for the senders' changes, then per step one forward and one
backward with gradients kept at every q, k and v, plus one matmul per receiver layer between the
senders' changes ``[S, B·N·D]`` and the receivers' gradients ``[3H, B·N·D]`` (chunked over
images so that these fit in :data:`CHUNK_FLOATS`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vitcircuits.composition.ablation import ZStats
from vitcircuits.composition.task_metric import TaskMetric
from vitcircuits.models.hooked_vit import HookedViT

CHUNK_FLOATS = 2**25
"""Images are processed in chunks whose sender changes and receiver gradients fit in about this
many floats each (128 MiB in fp32)."""


@dataclass(frozen=True)
class EdgeAttributionConfig:
    """Settings of :func:`edge_attribution_batch`."""

    steps: int = 3
    """Integration steps ``K`` along the ablation path (midpoints ``(k − ½)/K``); each costs one
    forward and one backward."""


class LNPullBack:
    """Gradients with respect to one layer's q, k, v (head space) pulled back to the residual
    stream that layer reads, through its ``ln1`` and each head's projection separately.

    LayerNorm's backward is ``P_t (γ ⊙ ·) / σ_t`` with ``P_t = I − 11ᵀ/D − x̂_t x̂_tᵀ/D``, so the
    pull-back is one matmul per role plus two per-token scalars computed in head space.
    """

    def __init__(self, block, resid_BND: torch.Tensor) -> None:
        H, Dh = block.attn.n_heads, block.attn.d_head
        B, N, D = resid_BND.shape
        ln1 = block.ln1
        self.sigma_BN1 = (resid_BND.var(-1, unbiased=False, keepdim=True) + ln1.eps).sqrt()
        self.x_hat_BND = (resid_BND - resid_BND.mean(-1, keepdim=True)) / self.sigma_BN1
        gamma_D, W_3HdD = ln1.weight.detach(), block.attn.qkv.weight.detach().view(3, H, Dh, D)
        self.Wg_3HdD = W_3HdD * gamma_D
        self.qkv_lin_3BHNd = (self.x_hat_BND @ self.Wg_3HdD.reshape(3 * H * Dh, D).T).reshape(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4)
        bias = block.attn.qkv.bias
        self.offset_3Hd = (W_3HdD @ ln1.bias.detach()) + (bias.detach().view(3, H, Dh) if bias is not None else 0)

    def __call__(self, g_3BHNd: torch.Tensor) -> torch.Tensor:
        """``[3 * H, B, N, D]`` from ``[3, B, H, N, Dh]``."""
        _, B, H, N, _ = g_3BHNd.shape
        D = self.x_hat_BND.shape[-1]
        g_3BHNd = g_3BHNd / self.sigma_BN1.view(1, B, 1, N, 1)
        sum_3BHN = torch.einsum("rbhnd,rhd->rbhn", g_3BHNd, self.Wg_3HdD.sum(-1)) / D
        xhat_3BHN = (g_3BHNd * self.qkv_lin_3BHNd).sum(-1) / D
        grad_3HBND = torch.einsum("rbhnd,rhdD->rhbnD", g_3BHNd, self.Wg_3HdD)
        grad_3HBND.sub_(sum_3BHN.permute(0, 2, 1, 3).unsqueeze(-1))
        grad_3HBND.sub_(xhat_3BHN.permute(0, 2, 1, 3).unsqueeze(-1) * self.x_hat_BND)
        return grad_3HBND.reshape(3 * H, B, N, D)


class EdgeAttribution:
    """Sums over images of the estimated drops."""

    def __init__(self, n_layers: int, n_heads: int) -> None:
        self.sum_LHPLH = torch.zeros(n_layers, n_heads, 3, n_layers, n_heads, dtype=torch.float64)
        """``[sender L, sender H, q/k/v, receiver L, receiver H]``; zero where the receiver is not later."""
        self.sum_direct_LH = torch.zeros(n_layers, n_heads, dtype=torch.float64)
        """``[sender L, sender H]``: the direct path into the final residual stream."""
        self.n_images = 0

    def mean(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = max(self.n_images, 1)
        return self.sum_LHPLH / n, self.sum_direct_LH / n


def _path_gradients(model: HookedViT, images_BCHW: torch.Tensor, targets: torch.Tensor, metric: TaskMetric, mean_LHd: torch.Tensor,
                    alpha: float) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """On the run with every head moved ``alpha`` of the way to its mean: per layer ``l ≥ 1`` the
    metric's gradient with respect to the residual as each head reads it through q, k and v
    ``[3H, B, N, D]``, and its gradient with respect to the final residual stream ``[B, N, D]``."""
    L = model.cfg.n_layers
    saved: dict[str, torch.Tensor] = {}

    def start(x_BND, hook):
        return x_BND.detach().requires_grad_(True)

    def interpolate(layer):
        def fn(z_BNHd, hook):
            return z_BNHd + alpha * (mean_LHd[layer].to(z_BNHd) - z_BNHd)
        return fn

    def keep(name):
        def fn(t, hook):
            saved[name] = t
            return t
        return fn

    hooks = [("blocks.0.hook_resid_pre", start), (f"blocks.{L - 1}.hook_resid_post", keep("final"))]
    for layer in range(L):
        hooks.append((f"blocks.{layer}.attn.hook_z", interpolate(layer)))
        if layer >= 1:
            hooks += [(f"blocks.{layer}.hook_resid_pre", keep(f"resid{layer}"))]
            hooks += [(f"blocks.{layer}.attn.hook_{p}", keep(f"{p}{layer}")) for p in "qkv"]
    with torch.enable_grad(), model.hooks(hooks):
        value = metric.value(metric.output(model, images_BCHW), targets).sum()
        wanted = [saved[f"{p}{layer}"] for layer in range(1, L) for p in "qkv"] + [saved["final"]]
        grads = torch.autograd.grad(value, wanted, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(wanted, grads)]
    out = {}
    for i, layer in enumerate(range(1, L)):
        g_3BHNd = torch.stack([g.transpose(1, 2) for g in grads[3 * i : 3 * i + 3]])
        out[layer] = LNPullBack(model.blocks[layer], saved[f"resid{layer}"].detach())(g_3BHNd.detach())
    return out, grads[-1].detach()


@torch.no_grad()
def edge_attribution_batch(model: HookedViT, images_BCHW: torch.Tensor, targets: torch.Tensor, metric: TaskMetric, stats: ZStats,
                           sums: EdgeAttribution, config: EdgeAttributionConfig = EdgeAttributionConfig()) -> None:
    """Add one batch's estimated drops of every edge to ``sums`` (see the module docstring)."""
    cfg = model.cfg
    L, H, D, N = cfg.n_layers, cfg.n_heads, cfg.d_model, model.layout.n_tokens
    if config.steps < 1:
        raise ValueError(f"edge attribution needs at least one integration step, got {config.steps}")
    images_BCHW = images_BCHW.to(model.device, model.dtype)
    mean_LHd = stats.mean_LHd().to(model.device, model.dtype)
    W_O = model.W_O
    chunk = max(1, CHUNK_FLOATS // (N * D * max(L * H, 3 * H)))
    for b0 in range(0, len(images_BCHW), chunk):
        x = images_BCHW[b0 : b0 + chunk]
        t = targets[b0 : b0 + chunk].to(model.device)
        _, cache = model.run_with_cache(x, names_filter=lambda n: n.endswith("attn.hook_z"))
        z_LBNHd = cache.stack("blocks.{}.attn.hook_z", L)
        delta_SX = torch.einsum("lbnhd,lhdD->lhbnD", mean_LHd[:, None, None] - z_LBNHd, W_O).reshape(L * H, -1)
        est_SRX = torch.zeros(L * H, L, 3 * H, dtype=torch.float64, device=model.device)
        direct_S = torch.zeros(L * H, dtype=torch.float64, device=model.device)
        for k in range(config.steps):
            receivers, final_BND = _path_gradients(model, x, t, metric, mean_LHd, (k + 0.5) / config.steps)
            for rl, grads_3HBND in receivers.items():
                est_SRX[: rl * H, rl] -= (delta_SX[: rl * H] @ grads_3HBND.reshape(3 * H, -1).T).double()
            direct_S -= (delta_SX @ final_BND.reshape(-1)).double()
        # [S, receiver L, 3H] (role-major within the layer) -> [L, H, 3, L, H]
        est = est_SRX.view(L, H, L, 3, H).permute(0, 1, 3, 2, 4) / config.steps
        sums.sum_LHPLH += est.cpu()
        sums.sum_direct_LH += (direct_S / config.steps).view(L, H).cpu()
        sums.n_images += len(x)


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
