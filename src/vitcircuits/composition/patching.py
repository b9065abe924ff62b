"""Path patching of sender heads into receivers' query, key or value inputs.

For a sender head s (layer l_s) the ablated output differs from the clean one by
``delta_s = (z_ablated − z_clean) @ W_O^s`` at every token. Path patching adds ``delta_s`` to the
residual stream read by a later layer's heads through *one* input only (Q, K or V) and
recomputes that layer's attention, leaving everything else clean: the direct path s → r.

Per receiver head r the effects are averaged over queries and images: ``js`` (Jensen–Shannon
divergence between clean and patched attention rows, nats) and ``rel_out`` (‖Δ head output‖ /
‖head output‖, summed over tokens) at patch queries, and ``js_prefix`` and ``rel_out_prefix`` the
same at the prefix queries (class token, registers, distillation token; 0 when the model has
none): a classifier's decisive reads happen at its class token.

Besides the senders' own changes, :func:`path_patch_batch` can patch **random-direction
controls**: for a sender ``s`` and draw ``k``, a change with ``delta_s``'s norm at every token in a
seeded random direction (:func:`~vitcircuits.composition.ablation.random_directions`).
:attr:`PatchEffects.per_image_ISJLHU` keeps each image's verdict metric (:data:`VERDICT_METRIC`) at
patch and prefix queries, for bootstrap intervals.
One batch costs one clean forward plus, per sender (or control) and later layer, one qkv
projection and two attention computations.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vitcircuits.composition.ablation import AblationKind, ZStats, ablated_z, check_ablation, random_directions
from vitcircuits.models.hooked_vit import HookedViT

PATHS = ("q", "k", "v")
METRICS = ("js", "rel_out", "js_prefix", "rel_out_prefix")
VERDICT_METRIC = {"q": "js", "k": "js", "v": "rel_out"}
"""The receiver metric the verdict reads per input, at patch queries (``*_prefix`` at prefix queries)."""
QUERY_SETS = ("patch", "prefix")


@dataclass(frozen=True)
class PatchingConfig:
    """Settings of path patching."""

    ablation: AblationKind = "mean"
    """Sender replacement: mean over images and positions (default), position_mean, zero, resample."""
    seed: int = 0
    """Seed of the resample ablation's permutations."""

    def __post_init__(self) -> None:
        check_ablation(self.ablation)


class PatchEffects:
    """Sums of effects ``[S + R, 3 paths, L, H, metrics]`` over images for senders ``senders``, then
    their random-direction controls ``randoms`` (``(layer, head, draw, last receiver layer)``).
    ``random_draws[(layer, head)]`` lists, per draw, the last receiver layer that draw is needed
    for: a control is patched into the layers up to that one only (elsewhere its effects stay 0)."""

    def __init__(self, senders: list[tuple[int, int]], n_layers: int, n_heads: int,
                 random_draws: dict[tuple[int, int], list[int]] | None = None) -> None:
        self.senders = senders
        self.randoms = [(sl, sh, draw, last) for sl, sh in senders for draw, last in enumerate((random_draws or {}).get((sl, sh), []))]
        self.sum_SJLHM = torch.zeros(len(senders) + len(self.randoms), len(PATHS), n_layers, n_heads, len(METRICS), dtype=torch.float64)
        self.per_image_ISJLHU: list[torch.Tensor] = []
        """Per batch ``[B, S + R, 3, L, H, 2]``: the verdict metric at patch and prefix queries."""
        self.n_images = 0

    def mean(self) -> torch.Tensor:
        return self.sum_SJLHM / max(self.n_images, 1)

    def merge(self, later: PatchEffects) -> None:
        """Add the effects of later images (same senders and controls)."""
        self.sum_SJLHM += later.sum_SJLHM
        self.per_image_ISJLHU += later.per_image_ISJLHU
        self.n_images += later.n_images

    def per_image(self) -> torch.Tensor:
        """``[I, S + R, 3, L, H, 2]``."""
        return torch.cat(self.per_image_ISJLHU) if self.per_image_ISJLHU else torch.zeros(0, *self.sum_SJLHM.shape[:4], 2)


def _ln(block, x_BND: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x_BND, block.ln1.weight.shape, block.ln1.weight, block.ln1.bias, block.ln1.eps)


def _qkv(block, x_BND: torch.Tensor) -> torch.Tensor:
    attn = block.attn
    B, N, _ = x_BND.shape
    return attn.qkv(_ln(block, x_BND)).reshape(B, N, 3, attn.n_heads, attn.d_head).permute(2, 0, 3, 1, 4)


def _attend(q_BHNd, k_BHNd, v_BHNd, scale: float, mask_NN: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log_pattern_BHQK, z_BHNd)``; ``mask_NN`` the layer's additive attention mask, if any."""
    scores_BHQK = (q_BHNd * scale) @ k_BHNd.transpose(-1, -2)
    if mask_NN is None:
        log_pattern_BHQK = scores_BHQK.log_softmax(-1)
    else:  # blocked keys: log 0 = -inf, kept finite so that 0 · log 0 is 0 in the divergences
        log_pattern_BHQK = (scores_BHQK + mask_NN.to(scores_BHQK.dtype)).log_softmax(-1).clamp_min(torch.finfo(scores_BHQK.dtype).min)
    return log_pattern_BHQK, log_pattern_BHQK.exp() @ v_BHNd


