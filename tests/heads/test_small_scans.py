"""Small scans work: with one image, two bootstrap replicates or no replicate of positive weight,
every interval contains its point estimate and the atlas figures draw (issue 13, item 4)."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from vitcircuits.cli import app
from vitcircuits.groundtruth.planted import PlantedConfig, random_like
from vitcircuits.heads.atlas import AtlasConfig, HeadAtlas, accumulate, build_atlas, new_accumulator
from vitcircuits.heads.figures import plot_atlas, plot_distance_vs_layer, plot_modular_scores
from vitcircuits.heads.metrics import CI_METRICS
from vitcircuits.models.loading import load_model
from vitcircuits.plotting.figures import error_bars
from vitcircuits.testing.checkpoints import noise_image_folder, tiny_vit_folder

PNG = b"\x89PNG"


def _estimate(row: dict, name: str) -> float:
    return row["cls_mass"] + row["dist_mass"] + row["register_mass"] if name == "prefix_mass" else row[name]


def assert_intervals_contain_estimates(rows: list[dict]) -> None:
    for row in rows:
        for name in CI_METRICS:
            lo, value, hi = row[f"{name}_lo"], _estimate(row, name), row[f"{name}_hi"]
            assert lo <= value + 1e-12 and value <= hi + 1e-12, (row["layer"], row["head"], name, lo, value, hi)


@pytest.mark.parametrize(("n_images", "n_boot", "seed"), [(1, 50, 0), (8, 2, 0), (3, 2, 0), (1, 2, 2)],
                         ids=["one_image", "two_replicates", "three_images_two_replicates", "no_replicate_with_weight"])
def test_small_scan_intervals_contain_estimates_and_figures_draw(tmp_path, n_images, n_boot, seed):
    cfg = PlantedConfig()
    model = random_like(cfg).model
    images = torch.randn(n_images, 3, cfg.grid[0] * cfg.patch_size, cfg.grid[1] * cfg.patch_size, generator=torch.Generator().manual_seed(0))
    config = AtlasConfig(n_boot=n_boot, seed=seed)
    acc = new_accumulator(model, config)
    accumulate(model, acc, images, list(range(n_images)))
    if seed == 2:  # Poisson draws of image 0 under seed 2 are (0, 0): no replicate has weight
        assert not (acc.boot_weight_Z > 0).any()
    atlas = build_atlas(model, acc, config, "planted")
    assert_intervals_contain_estimates([r.as_dict() for r in atlas.rows])
    if seed == 2:
        assert all(r.modular_score_lo == r.modular_score == r.modular_score_hi for r in atlas.rows)
    for plot, name in ((plot_atlas, "atlas.png"), (plot_modular_scores, "modular_scores.png"), (plot_distance_vs_layer, "distance.png")):
        assert plot(atlas, tmp_path / name).read_bytes().startswith(PNG), name


def test_error_bars_are_clipped_at_zero():
    bars = error_bars([0.5, 0.2, float("nan")], [0.6, 0.1, 0.0], [0.7, 0.1, 1.0])
    assert bars.shape == (2, 3)
    assert bars[:, 0].tolist() == [0.0, pytest.approx(0.2)] and bars[:, 1].tolist() == [pytest.approx(0.1), 0.0]
    assert np.isnan(bars[:, 2]).all()


@pytest.mark.parametrize("extra", [["--max-images", "1"], ["--n-boot", "2"]], ids=["one_image", "n_boot_2"])
def test_heads_command_on_a_small_run_writes_the_figures(tmp_path, extra):
    folder, images = tiny_vit_folder(tmp_path / "m", depth=2), noise_image_folder(tmp_path / "images", 4)
    out = tmp_path / "h"
    result = CliRunner().invoke(app, ["heads", "--model", str(folder), "--images", str(images), "--device", "cpu", "--out", str(out), *extra])
    assert result.exit_code == 0, result.output
    for name in ("atlas.png", "modular_scores.png", "distance_vs_layer.png"):
        assert (out / "heads" / name).read_bytes().startswith(PNG), name
    atlas = json.loads((out / "heads" / "atlas.json").read_text())
    assert atlas["rows"][0]["n_images"] == (1 if "--max-images" in extra else 4)
    assert_intervals_contain_estimates(atlas["rows"])


def test_no_head_is_local_on_a_grid_where_uniform_attention_already_is():
    from vitcircuits.heads.kinds import classify

    head = SimpleNamespace(cls_mass=0.0, dist_mass=0.0, register_mass=0.0, self_mass=0.1, peak_dy=0, peak_dx=1, peak_mass=0.2,
                           neighbour_mass=0.9, direction_coverage=8, direction_entropy=0.95, top_direction_share=0.2,
                           mean_distance_patches=1.0)
    assert classify(head, SimpleNamespace(neighbour_mass=0.2, mean_distance_patches=3.0)) == "modular"
    assert classify(head, SimpleNamespace(neighbour_mass=0.56, mean_distance_patches=1.2)) == "global"  # a 3x3 grid at radius 1


def test_a_grid_without_interior_queries_writes_no_nan(tmp_path):
    """On a grid too small for an interior query at radius 1 the interior mass is null, never NaN."""
    folder = tiny_vit_folder(tmp_path / "m", img_size=8, embed_dim=16, depth=1)
    model = load_model(str(folder), device="cpu").model
    acc = new_accumulator(model, AtlasConfig(n_boot=4))
    accumulate(model, acc, torch.randn(2, 3, 8, 8), [0, 1])
    atlas = build_atlas(model, acc, AtlasConfig(n_boot=4), "test")
    atlas.save(tmp_path / "heads")
    assert all(row.neighbour_mass_interior is None for row in atlas.rows)
    assert "nan" not in (tmp_path / "heads" / "heads.csv").read_text().lower()
    assert HeadAtlas.load(tmp_path / "heads").rows[0].neighbour_mass_interior is None
