"""Attribution patching: a first-order estimate of every sender → receiver path-patching effect
from one clean forward and one backward pass per batch.

The clean forward caches each layer's input residual and every head's ``z``. Each layer's
attention is then recomputed from that (detached) residual with q, k, v as leaves, so one
backward gives, for every receiver head, the gradient of its own metric with respect to its own
q, k and v (the direct path, nothing downstream). The metrics are the path-patching ones:

- through Q and K: the receiver's renormalised neighbour mass (``d_neighbour``);
- through V: the change of its output projected on the clean output direction, over the clean
  output norm (``d_out_proj``: the first-order part of the relative norm change ``d_out_norm``;
  linear in the value input, so only LayerNorm is linearised on this path).

For a sender ``s`` with ablated-minus-clean output ``delta_s = (z_abl − z) W_O^s``, the estimate of
the effect on receiver ``r`` through input ``p`` is ``<grad_p^r, delta_s>`` summed over tokens, where
``grad_p^r`` is the head-space gradient pulled back through ``W_p^r`` and ``ln1`` (:class:`LNPullBack`). All (sender,
receiver, path) triples then cost one matmul per receiver layer over image chunks.
"""
from __future__ import annotations

import numpy as np
import torch

from vitcircuits.composition.ablation import AblationKind, ZStats, ablated_z
from vitcircuits.composition.patching import METRICS, PATHS
from vitcircuits.heads.offsets import OffsetGeometry
from vitcircuits.models.hooked_vit import HookedViT

ESTIMATED_METRIC = {"q": "d_neighbour", "k": "d_neighbour", "v": "d_out_proj"}
"""The path-patching metric that attribution estimates, per receiver input."""
CHUNK_FLOATS = 2**25
"""Images are processed in chunks whose per-token gradients and sender deltas fit in about this
many floats (128 MiB in fp32)."""


class AttributionSums:
    """Sums over images of the estimates ``[sender L, sender H, 3 paths, receiver L, receiver H]``."""

    def __init__(self, n_layers: int, n_heads: int) -> None:
        self.sum_LHPLH = torch.zeros(n_layers, n_heads, 3, n_layers, n_heads, dtype=torch.float64)
        self.n_images = 0

    def mean(self) -> torch.Tensor:
        return self.sum_LHPLH / max(self.n_images, 1)


def _receiver_gradients(model: HookedViT, layer: int, resid_BND: torch.Tensor, neighbour_PP: torch.Tensor,
                        gram_HdD: torch.Tensor) -> torch.Tensor:
    """``[3 * H, B, N, D]``: per receiver head and role (q, k, v), the gradient of its metric with
    respect to the residual it reads through that role alone."""
    block, cfg = model.blocks[layer], model.cfg
    H, Dh, start = cfg.n_heads, cfg.d_head, model.layout.patch_start
    pull_back = LNPullBack(block, resid_BND)
    q, k, v = ((pull_back.qkv_lin_3BHNd[i] + pull_back.offset_3Hd[i, None, :, None]).requires_grad_(True) for i in range(3))
    with torch.enable_grad():
        pattern_BHQK = ((q * Dh**-0.5) @ k.transpose(-1, -2)).softmax(-1)
        patches = pattern_BHQK[:, :, start:, start:]
        neighbour = ((patches / patches.sum(-1, keepdim=True)) * neighbour_PP).sum(-1).mean(-1)
        z_BHPd = (pattern_BHQK @ v)[:, :, start:]
        gz_BHPd = torch.einsum("bhnd,hde->bhne", z_BHPd.detach(), gram_HdD)
        norm_BHP = (gz_BHPd * z_BHPd.detach()).sum(-1).clamp_min(1e-30).sqrt()
        out = ((z_BHPd * gz_BHPd).sum(-1) / norm_BHP).sum(-1) / norm_BHP.sum(-1)
        grad_q, grad_k = torch.autograd.grad(neighbour.sum(), (q, k), retain_graph=True)
        (grad_v,) = torch.autograd.grad(out.sum(), v)
    return pull_back(torch.stack([grad_q, grad_k, grad_v]))


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


