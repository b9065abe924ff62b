"""Eval-time preprocessing derived from a timm ``pretrained_cfg``.

The pipeline reproduces timm's eval transform
(``timm.data.create_transform(**resolve_data_config({}, pretrained_cfg=cfg), is_training=False)``)
step for step, so a model sees exactly the pixels it was evaluated with:

1. resize, depending on ``crop_mode``:

   * ``center``: keep the aspect ratio so that the image covers
     ``scale_size = floor(input_size / crop_pct)`` (shortest edge for square targets);
   * ``squash``: resize both edges to ``scale_size``, ignoring the aspect ratio;
   * ``border``: keep the aspect ratio so that the image fits inside ``scale_size``;

2. center crop to ``input_size`` (``border`` pads with the mean colour where the image is smaller);
3. convert to float32 in [0, 1] and normalise with ``mean`` / ``std``.

Rounding follows timm/torchvision exactly (``floor`` for the scale size, ``int`` for the long edge of
a square-target resize, ``round`` for keep-ratio sizes and crop offsets).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_INPUT_SIZE = (224, 224)
DEFAULT_INTERPOLATION = "bicubic"
DEFAULT_CROP_PCT = 0.875
DEFAULT_CROP_MODE = "center"

CROP_MODES = ("center", "squash", "border")
INTERPOLATIONS = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "box": InterpolationMode.BOX,
    "hamming": InterpolationMode.HAMMING,
    "lanczos": InterpolationMode.LANCZOS,
}


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything needed to turn an RGB image into a model input tensor.

    Attributes:
        input_size: ``(H, W)`` of the output tensor.
        interpolation: resampling filter name, one of ``INTERPOLATIONS`` (timm naming).
        crop_pct: ratio ``input_size / resize size``; 1.0 resizes straight to ``input_size``.
        crop_mode: ``"center"``, ``"squash"`` or ``"border"`` (see the module docstring).
        mean: per-channel RGB mean subtracted after scaling pixels to [0, 1].
        std: per-channel RGB standard deviation divided by after subtracting ``mean``.
    """

    input_size: tuple[int, int] = DEFAULT_INPUT_SIZE
    interpolation: str = DEFAULT_INTERPOLATION
    crop_pct: float = DEFAULT_CROP_PCT
    crop_mode: str = DEFAULT_CROP_MODE
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if len(self.input_size) != 2 or min(self.input_size) <= 0:
            raise ValueError(f"input_size must be (H, W) with positive entries, got {self.input_size}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation {self.interpolation!r} not supported; use one of {sorted(INTERPOLATIONS)}"
            )
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode {self.crop_mode!r} not supported; use one of {CROP_MODES}")
        if not self.crop_pct > 0:
            raise ValueError(f"crop_pct must be > 0, got {self.crop_pct}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean/std must be 3 RGB values with std > 0, got {self.mean} / {self.std}")

    @classmethod
    def from_pretrained_cfg(
        cls, cfg: Mapping[str, Any], img_size: int | tuple[int, int] | None = None
    ) -> PreprocessConfig:
        """Build the config from a timm ``pretrained_cfg`` dict (e.g. ``model.pretrained_cfg``).

        Missing or empty keys fall back to the same defaults as ``timm.data.resolve_data_config``
        (224x224, bicubic, crop_pct 0.875, center crop, ImageNet mean/std); ``test_input_size`` is
        ignored, as there. ``img_size`` (an int or ``(H, W)``) overrides the input size and keeps
        every other setting.
        """
        if img_size is not None:
            input_size = _as_hw(img_size)
        else:
            cfg_size = tuple(cfg.get("input_size") or (3, *DEFAULT_INPUT_SIZE))
            if len(cfg_size) != 3 or cfg_size[0] != 3:
                raise ValueError(f"only 3-channel (C, H, W) input_size is supported, got {cfg_size}")
            input_size = (int(cfg_size[1]), int(cfg_size[2]))
        return cls(
            input_size=input_size,
            interpolation=cfg.get("interpolation") or DEFAULT_INTERPOLATION,
            crop_pct=float(cfg.get("crop_pct") or DEFAULT_CROP_PCT),
            crop_mode=cfg.get("crop_mode") or DEFAULT_CROP_MODE,
            mean=tuple(float(v) for v in (cfg.get("mean") or IMAGENET_MEAN)),
            std=tuple(float(v) for v in (cfg.get("std") or IMAGENET_STD)),
        )

    @property
    def scale_size(self) -> tuple[int, int]:
        """``(H, W)`` the image is resized towards before cropping: ``floor(input_size / crop_pct)``."""
        return (
            math.floor(self.input_size[0] / self.crop_pct),
            math.floor(self.input_size[1] / self.crop_pct),
        )

    def resized_hw(self, width: int, height: int) -> tuple[int, int]:
        """``(H, W)`` a ``width`` x ``height`` image is resized to before the crop (step 1)."""
        scale_hw = self.scale_size
        if self.crop_mode == "squash":
            return scale_hw
        if self.crop_mode == "border":
            return _keep_ratio_size(width, height, scale_hw, fit_inside=True)
        if scale_hw[0] != scale_hw[1]:
            return _keep_ratio_size(width, height, scale_hw, fit_inside=False)
        # torchvision's resize to a shortest edge: the long edge is truncated, not rounded
        short, long = sorted((width, height))
        new_long = int(scale_hw[0] * long / short)
        return (scale_hw[0], new_long) if width >= height else (new_long, scale_hw[0])


