"""`hunt --quick`: lighter settings, every stage still runs, and the image cap."""
import json

import torch
from typer.testing import CliRunner

import vitcircuits.hunt
from vitcircuits.cli import app
from vitcircuits.cli.commands import QUICK_IMAGES


def test_quick_caps_images_unless_given(monkeypatch, tmp_path):
    seen = {}

    def fake_hunt(out, model, images, config, **kwargs):
        seen["images"], seen["config"] = images, config
        return str(tmp_path / "report.html")

    monkeypatch.setattr(vitcircuits.hunt, "hunt", fake_hunt)
    args = ["hunt", "--model", "bundled:cifar10-vit", "--images", "bundled:cifar10", "--out", str(tmp_path / "r"), "--quick"]
    assert CliRunner().invoke(app, args).exit_code == 0
    assert seen["images"].max_images == QUICK_IMAGES and seen["config"].sae.epochs == 1 and seen["config"].atlas.n_boot == 50
    assert CliRunner().invoke(app, [*args, "--max-images", "7"]).exit_code == 0
    assert seen["images"].max_images == 7
    assert CliRunner().invoke(app, args[:-1]).exit_code == 0
    assert seen["images"].max_images is None and seen["config"].sae.epochs > 1


def test_quick_hunt_runs_every_stage(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(app, ["hunt", "--model", "bundled:cifar10-vit", "--images", "bundled:cifar10", "--out", str(tmp_path / "q"),
                                          "--quick", "--max-images", "40", "--batch-size", "40", "--device", "cpu"])
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    stages = json.loads((tmp_path / "q" / "stages.json").read_text())
    assert list(stages) == ["overview", "heads", "composition", "necessity", "sae", "features", "report"]
    necessity = json.loads((tmp_path / "q" / "necessity" / "necessity.json").read_text())
    assert necessity.get("skipped") == "no supported circuit" or (necessity["n_images"] == 40 and necessity["random"]["n_draws"] == 4)
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert manifest["config"]["hunt"]["compose"]["max_patch_images"] == 16 and manifest["sae"]["held_out"]["n_tokens"] == 4 * 64