@torch.no_grad()
def attribution_batch(model: HookedViT, images_BCHW: torch.Tensor, sums: AttributionSums, stats: ZStats | None,
                      ablation: AblationKind = "mean", radius: int = 1, seed: int = 0) -> None:
    """Add one batch's estimates for every (sender, later receiver, path) to ``sums``."""
    cfg = model.cfg
    L, H, D = cfg.n_layers, cfg.n_heads, cfg.d_model
    _, cache = model.run_with_cache(images_BCHW, names_filter=lambda n: n.endswith(("hook_resid_pre", "attn.hook_z")))
    neighbour_PP = OffsetGeometry(model.layout.rows, model.layout.cols, radius).neighbour_mask_PP().to(images_BCHW.device, model.dtype)
    W_O = model.W_O
    gram_LHdd = W_O @ W_O.transpose(-1, -2)
    generator = torch.Generator().manual_seed(seed)
    z_LBNHd = cache.stack("blocks.{}.attn.hook_z", L)
    dz_LBNHd = torch.stack([torch.stack([ablated_z(ablation, z_LBNHd[sl, :, :, h], sl, h, stats, generator) for h in range(H)], dim=2)
                            for sl in range(L - 1)]) - z_LBNHd[: L - 1]
    B, N = dz_LBNHd.shape[1:3]
    chunk = max(1, CHUNK_FLOATS // (N * D * (L * H + 3 * H)))
    for b0 in range(0, B, chunk):
        b1 = min(B, b0 + chunk)
        delta_SX = torch.einsum("lbnhd,lhdD->lhbnD", dz_LBNHd[:, b0:b1], W_O[: L - 1]).reshape((L - 1) * H, -1)
        for rl in range(1, L):
            grads_RX = _receiver_gradients(model, rl, cache[f"blocks.{rl}.hook_resid_pre"][b0:b1], neighbour_PP, gram_LHdd[rl]).reshape(3 * H, -1)
            est_SR = delta_SX[: rl * H] @ grads_RX.T
            sums.sum_LHPLH[:rl, :, :, rl] += est_SR.view(rl, H, 3, H).double().cpu()
    sums.n_images += B


def agreement(est_LHPLH: np.ndarray, exact_SPLHM: np.ndarray, patched: list[tuple[int, int]], n_top: int = 40,
              n_unpatched: int = 10) -> dict:
    """How attribution ranks the triples that were also path-patched exactly: Spearman over all of
    them and over the ``n_top`` with the largest ``|estimate|``; plus the ``n_unpatched`` strongest
    estimates whose sender was not patched (where attribution points that exact patching did not go)."""
    L, H = est_LHPLH.shape[:2]
    est, exact = [], []
    for i, (sl, sh) in enumerate(patched):
        for p, path in enumerate(PATHS):
            m = METRICS.index(ESTIMATED_METRIC[path])
            est.extend(est_LHPLH[sl, sh, p, sl + 1 :].ravel())
            exact.extend(exact_SPLHM[i, p, sl + 1 :, :, m].ravel())
    est, exact = np.array(est), np.array(exact)
    top = np.argsort(-np.abs(est))[:n_top]
    done = set(patched)
    others = [(float(est_LHPLH[sl, sh, p, rl, rh]), sl, sh, p, rl, rh) for sl in range(L - 1) for sh in range(H) if (sl, sh) not in done
              for p in range(len(PATHS)) for rl in range(sl + 1, L) for rh in range(H)]
    others.sort(key=lambda t: -abs(t[0]))
    return {
        "metrics": ESTIMATED_METRIC, "n_patched_triples": int(est.size),
        "spearman_patched": spearman(est, exact) if est.size > 1 else None,
        "n_top": int(top.size), "spearman_top": spearman(est[top], exact[top]) if top.size > 1 else None,
        "strongest_unpatched": [{"sender": [sl, sh], "receiver": [rl, rh], "kind": PATHS[p], "estimate": value}
                                for value, sl, sh, p, rl, rh in others[:n_unpatched]],
    }


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
