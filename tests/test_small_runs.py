"""`hunt` on 1, 5 and 20 images: every stage finishes or says why it was skipped, and the report is
written (issue: small runs)."""
import json

import numpy as np
import pytest
import timm
from PIL import Image
from typer.testing import CliRunner

from vitcircuits.cli import app
from vitcircuits.testing.checkpoints import save_timm_folder


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    args = {"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 3, "num_heads": 2, "num_classes": 3}
    root = tmp_path_factory.mktemp("small")
    return save_timm_folder(timm.create_model("vit_tiny_patch16_224", pretrained=False, **args), root / "m", "vit_tiny_patch16_224", args)


@pytest.mark.parametrize("n_images", [1, 5, 20])
def test_hunt_on_few_images_writes_the_report(model, tmp_path, n_images):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(n_images)
    for i in range(n_images):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images / f"{i:02d}.png")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["hunt", "--model", str(model), "--images", str(images), "--out", str(out), "--quick", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (out / "report.html").is_file()
    manifest = json.loads((out / "manifest.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in manifest.json"))
    assert manifest["images"]["n_ok"] == n_images
    sae = json.loads((out / "sae" / "metrics.json").read_text())
    if n_images == 1:  # image 0 is held out, so nothing is left to train on
        assert "no held-out rows" in sae["skipped"] or "training rows" in sae["skipped"]
        assert "skipped" in (out / "report.html").read_text()
    else:
        assert "skipped" not in sae and sae["batch_size"] <= sae["n_train_rows"] // 4
    for path in out.rglob("*.json"):
        json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in {path}"))
