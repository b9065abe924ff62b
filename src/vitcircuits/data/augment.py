"""Deterministic augmented views of preprocessed images, for harvesting more activation rows
from a small image set (random resized crop and horizontal flip, applied to the normalised
tensor so the model's preprocessing is unchanged)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    """Settings of the augmented views."""

    min_scale: float = 0.35
    """Smallest crop area as a fraction of the image."""
    max_aspect: float = 4 / 3
    """Largest crop aspect ratio (and its inverse the smallest)."""
    seed: int = 0
    """Views are a function of (seed, image index, view number) only."""


def augmented_view(image_CHW: torch.Tensor, image_index: int, view: int, config: AugmentConfig) -> torch.Tensor:
    """View ``view`` (≥ 1) of one image: a random crop resized back to the input size, flipped
    with probability 1/2. View 0 is the image itself."""
    if view == 0:
        return image_CHW
    gen = torch.Generator().manual_seed(((config.seed * 1_000_003 + image_index) * 1_009 + view) % 2**62)
    _, H, W = image_CHW.shape
    area = float(torch.empty(1).uniform_(config.min_scale, 1.0, generator=gen)) * H * W
    log_ratio = float(torch.empty(1).uniform_(-1.0, 1.0, generator=gen)) * torch.log(torch.tensor(config.max_aspect)).item()
    ratio = float(torch.tensor(log_ratio).exp())
    h = max(1, min(H, round((area / ratio) ** 0.5)))
    w = max(1, min(W, round((area * ratio) ** 0.5)))
    top = int(torch.randint(0, H - h + 1, (1,), generator=gen))
    left = int(torch.randint(0, W - w + 1, (1,), generator=gen))
    crop_1CHW = image_CHW[None, :, top : top + h, left : left + w]
    out_CHW = F.interpolate(crop_1CHW, size=(H, W), mode="bilinear", align_corners=False, antialias=True)[0]
    return out_CHW.flip(-1) if bool(torch.rand(1, generator=gen) < 0.5) else out_CHW


def with_views(images_BCHW: torch.Tensor, indices: tuple[int, ...], views: int, config: AugmentConfig) -> torch.Tensor:
    """``[B * views, C, H, W]``: every image followed by its ``views - 1`` augmented views."""
    if views == 1:
        return images_BCHW
    return torch.stack([augmented_view(img, i, v, config) for img, i in zip(images_BCHW, indices) for v in range(views)])
