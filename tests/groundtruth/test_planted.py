"""Planted heads: position-only patterns with >= 0.95 of each patch query's mass on the intended
targets, for any image; the truth table; the documented writes; the random negative control."""
import math
from functools import cache
from importlib.resources import files

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vitcircuits.groundtruth.planted import SINK, PlantedConfig, PlantedModel, build_planted_heads, random_like

CONFIGS = {
    "8x8-cls": PlantedConfig(),
    "6x9-registers-no-cls": PlantedConfig(grid=(6, 9), class_token=False, registers=2, n_layers=1, n_heads=7, offsets=((0, -1), (1, 1))),
}
MIN_MASS = 0.95


def probe_images(height: int, width: int) -> torch.Tensor:
    """``[B, 3, H, W]``: noise at two amplitudes and two spatial scales, constants, gradients,
    a checkerboard and two real CIFAR-10 photos (resized, ImageNet-like normalisation)."""
    g = torch.Generator().manual_seed(0)

    def blobs(cell: int) -> torch.Tensor:
        coarse = torch.randn(1, 3, math.ceil(height / cell), math.ceil(width / cell), generator=g)
        return F.interpolate(coarse, scale_factor=cell, mode="bilinear")[..., :height, :width]

    ramp_W = torch.linspace(-2, 2, width)
    ramp_H = torch.linspace(-2, 2, height)[:, None]
    checker_HW = 2.0 * (torch.arange(height)[:, None] + torch.arange(width)).remainder(2) - 1.0
    synthetic = [
        torch.randn(1, 3, height, width, generator=g),
        3 * torch.randn(1, 3, height, width, generator=g),
        blobs(8),
        blobs(2),
        torch.zeros(1, 3, height, width),
        torch.full((1, 3, height, width), 2.5),
        torch.full((1, 3, height, width), -2.0),
        ramp_W.expand(1, 3, height, width),
        ramp_H.expand(1, 3, height, width),
        checker_HW.expand(1, 3, height, width),
    ]
    folder = files("vitcircuits") / "assets" / "images" / "cifar10"
    photos = []
    for name in ("airplane_0000.jpg", "automobile_0001.jpg"):
        pixels_HWC = np.asarray(Image.open(folder / name).convert("RGB"), dtype=np.float32) / 255.0
        photo = torch.from_numpy(pixels_HWC).permute(2, 0, 1)[None]
        photos.append((F.interpolate(photo, size=(height, width), mode="bilinear") - 0.45) / 0.25)
    return torch.cat(synthetic + photos)


@cache
def planted_patterns(name: str) -> tuple[PlantedModel, torch.Tensor, dict]:
    """The planted model of ``CONFIGS[name]``, its layer-0 patterns ``[B, H, N, N]`` on the probe
    images, and the cache of layer 0's residual stream."""
    planted = build_planted_heads(CONFIGS[name])
    images_BCHW = probe_images(*planted.model.cfg.img_size)
    _, cache = planted.model.run_with_cache(images_BCHW, names_filter=lambda n: n.startswith("blocks.0."))
    return planted, cache["blocks.0.attn.hook_pattern"], cache