class _Receiver:
    """Clean state of one receiver layer and the effect metrics against it."""

    def __init__(self, model: HookedViT, layer: int, resid_BND: torch.Tensor, W_O_HdD: torch.Tensor) -> None:
        self.block = model.blocks[layer]
        self.resid = resid_BND
        self.scale = model.cfg.d_head**-0.5
        self.start = model.layout.patch_start
        self.qkv = _qkv(self.block, resid_BND)
        self.mask_NN = self.block.attn.mask_NN
        self.log_pattern, self.z = _attend(*self.qkv, self.scale, self.mask_NN)
        self.pattern = self.log_pattern.exp()
        self.p_log_p_BHN = (self.pattern * self.log_pattern).sum(-1)
        self.W_O_HdD = W_O_HdD
        self.out_BHND = torch.einsum("bhnd,hdD->bhnD", self.z, self.W_O_HdD)
        out_norm_BHN = self.out_BHND.norm(dim=-1)
        self.out_norm_BH = out_norm_BHN[:, :, self.start :].sum(-1).clamp_min(1e-30)
        self.prefix_norm_BH = out_norm_BHN[:, :, : self.start].sum(-1).clamp_min(1e-30)

    def _js_BHN(self, log_q_BHQK: torch.Tensor) -> torch.Tensor:
        """Jensen–Shannon divergence of every query row from the clean one (nats):
        ``(H(m) − (H(p) + H(q)) / 2``, ``m = (p + q) / 2``."""
        q = log_q_BHQK.exp()
        m = 0.5 * (self.pattern + q)
        m_log_m = (m * m.clamp_min(1e-30).log()).sum(-1)
        return (0.5 * self.p_log_p_BHN + 0.5 * (q * log_q_BHQK).sum(-1) - m_log_m).clamp_min(0)

    def effects(self, log_pattern_BHQK: torch.Tensor | None, z_BHNd: torch.Tensor) -> torch.Tensor:
        """``[B, H, 4]``: the :data:`METRICS`. ``log_pattern`` None: the clean pattern (the V path),
        whose attention effects are 0."""
        s = self.start
        B, H = z_BHNd.shape[:2]
        zeros = torch.zeros(B, H, dtype=z_BHNd.dtype, device=z_BHNd.device)
        if log_pattern_BHQK is None:
            js = js_prefix = zeros
        else:
            js_BHN = self._js_BHN(log_pattern_BHQK)
            js, js_prefix = js_BHN[:, :, s:].mean(-1), js_BHN[:, :, :s].mean(-1) if s else zeros
        d_norm_BHN = (torch.einsum("bhnd,hdD->bhnD", z_BHNd, self.W_O_HdD) - self.out_BHND).norm(dim=-1)
        rel_out = d_norm_BHN[:, :, s:].sum(-1) / self.out_norm_BH
        rel_out_prefix = d_norm_BHN[:, :, :s].sum(-1) / self.prefix_norm_BH if s else zeros
        return torch.stack([js, rel_out, js_prefix, rel_out_prefix], dim=-1)

    def patched(self, delta_BND: torch.Tensor) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
        """``(log pattern, z)`` with ``delta`` added to the Q, K or V input only (None: the clean pattern)."""
        q, k, v = self.qkv
        q2, k2, v2 = _qkv(self.block, self.resid + delta_BND)
        return [_attend(q2, k, v, self.scale, self.mask_NN), _attend(q, k2, v, self.scale, self.mask_NN), (None, self.pattern @ v2)]


@torch.no_grad()
def path_patch_batch(model: HookedViT, images_BCHW: torch.Tensor, senders: list[tuple[int, int]], effects: PatchEffects,
                     stats: ZStats | None, config: PatchingConfig, first_image: int | None = None) -> None:
    """Add one batch's path-patching effects of every sender (and of the random-direction controls
    of ``effects``) on every later head to ``effects``. The controls' directions are seeded by the
    batch's position among the images, ``first_image`` (default: the images ``effects`` holds)."""
    if not senders:
        raise ValueError("path patching needs at least one sender head")
    L = model.cfg.n_layers
    first = min(sl for sl, _ in senders)
    _, cache = model.run_with_cache(images_BCHW, names_filter=lambda n: n.endswith(("hook_resid_pre", "attn.hook_z")))
    W_O = model.W_O
    receivers = {layer: _Receiver(model, layer, cache[f"blocks.{layer}.hook_resid_pre"], W_O[layer]) for layer in range(first + 1, L)}
    generator = torch.Generator().manual_seed(config.seed)
    B = images_BCHW.shape[0]
    per_image = torch.zeros(B, len(senders) + len(effects.randoms), len(PATHS), L, model.cfg.n_heads, len(QUERY_SETS))
    verdict_columns = [[METRICS.index(VERDICT_METRIC[path] + suffix) for suffix in ("", "_prefix")] for path in PATHS]
    deltas = {}
    for sl, sh in senders:
        z = cache[f"blocks.{sl}.attn.hook_z"][:, :, sh]
        deltas[(sl, sh)] = (ablated_z(config.ablation, z, sl, sh, stats, generator) - z) @ W_O[sl, sh]
    jobs = [(sl, L - 1, deltas[(sl, sh)]) for sl, sh in senders]
    for sl, sh, draw, last in effects.randoms:
        delta_BND = deltas[(sl, sh)]
        position = effects.n_images if first_image is None else first_image
        direction = random_directions(delta_BND.shape, draw, config.seed * 7919 + position).to(delta_BND)
        jobs.append((sl, last, direction * delta_BND.norm(dim=-1, keepdim=True)))
    for i, (sl, last, delta_BND) in enumerate(jobs):
        for rl in range(sl + 1, last + 1):
            receiver = receivers[rl]
            for p, (pattern, z_patched) in enumerate(receiver.patched(delta_BND)):
                values_BHM = receiver.effects(pattern, z_patched).double()
                effects.sum_SJLHM[i, p, rl] += values_BHM.sum(0).cpu()
                per_image[:, i, p, rl] = values_BHM[:, :, verdict_columns[p]].float().cpu()
    effects.per_image_ISJLHU.append(per_image)
    effects.n_images += B
