from pathlib import Path

import pytest
import torch

SHARED = Path("../shared")
DINO_DIR = SHARED / "models" / "dinov2-small-imgfocus"
IMAGENET_DIR = SHARED / "data" / "imagenet-samples"
CIFAR_ZIP = SHARED / "data" / "cifar10-jpeg.zip"

requires_dino = pytest.mark.skipif(not DINO_DIR.is_dir(), reason="../shared/models/dinov2-small-imgfocus is absent (it exists on CI and dev machines)")
requires_imagenet = pytest.mark.skipif(not IMAGENET_DIR.is_dir(), reason="../shared/data/imagenet-samples is absent (it exists on CI and dev machines)")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