def _as_hw(img_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(img_size, int):
        return (img_size, img_size)
    if len(img_size) == 2:
        return (int(img_size[0]), int(img_size[1]))
    raise ValueError(f"img_size must be an int or (H, W), got {img_size!r}")


def _keep_ratio_size(width: int, height: int, target_hw: tuple[int, int], fit_inside: bool) -> tuple[int, int]:
    """Aspect-preserving ``(H, W)`` covering (``fit_inside=False``) or inside ``target_hw``."""
    ratio_h, ratio_w = height / target_hw[0], width / target_hw[1]
    ratio = max(ratio_h, ratio_w) if fit_inside else min(ratio_h, ratio_w)
    return (round(height / ratio), round(width / ratio))


def _center_crop_or_pad(image: Image.Image, size_hw: tuple[int, int], fill: list[int]) -> Image.Image:
    """Pad (with ``fill``) edges smaller than ``size_hw``, then center crop to ``size_hw``."""
    crop_h, crop_w = size_hw
    width, height = image.size
    if crop_w > width or crop_h > height:
        pad_w, pad_h = max(crop_w - width, 0), max(crop_h - height, 0)
        padding_ltrb = [pad_w // 2, pad_h // 2, (pad_w + 1) // 2, (pad_h + 1) // 2]
        image = TF.pad(image, padding_ltrb, fill=tuple(fill))
        width, height = image.size
    top = round((height - crop_h) / 2.0)
    left = round((width - crop_w) / 2.0)
    return TF.crop(image, top, left, crop_h, crop_w)


def preprocess_image(image: Image.Image, config: PreprocessConfig) -> torch.Tensor:
    """Resize, crop and normalise an RGB PIL image; returns ``image_CHW`` (float32, [3, H, W])."""
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode!r} (use vitcircuits.data.open_image)")
    interpolation = INTERPOLATIONS[config.interpolation]
    image = TF.resize(image, list(config.resized_hw(*image.size)), interpolation)
    if config.crop_mode == "border":
        image = _center_crop_or_pad(image, config.input_size, [round(255 * v) for v in config.mean])
    else:
        image = TF.center_crop(image, list(config.input_size))
    # Same float32 operations as TF.to_tensor + TF.normalize (bitwise equal), done in numpy so
    # per-image work does not go through torch's intra-op thread pool.
    pixels_HWC = np.asarray(image, dtype=np.float32) / np.float32(255)
    normalised_HWC = (pixels_HWC - np.asarray(config.mean, np.float32)) / np.asarray(config.std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(normalised_HWC.transpose(2, 0, 1)))


def make_eval_transform(config: PreprocessConfig) -> Callable[[Image.Image], torch.Tensor]:
    """A picklable ``PIL RGB image -> image_CHW`` callable (safe to ship to DataLoader workers)."""
    return functools.partial(preprocess_image, config=config)
