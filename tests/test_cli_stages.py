"""`vitcircuits heads` and `vitcircuits compose` write their run folders (small random model)."""
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from vitcircuits.cli import app
from vitcircuits.testing.checkpoints import noise_image_folder, tiny_vit_folder


@pytest.fixture()
def model_and_images(tmp_path):
    return tiny_vit_folder(tmp_path / "m"), noise_image_folder(tmp_path / "images", 12)


def test_heads_then_compose_from_it(model_and_images, tmp_path):
    folder, images = model_and_images
    common = ["--model", str(folder), "--images", str(images), "--device", "cpu", "--batch-size", "6"]
    result = CliRunner().invoke(app, ["heads", *common, "--out", str(tmp_path / "h"), "--n-boot", "20"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "h" / "manifest.json").is_file()
    for name in ("heads.csv", "kernels.npz", "atlas.json", "atlas.png", "distance_vs_layer.png", "modular_scores.png", "figures.json"):
        assert (tmp_path / "h" / "heads" / name).is_file(), name
    kernels = np.load(tmp_path / "h" / "heads" / "kernels.npz")
    assert kernels["kernels"].shape == (3, 2, 15, 15)
    result = CliRunner().invoke(app, ["compose", *common, "--out", str(tmp_path / "c"), "--heads-from", str(tmp_path / "h")])
    assert result.exit_code == 0, result.output
    circuits = json.loads((tmp_path / "c" / "composition" / "circuits.json").read_text())
    assert circuits["ablation"] == "mean" and "transfer" in circuits
    assert not [c for c in circuits["circuits"] if c["verdict"] == "supported"]  # random weights
    composition = tmp_path / "c" / "composition"
    assert (composition / "composition.csv").is_file() and (composition / "weight_heatmaps.png").is_file()
    assert not (tmp_path / "c" / "heads").exists(), "the atlas came from --heads-from"
    missing = CliRunner().invoke(app, ["compose", *common, "--out", str(tmp_path / "d"), "--heads-from", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "no heads/atlas.json" in missing.output


def test_compose_without_heads_from_runs_the_atlas_first(model_and_images, tmp_path):
    folder, images = model_and_images
    out = tmp_path / "c"
    result = CliRunner().invoke(app, ["compose", "--model", str(folder), "--images", str(images), "--device", "cpu",
                                      "--batch-size", "6", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "heads" / "atlas.json").is_file() and (out / "heads" / "heads.csv").is_file()
    circuits = json.loads((out / "composition" / "circuits.json").read_text())
    atlas = json.loads((out / "heads" / "atlas.json").read_text())
    assert {s["kind"] for s in circuits["senders"]} <= {r["kind"] for r in atlas["rows"]}


@pytest.mark.parametrize(("metric", "message"), [("probe", "needs labelled images"), ("margins", "unknown task metric 'margins'")])
def test_compose_task_metric_errors_are_one_line(model_and_images, tmp_path, metric, message):
    folder, images = model_and_images
    result = CliRunner().invoke(app, ["compose", "--model", str(folder), "--images", str(images), "--device", "cpu", "--batch-size", "6",
                                      "--out", str(tmp_path / "c"), "--task-metric", metric])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output


def test_compose_with_a_probe_on_labelled_images(model_and_images, tmp_path):
    folder, images = model_and_images
    (images / "labels.tsv").write_text("filename\tindex\n" + "".join(f"{i:02d}.png\t{i % 3}\n" for i in range(12)))
    result = CliRunner().invoke(app, ["compose", "--model", str(folder), "--images", str(images), "--device", "cpu", "--batch-size", "6",
                                      "--out", str(tmp_path / "c"), "--task-metric", "probe"])
    assert result.exit_code == 0, result.output
    task = json.loads((tmp_path / "c" / "composition" / "circuits.json").read_text())["task_metric"]
    assert task["kind"] == "margin" and task["probe"] and task["n_edges"] == 3 * 2 * 2 * 3 and task["n_checked"] == task["n_edges"]
