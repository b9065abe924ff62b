"""Head atlas on hand-built models with known heads: kinds, scores, streaming invariances, errors."""
import numpy as np
import pytest
import torch

from vitcircuits.groundtruth.planted import PlantedConfig, build_planted_heads, random_like
from vitcircuits.heads.atlas import AtlasConfig, HeadAtlas, accumulate, build_atlas, new_accumulator
from vitcircuits.heads.offsets import HeadStatsAccumulator, OffsetGeometry


def scan(model, images_BCHW, config=AtlasConfig(n_boot=50), batch_size=4):
    acc = new_accumulator(model, config)
    for start in range(0, len(images_BCHW), batch_size):
        accumulate(model, acc, images_BCHW[start : start + batch_size], list(range(start, min(start + batch_size, len(images_BCHW)))))
    return acc, build_atlas(model, acc, config, "planted")


def noise_images(cfg, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, cfg.grid[0] * cfg.patch_size, cfg.grid[1] * cfg.patch_size, generator=g)


@pytest.mark.parametrize("planted_cfg", [
    PlantedConfig(),
    PlantedConfig(grid=(6, 9), class_token=False, registers=2),
], ids=["8x8_cls", "6x9_registers_no_cls"])
def test_every_planted_head_gets_its_kind(planted_cfg):
    planted = build_planted_heads(planted_cfg)
    _, atlas = scan(planted.model, noise_images(planted_cfg))
    for (layer, head), kind in planted.truth.items():
        row = atlas.row(layer, head)
        assert row.kind == kind, (layer, head, kind, row)
        if kind == "modular":
            assert row.modular_score > 0.95 and row.modular_score_lo > 0.9
            assert row.neighbour_mass_border > 0.95 and row.direction_coverage == 8
        elif kind == "directional":
            assert (row.peak_dy, row.peak_dx) == planted.offsets[(layer, head)]
            assert row.modular_score < 0.2
        else:
            assert row.modular_score < 0.2
        assert row.content_dependence < 0.01  # planted heads attend by position alone
        assert row.positional_kind == kind and row.positional_agreement > 0.95
    # the modular head's kernel: mass on exactly the 8 neighbours
    (ml, mh), = [k for k, v in planted.truth.items() if v == "modular"]
    window = atlas.window(1)[ml, mh]
    ring = np.delete(window.ravel(), 4)
    # every neighbour gets ≥ 1/8 of a query's attention (more at borders, where fewer exist); nothing else does
    assert window[1, 1] < 0.01 and ring.min() > 0.12 and ring.max() < 1 / 3
    kernel = np.nan_to_num(atlas.kernels_LHYX[ml, mh]).copy()
    cy, cx = kernel.shape[0] // 2, kernel.shape[1] // 2
    kernel[cy - 1 : cy + 2, cx - 1 : cx + 2] = 0
    assert kernel.max() < 1e-3
    assert atlas.baselines["neighbours"].kind == "modular" and atlas.baselines["self"].kind == "self"
    assert atlas.baselines["uniform"].kind == "global"


def test_random_model_has_no_modular_head():
    planted_cfg = PlantedConfig()
    _, atlas = scan(random_like(planted_cfg).model, noise_images(planted_cfg))
    assert atlas.heads_of_kind("modular") == []
    assert max(r.modular_score for r in atlas.rows) < 0.5


def test_accumulators_merge_and_batching_do_not_change_results():
    planted_cfg = PlantedConfig()
    model = random_like(planted_cfg).model
    images = noise_images(planted_cfg, n=12, seed=3)
    config = AtlasConfig(n_boot=30)
    whole, _ = scan(model, images, config, batch_size=12)
    left, _ = scan(model, images[:5], config, batch_size=2)
    right = new_accumulator(model, config)
    accumulate(model, right, images[5:], list(range(5, 12)))
    left.merge(right)
    for name, value in whole.state_dict().items():
        assert np.allclose(value, left.state_dict()[name], rtol=1e-5, atol=1e-6), name
    restored = new_accumulator(model, config)
    restored.load_state_dict(whole.state_dict())
    assert restored.n_images == 12
    rows_a = build_atlas(model, whole, config, "m").rows
    rows_b = build_atlas(model, restored, config, "m").rows
    assert rows_a == rows_b


def test_memory_does_not_grow_with_images():
    planted_cfg = PlantedConfig()
    model = random_like(planted_cfg).model
    acc = new_accumulator(model, AtlasConfig(n_boot=10))
    accumulate(model, acc, noise_images(planted_cfg, 2), [0, 1])
    size = sum(v.nbytes for v in acc.state_dict().values())
    accumulate(model, acc, noise_images(planted_cfg, 6, seed=1), list(range(2, 8)))
    assert sum(v.nbytes for v in acc.state_dict().values()) == size


def test_save_and_load_round_trip(tmp_path):
    planted = build_planted_heads(PlantedConfig())
    _, atlas = scan(planted.model, noise_images(planted.config, 4))
    atlas.save(tmp_path)
    loaded = HeadAtlas.load(tmp_path)
    assert loaded.rows == atlas.rows and loaded.layout == atlas.layout
    assert np.array_equal(loaded.kernels_LHYX, atlas.kernels_LHYX, equal_nan=True)
    header = (tmp_path / "heads.csv").read_text().splitlines()[0].split(",")
    for column in ("layer", "head", "kind", "modular_score", "neighbour_mass", "self_mass", "cls_mass", "register_mass",
                   "mean_distance_patches", "mean_distance_px", "direction_coverage", "direction_entropy",
                   "peak_dy", "peak_dx", "peak_mass", "n_images", "modular_score_lo", "modular_score_hi"):
        assert column in header


def test_grid_too_small_for_radius_is_a_clear_error():
    with pytest.raises(ValueError, match="3x3 patch grid is too small for neighbourhood radius 3"):
        OffsetGeometry(3, 3, 3)


def test_non_finite_attention_names_layer_and_head():
    planted = build_planted_heads(PlantedConfig())
    acc = HeadStatsAccumulator(planted.layout, 2, 6, 1, (4, 4), n_boot=2)
    pattern = torch.full((1, 6, planted.layout.n_tokens, planted.layout.n_tokens), 1.0 / planted.layout.n_tokens)
    pattern[0, 4, 3, 2] = float("nan")
    with pytest.raises(FloatingPointError, match=r"layer 1, head\(s\) \[4\]"):
        acc.update(1, pattern, [0])


def test_kernel_counts_normalise_border_queries():
    geometry = OffsetGeometry(4, 5, 1)
    counts = geometry.offset_counts()
    assert counts.shape == (7, 9)
    assert counts[3, 4] == 20  # offset (0, 0): every patch
    assert counts[3, 5] == 16  # offset (0, +1): 4 rows x 4 columns have a right neighbour
    assert counts[0, 0] == 1  # offset (-3, -4): only the bottom-right query
