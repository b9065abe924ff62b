"""Task-grounded attribution of every edge: EAP-IG along the path-ablation path, one input role
at a time.

An **edge** is ``sender head → receiver head → q/k/v`` (the receiver reads the sender's output
through that one input), or ``sender head → output`` (the direct path into the final residual
stream). Its exact effect is what :mod:`~vitcircuits.composition.task_patching` measures: the drop
of a :class:`~vitcircuits.composition.task_metric.TaskMetric` with that one path mean-ablated,
everything else clean.

The estimate (edge attribution patching with integrated gradients, Hanna et al. 2024, "Have
Faith in Faithfulness"): with ``delta_s = (z̄_s − z_s) W_O^s`` the change of sender ``s``'s output
when it is mean-ablated, at every token of the clean run,

    drop(s → r, p) ≈ − Σ_tokens  delta_s · (1/K) Σ_k  ∂metric/∂x_{r,p} |_{α_k}

where ``x_{r,p}`` is the residual stream as receiver ``r`` reads it through input ``p`` alone (the
head-space gradient of ``p`` pulled back through ``W_p^r`` and ``ln1``, :class:`LNPullBack`).
The gradients are taken on runs where every receiver's input ``p`` reads ``x + α_k Σ_{s earlier}
delta_s``, every *edge* into role ``p`` moved a fraction ``α_k = (k − ½)/K`` of the way to its
ablation (midpoint rule), while the other two inputs, the MLPs and the residual stream stay
clean, as path patching leaves them. One run per role: a receiver's query and key interact
bilinearly, so interpolating both at once would take each edge's gradient where its partner is
ablated too, which single-edge ablation never does (on the shapes organisms the joint path
ranked the causal edges at ROC-AUC 0.83 on one of them; see docs/composition.md). The direct
paths ride on the V run (like V inputs, the output reads the senders' outputs without
attention): there the final residual stream reads ``x + α_k Σ_s delta_s`` too. The gradient at
the clean run alone (``α = 0``) is blind to a saturated metric, which the path average is not.

Cost per batch: one clean forward for the senders' changes, then ``3 K`` forward and backward
passes (``K = 1``: about ten forward-equivalents), plus per receiver layer one matmul between the
senders' changes ``[S, B·N·D]`` and the receivers' gradients ``[H, B·N·D]`` (chunked over images
so that both fit in :data:`CHUNK_FLOATS`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vitcircuits.composition.ablation import ZStats
from vitcircuits.composition.patching import PATHS
from vitcircuits.composition.task_metric import TaskMetric
from vitcircuits.models.hooked_vit import HookedViT

CHUNK_FLOATS = 2**27
"""Images are processed in chunks whose sender changes ``[L, H, B, N, D]`` fit in about this many
floats (512 MiB in fp32): 21 images of ViT-B/32 at 224 px, 15 of DINOv2-S at 224 px. Smaller
chunks cost more than the memory they save, because each role pass is a forward and a backward
over the chunk."""


@dataclass(frozen=True)
class EdgeAttributionConfig:
    """Settings of :func:`edge_attribution_batch`."""

    steps: int = 1
    """Integration steps ``K`` per input role along the ablation path (midpoints ``(k − ½)/K``);
    each costs one forward and one backward per role. 1 keeps the whole estimate within about ten
    forward-equivalents per batch."""


class LNPullBack:
    """Gradients with respect to one input role (0 q, 1 k, 2 v) of a layer's heads, in head space,
    pulled back to the residual stream the layer reads, through its ``ln1`` and each head's
    projection separately.

    LayerNorm's backward is ``P_t (γ ⊙ ·) / σ_t`` with ``P_t = I − 11ᵀ/D − x̂_t x̂_tᵀ/D``, so the
    pull-back is one matmul plus two per-token scalars.
    """

    def __init__(self, block, resid_BND: torch.Tensor, role: int) -> None:
        H, Dh = block.attn.n_heads, block.attn.d_head
        D = resid_BND.shape[-1]
        ln1 = block.ln1
        self.sigma_BN1 = (resid_BND.var(-1, unbiased=False, keepdim=True) + ln1.eps).sqrt()
        self.x_hat_BND = (resid_BND - resid_BND.mean(-1, keepdim=True)) / self.sigma_BN1
        self.Wg_HdD = block.attn.qkv.weight.detach().view(3, H, Dh, D)[role] * ln1.weight.detach()

    def __call__(self, g_BHNd: torch.Tensor) -> torch.Tensor:
        """``[H, B, N, D]`` from ``[B, H, N, Dh]``."""
        B, H, N, _ = g_BHNd.shape
        D = self.x_hat_BND.shape[-1]
        g_BHNd = g_BHNd / self.sigma_BN1.view(B, 1, N, 1)
        grad_HBND = torch.einsum("bhnd,hdD->hbnD", g_BHNd, self.Wg_HdD)
        mean_HBN1 = grad_HBND.mean(-1, keepdim=True)
        along_HBN1 = (grad_HBND * self.x_hat_BND).sum(-1, keepdim=True) / D
        return grad_HBND.sub_(mean_HBN1).sub_(along_HBN1 * self.x_hat_BND)


class EdgeAttribution:
    """Sums over images of the estimated drops."""

    def __init__(self, n_layers: int, n_heads: int) -> None:
        self.sum_LHJLH = torch.zeros(n_layers, n_heads, 3, n_layers, n_heads, dtype=torch.float64)
        """``[sender L, sender H, q/k/v, receiver L, receiver H]``; zero where the receiver is not later."""
        self.sum_direct_LH = torch.zeros(n_layers, n_heads, dtype=torch.float64)
        """``[sender L, sender H]``: the direct path into the final residual stream."""
        self.n_images = 0

    def merge(self, later: EdgeAttribution) -> None:
        """Add the sums of other images."""
        self.sum_LHJLH += later.sum_LHJLH
        self.sum_direct_LH += later.sum_direct_LH
        self.n_images += later.n_images

    def mean(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = max(self.n_images, 1)
        return self.sum_LHJLH / n, self.sum_direct_LH / n


def attribution_chunk(model: HookedViT) -> int:
    """Images per chunk (:data:`CHUNK_FLOATS`)."""
    cfg = model.cfg
    return max(1, CHUNK_FLOATS // (model.layout.n_tokens * cfg.d_model * (cfg.n_layers + 1) * cfg.n_heads))


def _role_gradients(model: HookedViT, images_BCHW: torch.Tensor, targets: torch.Tensor, metric: TaskMetric, shift_LBND: torch.Tensor,
                    alpha: float, role: int) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
    """On the run where every receiver's input ``role`` (0 q, 1 k, 2 v) reads ``x + alpha *
    shift_LBND[l]``: per layer ``l ≥ 1`` the metric's gradient with respect to the residual as each
    head reads it through that role ``[H, B, N, D]``; for the V run also the gradient with
    respect to the final residual stream, read as ``x + alpha * shift_LBND[L]`` (else None)."""
    L, H, Dh = model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head
    name = PATHS[role]
    saved: dict[str, torch.Tensor] = {}

    def start(x_BND, hook):
        return x_BND.detach().requires_grad_(True)

    def read(layer):
        def fn(x_BND, hook):
            block = model.blocks[layer]
            saved[f"resid{layer}"] = read_BND = x_BND + alpha * shift_LBND[layer]
            normed = block.ln1(read_BND)
            rows = slice(role * H * Dh, (role + 1) * H * Dh)
            bias = block.attn.qkv.bias[rows] if block.attn.qkv.bias is not None else None
            saved[f"input{layer}"] = F.linear(normed, block.attn.qkv.weight[rows], bias).view(*x_BND.shape[:2], H, Dh)
            return x_BND
        return fn

    def replace(layer):
        def fn(t_BNHd, hook):
            return saved[f"input{layer}"]
        return fn

    def final(x_BND, hook):
        saved["final"] = x_BND + alpha * shift_LBND[L]
        return saved["final"]

    hooks = [("blocks.0.hook_resid_pre", start)] + ([(f"blocks.{L - 1}.hook_resid_post", final)] if name == "v" else [])
    for layer in range(1, L):
        hooks += [(f"blocks.{layer}.hook_resid_pre", read(layer)), (f"blocks.{layer}.attn.hook_{name}", replace(layer))]
    with torch.enable_grad(), model.hooks(hooks):
        value = metric.value(metric.output(model, images_BCHW), targets).sum()
        wanted = [saved[f"input{layer}"] for layer in range(1, L)] + ([saved["final"]] if name == "v" else [])
        grads = [torch.zeros_like(t) if g is None else g for t, g in zip(wanted, torch.autograd.grad(value, wanted, allow_unused=True))]
    out = {layer: LNPullBack(model.blocks[layer], saved[f"resid{layer}"].detach(), role)(grads[i].transpose(1, 2))
           for i, layer in enumerate(range(1, L))}
    return out, grads[-1] if name == "v" else None


@torch.no_grad()
def edge_attribution_batch(model: HookedViT, images_BCHW: torch.Tensor, targets: torch.Tensor, metric: TaskMetric, stats: ZStats,
                           sums: EdgeAttribution, config: EdgeAttributionConfig = EdgeAttributionConfig()) -> None:
    """Add one batch's estimated drops of every edge to ``sums`` (see the module docstring)."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    if config.steps < 1:
        raise ValueError(f"edge attribution needs at least one integration step, got {config.steps}")
    images_BCHW = images_BCHW.to(model.device, model.dtype)
    mean_LHd = stats.mean_LHd().to(model.device, model.dtype)
    W_O = model.W_O
    chunk = attribution_chunk(model)
    for b0 in range(0, len(images_BCHW), chunk):
        x = images_BCHW[b0 : b0 + chunk]
        t = targets[b0 : b0 + chunk].to(model.device)
        _, cache = model.run_with_cache(x, names_filter=lambda n: n.endswith("attn.hook_z"))
        z_LBNHd = cache.stack("blocks.{}.attn.hook_z", L)
        delta_LHBND = torch.einsum("lbnhd,lhdD->lhbnD", mean_LHd[:, None, None] - z_LBNHd, W_O)
        per_layer_LBND = delta_LHBND.sum(1)
        shift_LBND = torch.cat([torch.zeros_like(per_layer_LBND[:1]), per_layer_LBND.cumsum(0)])  # [L + 1]: all senders before l
        delta_SX = delta_LHBND.reshape(L * H, -1)
        est_SLJH = torch.zeros(L * H, L, 3, H, dtype=torch.float64, device=model.device)
        direct_S = torch.zeros(L * H, dtype=torch.float64, device=model.device)
        for role in range(3):
            for k in range(config.steps):
                receivers, final_BND = _role_gradients(model, x, t, metric, shift_LBND, (k + 0.5) / config.steps, role)
                for rl, grads_HBND in receivers.items():
                    est_SLJH[: rl * H, rl, role] -= (delta_SX[: rl * H] @ grads_HBND.reshape(H, -1).T).double()
                if final_BND is not None:
                    direct_S -= (delta_SX @ final_BND.reshape(-1)).double()
        sums.sum_LHJLH += (est_SLJH.view(L, H, L, 3, H).permute(0, 1, 3, 2, 4) / config.steps).cpu()
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