def expected_targets(planted: PlantedModel, kind: str, offset: tuple[int, int] | None) -> dict[int, list[int]]:
    """Patch query token → the key tokens it should attend to, from the head's definition."""
    layout = planted.layout

    def inside(row: int, col: int) -> bool:
        return 0 <= row < layout.rows and 0 <= col < layout.cols

    targets = {}
    for row in range(layout.rows):
        for col in range(layout.cols):
            query = layout.patch_index(row, col)
            if kind == "global":
                keys = list(range(layout.n_tokens))
            elif kind == SINK:
                keys = [layout.cls_index if layout.cls_index is not None else layout.register_slice[0]]
            elif kind == "modular":
                around = [(row + dy, col + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
                keys = [layout.patch_index(r, c) for r, c in around if inside(r, c)]
            elif kind == "directional" and inside(row + offset[0], col + offset[1]):
                keys = [layout.patch_index(row + offset[0], col + offset[1])]
            else:  # self, or a directional query whose offset leaves the grid
                keys = [query]
            targets[query] = keys
    return targets


@pytest.mark.parametrize("name", CONFIGS)
def test_truth_lists_exactly_the_planted_heads(name):
    cfg = CONFIGS[name]
    planted, _, _ = planted_patterns(name)
    n_planted = 4 + len(cfg.offsets)
    assert set(planted.truth) == {(0, head) for head in range(n_planted)}
    kinds = sorted(planted.truth.values())
    assert kinds == sorted(["modular", "self", "cls/sink", "global"] + ["directional"] * len(cfg.offsets))
    assert sorted(planted.offsets.values()) == sorted(cfg.offsets)
    assert all(planted.truth[head] == "directional" for head in planted.offsets)
    layout = planted.layout
    assert planted.sink_index == (0 if cfg.class_token else layout.register_slice[0])
    features_BD = planted.model(probe_images(*planted.model.cfg.img_size))
    assert features_BD.shape == (12, planted.model.cfg.d_model) and torch.isfinite(features_BD).all()


@pytest.mark.parametrize("name", CONFIGS)
def test_planted_heads_put_their_mass_on_the_targets_for_every_image(name):
    planted, pattern_BHQK, _ = planted_patterns(name)
    for (layer, head), kind in planted.truth.items():
        targets = expected_targets(planted, kind, planted.offsets.get((layer, head)))
        mask_QK = planted.target_masks[(layer, head)]
        for query, keys in targets.items():
            assert mask_QK[query].nonzero().flatten().tolist() == sorted(keys), (kind, query)
            mass_B = pattern_BHQK[:, head, query, keys].sum(-1)
            assert mass_B.min() >= MIN_MASS, f"{kind} head {head}, query {query}: mass {mass_B.min():.4f}"


@pytest.mark.parametrize("name", CONFIGS)
def test_planted_patterns_do_not_depend_on_the_image(name):
    planted, pattern_BHQK, _ = planted_patterns(name)
    heads = sorted(head for _, head in planted.truth)
    deviation = (pattern_BHQK[:, heads] - pattern_BHQK[:1, heads]).abs().max()
    assert deviation < 2e-3


@pytest.mark.parametrize("name", CONFIGS)
def test_modular_head_spreads_and_directional_heads_point(name):
    planted, pattern_BHQK, _ = planted_patterns(name)
    layout = planted.layout
    (modular,) = [head for (_, head), kind in planted.truth.items() if kind == "modular"]
    for row in range(1, layout.rows - 1):
        for col in range(1, layout.cols - 1):
            query = layout.patch_index(row, col)
            around = [layout.patch_index(row + dy, col + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
            per_direction_B8 = pattern_BHQK[:, modular, query, around]
            assert ((per_direction_B8 >= 0.05).sum(-1) >= 6).all()
            assert (per_direction_B8 > 0.9 / 8).all()  # in fact almost exactly uniform
    for (_, head), (dy, dx) in planted.offsets.items():
        row, col = layout.rows // 2, layout.cols // 2
        query = layout.patch_index(row, col)
        assert (pattern_BHQK[:, head, query].argmax(-1) == layout.patch_index(row + dy, col + dx)).all()


@pytest.mark.parametrize("name", CONFIGS)
def test_planted_heads_write_the_target_average_of_the_content_code(name):
    planted, pattern_BHQK, cache = planted_patterns(name)
    content_BND = cache["blocks.0.hook_resid_pre"][..., planted.content_slice]
    assert content_BND[:, planted.layout.patch_start :].abs().amax() > 0
    written_BND = cache["blocks.0.hook_resid_mid"] - cache["blocks.0.hook_resid_pre"]
    for _, head in planted.truth:
        expected_BNC = pattern_BHQK[:, head] @ content_BND
        actual_BNC = written_BND[..., planted.out_slice(0, head)]
        torch.testing.assert_close(actual_BNC, expected_BNC, rtol=0, atol=1e-3 * content_BND.abs().amax().item())
    assert written_BND[..., : planted.content_slice.stop].abs().amax() == 0  # pos and content dims untouched


def test_random_like_is_a_negative_control():
    planted, _, _ = planted_patterns("8x8-cls")
    control = random_like(planted.config)
    assert control.truth == {}
    assert [p.shape for p in control.model.parameters()] == [p.shape for p in planted.model.parameters()]
    images_BCHW = probe_images(*planted.model.cfg.img_size)
    _, cache = control.model.run_with_cache(images_BCHW, names_filter="blocks.0.attn.hook_pattern")
    random_BHQK = cache["blocks.0.attn.hook_pattern"]
    patches = slice(planted.layout.patch_start, None)
    for (_, head), kind in planted.truth.items():
        if kind == "global":
            continue
        mask_QK = planted.target_masks[(0, head)][patches]
        random_mass = (random_BHQK[:, head, patches] * mask_QK).sum(-1).mean()
        assert random_mass < 0.5, f"random head {head} looks {kind} (mass {random_mass:.3f})"


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"n_heads": 3}, "fewer than"),
        ({"class_token": False}, "sink"),
        ({"offsets": ((0, 0),)}, "offsets"),
        ({"content_dims": 5}, "even"),
    ],
)
def test_invalid_configs_are_rejected(changes, message):
    with pytest.raises(ValueError, match=message):
        PlantedConfig(**changes)
