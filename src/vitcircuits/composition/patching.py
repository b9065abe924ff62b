"""Path patching of sender heads into receivers' query, key or value inputs.

For a sender head s (layer l_s) the ablated output differs from the clean one by
``delta_s = (z_ablated − z_clean) @ W_O^s`` at every token. Path patching adds ``delta_s`` to the
residual stream read by a later layer's heads through *one* input only (Q, K or V) and
recomputes that layer's attention, leaving everything else clean: the direct path s → r.

Per receiver head r the effects are averaged over patch queries and images:
``js`` (Jensen–Shannon divergence between clean and patched attention rows, nats),
``d_neighbour`` (change in renormalised neighbour mass), ``d_kernel`` (total-variation change of
the mean offset kernel inside the radius window), ``rel_out`` (‖Δ head output‖ / ‖head output‖),
``d_out_norm`` (signed relative change of the summed output norm), ``d_out_proj`` (the output change
projected on the clean output direction at each token, summed, over the summed clean norm: the
first-order part of ``d_out_norm``, linear in the receiver's value input, and what attribution
estimates for V). ``js_prefix`` and ``rel_out_prefix`` are ``js`` and ``rel_out`` at the prefix
queries instead (class token, registers, distillation token; 0 when the model has none): a
classifier's decisive reads happen at its class token.

Besides the senders' own changes, :func:`path_patch_batch` can patch **random-direction
controls**: for a sender ``s`` and draw ``k``, a change with ``delta_s``'s norm at every token in a
seeded random direction (:func:`~vitcircuits.composition.ablation.random_directions`).
:attr:`PatchEffects.per_image_IRPLHQ` keeps each image's verdict metric (:data:`VERDICT_METRIC`) at
patch and prefix queries, for bootstrap intervals.
One batch costs one clean forward plus, per sender and later layer, one qkv projection and three
attention computations, so a few forward-equivalents for a handful of senders.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vitcircuits.composition.ablation import AblationKind, ZStats, ablated_z, random_directions
from vitcircuits.heads.offsets import OffsetGeometry
from vitcircuits.models.hooked_vit import HookedViT

PATHS = ("q", "k", "v")
METRICS = ("js", "d_neighbour", "d_kernel", "rel_out", "d_out_norm", "d_out_proj", "js_prefix", "rel_out_prefix")
VERDICT_METRIC = {"q": "js", "k": "js", "v": "rel_out"}
"""The receiver metric the verdict reads per input, at patch queries (``*_prefix`` at prefix queries)."""
QUERY_SETS = ("patch", "prefix")


@dataclass(frozen=True)
class PatchingConfig:
    """Settings of path patching."""

    ablation: AblationKind = "mean"
    """Sender replacement: mean over images and positions (default), position_mean, zero, resample."""
    radius: int = 1
    """Neighbourhood radius for ``d_neighbour`` and the kernel window of ``d_kernel``."""
    seed: int = 0
    """Seed of the resample ablation's permutations."""


class PatchEffects:
    """Sums of effects ``[S + R, 3 paths, L, H, metrics]`` over images for senders ``senders``, then
    their random-direction controls ``randoms`` (``(layer, head, draw, last receiver layer)``).
    ``random_draws[(layer, head)]`` lists, per draw, the last receiver layer that draw is needed
    for: a control is patched into the layers up to that one only (elsewhere its effects stay 0)."""

    def __init__(self, senders: list[tuple[int, int]], n_layers: int, n_heads: int,
                 random_draws: dict[tuple[int, int], list[int]] | None = None) -> None:
        self.senders = senders
        self.randoms = [(sl, sh, draw, last) for sl, sh in senders for draw, last in enumerate((random_draws or {}).get((sl, sh), []))]
        self.sum_SPLHM = torch.zeros(len(senders) + len(self.randoms), len(PATHS), n_layers, n_heads, len(METRICS), dtype=torch.float64)
        self.per_image_IRPLHQ: list[torch.Tensor] = []
        """Per batch ``[B, S + R, 3, L, H, 2]``: the verdict metric at patch and prefix queries."""
        self.n_images = 0

    def mean(self) -> torch.Tensor:
        return self.sum_SPLHM / max(self.n_images, 1)

    def per_image(self) -> torch.Tensor:
        """``[I, S + R, 3, L, H, 2]``."""
        return torch.cat(self.per_image_IRPLHQ) if self.per_image_IRPLHQ else torch.zeros(0, *self.sum_SPLHM.shape[:4], 2)

    def rows(self, ablation: str) -> list[dict]:
        mean = self.mean()
        out = []
        for i, (sl, sh) in enumerate(self.senders):
            for p, path in enumerate(PATHS):
                for rl in range(sl + 1, mean.shape[2]):
                    for rh in range(mean.shape[3]):
                        values = mean[i, p, rl, rh]
                        out.append({"sender_layer": sl, "sender_head": sh, "receiver_layer": rl, "receiver_head": rh, "kind": path,
                                    "ablation": ablation, **{f"patch_{m}": float(values[j]) for j, m in enumerate(METRICS)}})
        return out


