"""Streaming, mergeable accumulators of where patch queries attend, by relative offset.

Offsets are ``(dy, dx)`` in patch units (dy down, dx right), stored on a ``[2R-1, 2C-1]`` grid
for an ``R × C`` patch grid, centre = offset (0, 0). Rows of attention from patch queries are
renormalised over patch keys (CLS, distillation and register tokens removed) unless a name
says ``raw``. Everything kept is a sum or a count, so memory does not grow with the number of
images and two accumulators over disjoint images merge by addition.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from vitcircuits.models.config import TokenLayout

N_DIRECTIONS = 8
BOOT_METRICS = ("neighbour_mass", "self_mass", "prefix_mass", "mean_distance_patches")
"""The per-image metrics whose bootstrap replicates are kept, in the order of the ``M`` axis
(the direction kernel values follow them)."""


@dataclass(frozen=True)
class OffsetGeometry:
    """Index maps between (query, key) patch pairs and offsets for one grid and radius."""

    rows: int
    cols: int
    radius: int

    def __post_init__(self) -> None:
        if self.radius < 1:
            raise ValueError(f"radius must be ≥ 1, got {self.radius}")
        if self.radius >= max(self.rows, self.cols):
            raise ValueError(f"a {self.rows}x{self.cols} patch grid is too small for neighbourhood radius {self.radius}")

    @property
    def kernel_shape(self) -> tuple[int, int]:
        return 2 * self.rows - 1, 2 * self.cols - 1

    @property
    def n_offsets(self) -> int:
        return math.prod(self.kernel_shape)

    def _dydx_PP(self) -> tuple[torch.Tensor, torch.Tensor]:
        r = torch.arange(self.rows).repeat_interleave(self.cols)
        c = torch.arange(self.cols).repeat(self.rows)
        return r[None, :] - r[:, None], c[None, :] - c[:, None]

    def offset_index_PP(self) -> torch.Tensor:
        """Flat kernel index of the offset from query q to key k."""
        dy, dx = self._dydx_PP()
        return (dy + self.rows - 1) * (2 * self.cols - 1) + (dx + self.cols - 1)

    def offset_counts(self) -> torch.Tensor:
        """How many (query, key) pairs of one image have each offset, ``[2R-1, 2C-1]``."""
        counts = torch.zeros(self.n_offsets, dtype=torch.float64)
        n_pairs = (self.rows * self.cols) ** 2
        counts.index_add_(0, self.offset_index_PP().flatten(), torch.ones(n_pairs, dtype=torch.float64))
        return counts.view(self.kernel_shape)

    def distance_PP(self, patch_hw: tuple[int, int] = (1, 1)) -> torch.Tensor:
        """Euclidean distance between patch centres (in units of ``patch_hw``)."""
        dy, dx = self._dydx_PP()
        return torch.sqrt((dy * patch_hw[0]).double() ** 2 + (dx * patch_hw[1]).double() ** 2)

    def neighbour_mask_PP(self) -> torch.Tensor:
        """Keys within Chebyshev distance ``radius`` of the query, the query itself excluded."""
        dy, dx = self._dydx_PP()
        cheb = torch.maximum(dy.abs(), dx.abs())
        return (cheb <= self.radius) & (cheb > 0)

    def interior_P(self) -> torch.Tensor:
        """Queries whose whole radius-R neighbourhood lies inside the grid."""
        r = torch.arange(self.rows).repeat_interleave(self.cols)
        c = torch.arange(self.cols).repeat(self.rows)
        R = self.radius
        return (r >= R) & (r < self.rows - R) & (c >= R) & (c < self.cols - R)

    def direction_of_offsets(self) -> np.ndarray:
        """Compass sector (0=E, 1=SE, 2=S, … 7=NE: clockwise on screen, dy down) of every offset
        within the radius-R window, -1 at the centre and outside the window; ``[2R-1, 2C-1]``."""
        dy = np.arange(-(self.rows - 1), self.rows)[:, None]
        dx = np.arange(-(self.cols - 1), self.cols)[None, :]
        angle = np.arctan2(dy, dx)
        sector = np.round(angle / (np.pi / 4)).astype(int) % N_DIRECTIONS
        inside = (np.maximum(np.abs(dy), np.abs(dx)) <= self.radius) & ~((dy == 0) & (dx == 0))
        return np.where(inside, sector, -1)


def direction_matrix(geometry: OffsetGeometry) -> torch.Tensor:
    """``[O, A]`` one-hot map from offsets in the radius-R window to their compass sector (``A``: the
    8 directions), so ``kernel_O @ direction_OA`` is the attention mass per direction."""
    sector = torch.from_numpy(geometry.direction_of_offsets().ravel())
    direction_OA = torch.zeros(geometry.n_offsets, N_DIRECTIONS, dtype=torch.float64)
    inside = sector >= 0
    direction_OA[inside.nonzero().flatten(), sector[inside]] = 1.0
    return direction_OA


class HeadStatsAccumulator:
    """Sums over images and patch queries for every layer and head.

    Fields (``L`` layers, ``H`` heads, ``P`` patches, ``O`` offsets, ``K`` bootstrap replicates):
      kernel_sum_LHO / raw_kernel_sum_LHO: attention at each offset (renormalised / raw rows);
      offset_count_O: (query, key) pairs per offset, summed over images;
      prefix_sum_LH3: raw attention to CLS, distillation and register tokens;
      self_sum_LH, neighbour_sum_LHP, raw_neighbour_sum_LHP, distance_sum_LH (patches), distance_px_sum_LH;
      pattern_sum_LHPP / pattern_sq_sum_LHPP: per-(query, key) first and second moments over images;
      boot_sum_ZLHM / boot_weight_Z: Poisson-bootstrap replicates of per-image metrics
      (``M``: the :data:`BOOT_METRICS`, then the 8 direction kernel values);
      per_image_L: with ``keep_per_image``, per layer the per-image metrics ``[B, H, M]`` of each
      batch, in the order they came (:meth:`per_image_ILHM`); they grow with the images, so they
      are kept only when asked (training dynamics resample images across checkpoints).
    """

    n_metrics = len(BOOT_METRICS) + N_DIRECTIONS

    def __init__(self, layout: TokenLayout, n_layers: int, n_heads: int, radius: int, patch_hw: tuple[int, int],
                 n_boot: int = 200, seed: int = 0, keep_per_image: bool = False) -> None:
        self.layout, self.n_layers, self.n_heads = layout, n_layers, n_heads
        self.per_image_L: list[list[torch.Tensor]] | None = [[] for _ in range(n_layers)] if keep_per_image else None
        self.geometry = OffsetGeometry(layout.rows, layout.cols, radius)
        self.patch_hw, self.n_boot, self.seed = patch_hw, n_boot, seed
        L, H, P, O = n_layers, n_heads, layout.n_patches, self.geometry.n_offsets
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
        self.kernel_sum_LHO, self.raw_kernel_sum_LHO, self.offset_count_O = z(L, H, O), z(L, H, O), z(O)
        self.prefix_sum_LH3, self.self_sum_LH = z(L, H, 3), z(L, H)
        self.neighbour_sum_LHP, self.raw_neighbour_sum_LHP = z(L, H, P), z(L, H, P)
        self.distance_sum_LH, self.distance_px_sum_LH = z(L, H), z(L, H)
        self.pattern_sum_LHPP, self.pattern_sq_sum_LHPP = z(L, H, P, P), z(L, H, P, P)
        self.boot_sum_ZLHM, self.boot_weight_Z = z(n_boot, L, H, self.n_metrics), z(n_boot)
        self.n_images = 0
        self._offset_index = self.geometry.offset_index_PP().flatten()
        self._neighbour = self.geometry.neighbour_mask_PP()
        self._distance = self.geometry.distance_PP()
        self._distance_px = self.geometry.distance_PP(patch_hw)
        self._direction_OA = direction_matrix(self.geometry)
        self._count_O = self.geometry.offset_counts().flatten()
        self._boot_cache: tuple[tuple[int, ...], torch.Tensor] = ((), torch.zeros(n_boot, 0, dtype=torch.float64))

    def _prefix_slices(self) -> list[list[int]]:
        layout = self.layout
        return [
            [layout.cls_index] if layout.cls_index is not None else [],
            [layout.dist_index] if layout.dist_index is not None else [],
            list(range(*layout.register_slice)),
        ]

    @torch.no_grad()
    def update(self, layer: int, pattern_BHQK: torch.Tensor, image_indices: list[int]) -> None:
        """Add one layer's attention patterns for a batch of images (call for every layer)."""
        if not torch.isfinite(pattern_BHQK).all():
            bad = (~torch.isfinite(pattern_BHQK)).flatten(2).any(-1).any(0).nonzero().flatten().tolist()
            raise FloatingPointError(f"non-finite attention in layer {layer}, head(s) {bad}")
        start = self.layout.patch_start
        device = pattern_BHQK.device
        pattern = pattern_BHQK.detach().float()[:, :, start:, :]
        B, H, P, _ = pattern.shape
        index = self._offset_index.to(device)
        neighbour_PP = self._neighbour.to(device, torch.float32)
        raw_BHPP = pattern[..., start:]
        prefix_BH3 = torch.stack([pattern[..., idx].sum(-1).mean(-1) if idx else torch.zeros(B, H, device=device)
                                  for idx in self._prefix_slices()], dim=-1)
        norm_BHPP = raw_BHPP / raw_BHPP.sum(-1, keepdim=True).clamp_min(1e-30)
        O = self.geometry.n_offsets
        per_image_kernel_BHO = torch.zeros(B, H, O, device=device).index_add_(2, index, norm_BHPP.reshape(B, H, -1))
        raw_kern_HO = torch.zeros(H, O, device=device).index_add_(1, index, raw_BHPP.sum(0).reshape(H, -1))
        self_BHP = torch.diagonal(norm_BHPP, dim1=-2, dim2=-1)
        neighbour_BHP = (norm_BHPP * neighbour_PP).sum(-1)
        distance_BH = (norm_BHPP * self._distance.to(device, torch.float32)).sum(-1).mean(-1)
        distance_px_BH = (norm_BHPP * self._distance_px.to(device, torch.float32)).sum(-1).mean(-1)
        cpu = lambda t: t.double().cpu()  # noqa: E731
        self.kernel_sum_LHO[layer] += cpu(per_image_kernel_BHO.sum(0))
        self.raw_kernel_sum_LHO[layer] += cpu(raw_kern_HO)
        self.prefix_sum_LH3[layer] += cpu(prefix_BH3.sum(0))
        self.self_sum_LH[layer] += cpu(self_BHP.mean(-1).sum(0))
        self.neighbour_sum_LHP[layer] += cpu(neighbour_BHP.sum(0))
        self.raw_neighbour_sum_LHP[layer] += cpu((raw_BHPP * neighbour_PP).sum(-1).sum(0))
        self.distance_sum_LH[layer] += cpu(distance_BH.sum(0))
        self.distance_px_sum_LH[layer] += cpu(distance_px_BH.sum(0))
        self.pattern_sum_LHPP[layer] += cpu(norm_BHPP.sum(0))
        self.pattern_sq_sum_LHPP[layer] += cpu((norm_BHPP**2).sum(0))
        per_image_kernel_BHO = cpu(per_image_kernel_BHO) / self._per_image_count_O().clamp_min(1)
        metrics_BHM = torch.cat([
            cpu(neighbour_BHP.mean(-1, keepdim=True)), cpu(self_BHP.mean(-1, keepdim=True)), cpu(prefix_BH3.sum(-1, keepdim=True)),
            cpu(distance_BH[..., None]), per_image_kernel_BHO @ self._direction_OA,
        ], dim=-1)
        weights_ZB = self._boot_weights(image_indices)
        self.boot_sum_ZLHM[:, layer] += torch.einsum("zb,bhm->zhm", weights_ZB, metrics_BHM)
        if self.per_image_L is not None:
            self.per_image_L[layer].append(metrics_BHM.float())
        if layer == self.n_layers - 1:
            self.boot_weight_Z += weights_ZB.sum(1)
            self.offset_count_O += self._per_image_count_O() * B
            self.n_images += B

    def _per_image_count_O(self) -> torch.Tensor:
        return self._count_O

    def _boot_weights(self, image_indices: list[int]) -> torch.Tensor:
        """Poisson(1) weights per replicate and image, a function of (seed, image index) only, so
        results do not depend on batching or on how runs are split across processes. Drawn once
        per batch (every layer of the batch reuses them)."""
        key = tuple(int(i) for i in image_indices)
        if key != self._boot_cache[0]:
            draws = [np.random.default_rng([self.seed, i]).poisson(1.0, self.n_boot) for i in key]
            self._boot_cache = (key, torch.tensor(np.stack(draws, axis=1), dtype=torch.float64))
        return self._boot_cache[1]

    _SUM_FIELDS = ("kernel_sum_LHO", "raw_kernel_sum_LHO", "offset_count_O", "prefix_sum_LH3", "self_sum_LH",
                   "neighbour_sum_LHP", "raw_neighbour_sum_LHP", "distance_sum_LH", "distance_px_sum_LH",
                   "pattern_sum_LHPP", "pattern_sq_sum_LHPP", "boot_sum_ZLHM", "boot_weight_Z")

    def merge(self, other: HeadStatsAccumulator) -> None:
        """Add another accumulator over disjoint images (same model, radius and seed)."""
        if (other.layout, other.geometry, other.n_boot, other.seed) != (self.layout, self.geometry, self.n_boot, self.seed):
            raise ValueError("can only merge accumulators of the same layout, radius, replicates and seed")
        for name in self._SUM_FIELDS:
            getattr(self, name).add_(getattr(other, name))
        self.n_images += other.n_images
        if self.per_image_L is not None:
            for mine, theirs in zip(self.per_image_L, other.per_image_L):
                mine += theirs

    def per_image_ILHM(self) -> torch.Tensor:
        """``[I, L, H, M]``: every image's metrics (``keep_per_image`` only), images in the order
        they were added."""
        if self.per_image_L is None:
            raise ValueError("this accumulator keeps no per-image metrics (keep_per_image=False)")
        return torch.stack([torch.cat(batches) for batches in self.per_image_L], dim=1)

    def state_dict(self) -> dict[str, np.ndarray]:
        state = {name: getattr(self, name).numpy() for name in self._SUM_FIELDS}
        state["n_images"] = np.array(self.n_images)
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        for name in self._SUM_FIELDS:
            getattr(self, name).copy_(torch.from_numpy(np.asarray(state[name])))
        self.n_images = int(state["n_images"])
