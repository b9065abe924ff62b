"""PreprocessConfig + preprocess_image must reproduce timm's eval transform exactly."""

from pathlib import Path

import numpy as np
import pytest
import timm.data
import torch
from PIL import Image
from timm.models import get_pretrained_cfg

from vitcircuits.data import PreprocessConfig, make_eval_transform, preprocess_image

IMAGENET_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "imagenet-samples"
# landscape, portrait and near-square photos of different sizes
PHOTOS = ["n01440764_tench.jpg", "n09288635_geyser.jpg", "n13040303_stinkhorn.jpg", "n02640242_sturgeon.jpg"]
IMAGENET_MEAN_STD = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}

CONFIGS = {
    "vit_b32_augreg": get_pretrained_cfg("vit_base_patch32_224.augreg_in21k_ft_in1k").to_dict(),
    "dinov2_small": get_pretrained_cfg("vit_small_patch14_dinov2.lvd142m").to_dict(),
    "bilinear": {
        "input_size": (3, 224, 224),
        "interpolation": "bilinear",
        "crop_pct": 0.875,
        **IMAGENET_MEAN_STD,
    },
    "nonsquare_center": {
        "input_size": (3, 160, 240),
        "interpolation": "bicubic",
        "crop_pct": 0.95,
        **IMAGENET_MEAN_STD,
    },
    "squash": {
        "input_size": (3, 192, 192),
        "interpolation": "bicubic",
        "crop_pct": 0.9,
        "crop_mode": "squash",
    },
    "squash_nonsquare": {
        "input_size": (3, 128, 200),
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "crop_mode": "squash",
    },
    "border": {
        "input_size": (3, 224, 224),
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        "crop_mode": "border",
        **IMAGENET_MEAN_STD,
    },
    "border_nonsquare": {
        "input_size": (3, 200, 150),
        "interpolation": "bicubic",
        "crop_pct": 0.9,
        "crop_mode": "border",
    },
    "defaults_only": {"num_classes": 1000},
}


@pytest.fixture(autouse=True)
def one_torch_thread():
    """timm's to_tensor/normalize on small images is far faster single-threaded on a busy 2-core box."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n_threads)


def timm_eval(cfg: dict, img_size=None):
    args = {} if img_size is None else {"input_size": (3, *img_size)}
    data_cfg = timm.data.resolve_data_config(args, pretrained_cfg=cfg)
    return timm.data.create_transform(**data_cfg, is_training=False)


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def assert_matches_timm(image: Image.Image, cfg: dict, img_size=None) -> None:
    expected_CHW = timm_eval(cfg, img_size)(image)
    ours_CHW = preprocess_image(image, PreprocessConfig.from_pretrained_cfg(cfg, img_size=img_size))
    assert ours_CHW.dtype == torch.float32
    assert ours_CHW.shape == expected_CHW.shape
    assert (ours_CHW - expected_CHW).abs().max().item() <= 1e-6


@pytest.mark.skipif(
    not IMAGENET_DIR.is_dir(), reason="shared ImageNet samples (../shared/data/imagenet-samples) absent"
)
@pytest.mark.parametrize("cfg_name", sorted(CONFIGS))
def test_matches_timm_on_real_photos(cfg_name):
    for name in PHOTOS:
        with Image.open(IMAGENET_DIR / name) as photo:
            assert_matches_timm(photo.convert("RGB"), CONFIGS[cfg_name])


@pytest.mark.parametrize("cfg_name", sorted(CONFIGS))
@pytest.mark.parametrize("size", [(97, 300), (300, 97), (61, 37), (256, 256)])
def test_matches_timm_on_odd_sizes(cfg_name, size):
    """Odd aspect ratios and images smaller than the crop (timm pads / crops the same way)."""
    assert_matches_timm(noise_image(*size, seed=sum(size)), CONFIGS[cfg_name])


@pytest.mark.parametrize("img_size", [(160, 160), (128, 96)])
def test_img_size_override_matches_timm(img_size):
    cfg = CONFIGS["vit_b32_augreg"]
    assert_matches_timm(noise_image(333, 250, seed=1), cfg, img_size=img_size)
    config = PreprocessConfig.from_pretrained_cfg(cfg, img_size=img_size)
    assert config.input_size == img_size
    assert config.crop_pct == 0.9 and config.mean == (0.5, 0.5, 0.5)


def test_int_img_size_override():
    assert PreprocessConfig.from_pretrained_cfg(CONFIGS["dinov2_small"], img_size=224).input_size == (
        224,
        224,
    )


def test_from_pretrained_cfg_fields_and_defaults():
    config = PreprocessConfig.from_pretrained_cfg(CONFIGS["dinov2_small"])
    assert config == PreprocessConfig(
        input_size=(518, 518),
        interpolation="bicubic",
        crop_pct=1.0,
        crop_mode="center",
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
    )
    assert PreprocessConfig.from_pretrained_cfg({}) == PreprocessConfig()
    assert PreprocessConfig().crop_pct == 0.875 and PreprocessConfig().input_size == (224, 224)
    assert PreprocessConfig(input_size=(224, 224), crop_pct=0.9).scale_size == (248, 248)


def test_config_is_frozen_and_validated():
    config = PreprocessConfig()
    with pytest.raises(AttributeError):
        config.crop_pct = 1.0
    with pytest.raises(ValueError, match="crop_mode"):
        PreprocessConfig(crop_mode="random")
    with pytest.raises(ValueError, match="interpolation"):
        PreprocessConfig(interpolation="cubic")
    with pytest.raises(ValueError, match="3-channel"):
        PreprocessConfig.from_pretrained_cfg({"input_size": (1, 224, 224)})


def test_pixel_values_of_solid_image():
    """A uniform image stays uniform; value = (v / 255 - mean) / std per channel."""
    config = PreprocessConfig(input_size=(32, 48), mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 0.5))
    image_CHW = preprocess_image(Image.new("RGB", (100, 70), (255, 0, 51)), config)
    assert image_CHW.shape == (3, 32, 48)
    expected = torch.tensor([1.0, -2.0, (51 / 255 - 0.5) / 0.5])
    assert torch.allclose(image_CHW, expected[:, None, None].expand(3, 32, 48), atol=1e-6)


def test_border_mode_pads_with_mean_colour():
    """A wide image in border mode is letterboxed; the padding normalises to ~0."""
    config = PreprocessConfig(
        input_size=(64, 64), crop_pct=1.0, crop_mode="border", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
    )
    image_CHW = preprocess_image(Image.new("RGB", (128, 32), (255, 255, 255)), config)
    assert torch.allclose(image_CHW[:, 32, :], torch.ones(3, 64))  # image band in the middle
    assert image_CHW[:, 0, :].abs().max() < 0.01  # pad colour round(127.5) = 128 -> ~0
    assert image_CHW[:, 63, :].abs().max() < 0.01


def test_rejects_non_rgb_and_transform_is_picklable():
    import pickle

    transform = pickle.loads(pickle.dumps(make_eval_transform(PreprocessConfig(input_size=(16, 16)))))
    assert transform(Image.new("RGB", (20, 20))).shape == (3, 16, 16)
    with pytest.raises(ValueError, match="RGB"):
        transform(Image.new("L", (20, 20)))