def _ln(block, x_BND: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x_BND, block.ln1.weight.shape, block.ln1.weight, block.ln1.bias, block.ln1.eps)


def _qkv(block, x_BND: torch.Tensor) -> torch.Tensor:
    attn = block.attn
    B, N, _ = x_BND.shape
    return attn.qkv(_ln(block, x_BND)).reshape(B, N, 3, attn.n_heads, attn.d_head).permute(2, 0, 3, 1, 4)


def _xlogx(p: torch.Tensor) -> torch.Tensor:
    """``p log p`` with ``0 log 0 = 0``."""
    return p * p.clamp_min(1e-30).log()


def _attend(q_BHNd, k_BHNd, v_BHNd, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    pattern_BHQK = ((q_BHNd * scale) @ k_BHNd.transpose(-1, -2)).softmax(-1)
    return pattern_BHQK, pattern_BHQK @ v_BHNd


class _Receiver:
    """Clean state of one receiver layer and the effect metrics against it."""

    def __init__(self, model: HookedViT, layer: int, resid_BND: torch.Tensor, geometry: OffsetGeometry, W_O_HdD: torch.Tensor) -> None:
        self.block = model.blocks[layer]
        self.resid = resid_BND
        self.scale = model.cfg.d_head**-0.5
        self.start = model.layout.patch_start
        self.qkv = _qkv(self.block, resid_BND)
        self.pattern, self.z = _attend(*self.qkv, self.scale)
        self.W_O_HdD = W_O_HdD
        self.out_BHND = torch.einsum("bhnd,hdD->bhnD", self.z, self.W_O_HdD)
        out_norm_BHN = self.out_BHND.norm(dim=-1)
        self.out_norm_BH = out_norm_BHN[:, :, self.start :].sum(-1).clamp_min(1e-30)
        self.prefix_norm_BH = out_norm_BHN[:, :, : self.start].sum(-1).clamp_min(1e-30)
        self.out_dir_BHND = self.out_BHND[:, :, self.start :] / out_norm_BHN[:, :, self.start :, None].clamp_min(1e-30)
        self.p_log_p_BHN = _xlogx(self.pattern).sum(-1)
        self.clean_patches = self._patches(self.pattern)
        self.neighbour_PP = geometry.neighbour_mask_PP().to(resid_BND)
        self.window_OW = _window_matrix(geometry).to(resid_BND)
        self.offset_index = geometry.offset_index_PP().flatten().to(resid_BND.device)
        self.count_O = geometry.offset_counts().flatten().to(resid_BND)
        self.clean_kernel = self._kernel(self.pattern)

    def _patches(self, pattern_BHQK: torch.Tensor) -> torch.Tensor:
        rows = pattern_BHQK[:, :, self.start :, self.start :]
        return rows / rows.sum(-1, keepdim=True).clamp_min(1e-30)

    def _kernel(self, pattern_BHQK: torch.Tensor) -> torch.Tensor:
        norm = self._patches(pattern_BHQK)
        B, H = norm.shape[:2]
        sums = torch.zeros(B, H, self.count_O.numel(), device=norm.device, dtype=norm.dtype)
        sums.index_add_(2, self.offset_index, norm.reshape(B, H, -1))
        return (sums / self.count_O.clamp_min(1)) @ self.window_OW

    def _js_BHN(self, pattern_BHQK: torch.Tensor) -> torch.Tensor:
        """Jensen–Shannon divergence of every query row from the clean one (nats)."""
        mix = _xlogx(0.5 * (self.pattern + pattern_BHQK)).sum(-1)
        return (0.5 * self.p_log_p_BHN + 0.5 * _xlogx(pattern_BHQK).sum(-1) - mix).clamp_min(0)

    def effects(self, pattern_BHQK: torch.Tensor, z_BHNd: torch.Tensor) -> torch.Tensor:
        """``[B, H, 8]``: the :data:`METRICS`. A pattern that *is* the clean one (the V path) has zero
        attention effects without computing them."""
        s = self.start
        B, H = z_BHNd.shape[:2]
        zeros = torch.zeros(B, H, dtype=z_BHNd.dtype, device=z_BHNd.device)
        if pattern_BHQK is self.pattern:
            js = d_neighbour = d_kernel = js_prefix = zeros
        else:
            js_BHN = self._js_BHN(pattern_BHQK)
            js, js_prefix = js_BHN[:, :, s:].mean(-1), js_BHN[:, :, :s].mean(-1) if s else zeros
            d_neighbour = ((self._patches(pattern_BHQK) - self.clean_patches) * self.neighbour_PP).sum(-1).mean(-1)
            d_kernel = 0.5 * (self._kernel(pattern_BHQK) - self.clean_kernel).abs().sum(-1)
        out_BHND = torch.einsum("bhnd,hdD->bhnD", z_BHNd, self.W_O_HdD)
        d_out_BHND = out_BHND - self.out_BHND
        d_norm_BHN = d_out_BHND.norm(dim=-1)
        rel_out = d_norm_BHN[:, :, s:].sum(-1) / self.out_norm_BH
        rel_out_prefix = d_norm_BHN[:, :, :s].sum(-1) / self.prefix_norm_BH if s else zeros
        d_out_norm = out_BHND[:, :, s:].norm(dim=-1).sum(-1) / self.out_norm_BH - 1
        d_out_proj = (d_out_BHND[:, :, s:] * self.out_dir_BHND).sum((-1, -2)) / self.out_norm_BH
        return torch.stack([js, d_neighbour, d_kernel, rel_out, d_out_norm, d_out_proj, js_prefix, rel_out_prefix], dim=-1)

    def patched(self, delta_BND: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(pattern, z) with ``delta`` added to the Q, K or V input only."""
        q, k, v = self.qkv
        q2, k2, v2 = _qkv(self.block, self.resid + delta_BND)
        return [_attend(q2, k, v, self.scale), _attend(q, k2, v, self.scale), (self.pattern, self.pattern @ v2)]


def _window_matrix(geometry: OffsetGeometry) -> torch.Tensor:
    """``[O, W]`` selecting the offsets inside the radius window."""
    rows, cols = geometry.kernel_shape
    R = geometry.radius
    keep = [(dy + geometry.rows - 1) * cols + (dx + geometry.cols - 1) for dy in range(-R, R + 1) for dx in range(-R, R + 1)]
    M = torch.zeros(rows * cols, len(keep))
    M[keep, torch.arange(len(keep))] = 1.0
    return M


@torch.no_grad()
def path_patch_batch(model: HookedViT, images_BCHW: torch.Tensor, senders: list[tuple[int, int]], effects: PatchEffects,
                     stats: ZStats | None, config: PatchingConfig) -> None:
    """Add one batch's path-patching effects of every sender (and of the random-direction controls
    of ``effects``) on every later head to ``effects``."""
    if not senders:
        raise ValueError("path patching needs at least one sender head")
    L = model.cfg.n_layers
    first = min(sl for sl, _ in senders)
    _, cache = model.run_with_cache(images_BCHW, names_filter=lambda n: n.endswith(("hook_resid_pre", "attn.hook_z")))
    geometry = OffsetGeometry(model.layout.rows, model.layout.cols, config.radius)
    W_O = model.W_O
    receivers = {layer: _Receiver(model, layer, cache[f"blocks.{layer}.hook_resid_pre"], geometry, W_O[layer]) for layer in range(first + 1, L)}
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
        direction = random_directions(delta_BND.shape, draw, config.seed * 7919 + effects.n_images).to(delta_BND)
        jobs.append((sl, last, direction * delta_BND.norm(dim=-1, keepdim=True)))
    for i, (sl, last, delta_BND) in enumerate(jobs):
        for rl in range(sl + 1, last + 1):
            receiver = receivers[rl]
            for p, (pattern, z_patched) in enumerate(receiver.patched(delta_BND)):
                values_BHM = receiver.effects(pattern, z_patched).double()
                effects.sum_SPLHM[i, p, rl] += values_BHM.sum(0).cpu()
                per_image[:, i, p, rl] = values_BHM[:, :, verdict_columns[p]].float().cpu()
    effects.per_image_IRPLHQ.append(per_image)
    effects.n_images += B
