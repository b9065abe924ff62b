"""`hunt` on 1, 5 and 20 images: every stage finishes or says why it was skipped, and the report is
written (issue: small runs)."""
import json

import pytest
from typer.testing import CliRunner

from vitcircuits.cli import app
from vitcircuits.testing.checkpoints import noise_image_folder, tiny_vit_folder


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_vit_folder(tmp_path_factory.mktemp("small") / "m")


@pytest.mark.parametrize("n_images", [1, 5, 20])
def test_hunt_on_few_images_writes_the_report(model, tmp_path, n_images):
    images = noise_image_folder(tmp_path / "images", n_images, seed=n_images)
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
