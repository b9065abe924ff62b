"""`vitcircuits cache`: shards with (image, row, col) per row, equal to run_with_cache; resume."""
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from vitcircuits.cli import app
from vitcircuits.models.loading import load_model
from vitcircuits.testing.checkpoints import save_timm_folder


@pytest.fixture()
def tiny_model_and_images(tmp_path):
    args = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 3, "reg_tokens": 1}
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **args)
    folder = save_timm_folder(model, tmp_path / "model", "vit_tiny_patch16_224", args)
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(images / f"img{i}.png")
    (images / "broken.jpg").write_bytes(b"not an image")
    return folder, images


def test_cache_shards_match_run_with_cache_and_resume(tiny_model_and_images, tmp_path):
    folder, images = tiny_model_and_images
    out = tmp_path / "cache"
    hook = "blocks.1.hook_resid_post"
    args = ["cache", "--model", str(folder), "--images", str(images), "--out", str(out), "--hooks", f"{hook},blocks.0.attn.hook_z",
            "--batch-size", "2", "--shard-rows", "40", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    shards_dir = out / "activations"
    index = json.loads((shards_dir / "index.json").read_text())
    shards = [load_file(str(shards_dir / s["file"])) for s in index["shards"]]
    rows = {k: torch.cat([s[k] for s in shards]) for k in shards[0]}
    assert rows["image_index"].tolist() == sorted(rows["image_index"].tolist())
    assert set(rows["image_index"].tolist()) == {1, 2, 3, 4, 5}  # broken.jpg is item 0 and skipped
    assert rows[hook].shape == (5 * 16, 32) and rows["blocks.0.attn.hook_z"].shape == (80, 32)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["images"]["n_skipped"] == 1 and "broken.jpg" in manifest["images"]["skipped"][0]["id"]
    loaded = load_model(str(folder), device="cpu")
    from vitcircuits.inputs import ImageOptions

    batch = next(iter(ImageOptions(images=str(images), batch_size=8).open(loaded).batches(progress=False)))
    _, acts = loaded.model.run_with_cache(batch.images_BCHW, names_filter=hook)
    pick = (rows["image_index"] == 3) & (rows["row"] == 2) & (rows["col"] == 1)
    token = loaded.model.layout.patch_index(2, 1)
    j = batch.indices.index(3)
    assert torch.allclose(rows[hook][pick][0], acts[hook][j, token], atol=1e-6)
    assert rows["token"][pick].item() == token

    # a killed run: drop the last shard, resume, and get the same rows back
    last = index["shards"].pop()
    (shards_dir / "index.json").write_text(json.dumps(index))
    (shards_dir / last["file"]).unlink()
    result = CliRunner().invoke(app, args + ["--resume"])
    assert result.exit_code == 0, result.output
    index2 = json.loads((shards_dir / "index.json").read_text())
    again = torch.cat([load_file(str(shards_dir / s["file"]))[hook] for s in index2["shards"]])
    assert torch.equal(again, rows[hook])
    assert CliRunner().invoke(app, args).exit_code == 2  # non-empty folder without --force/--resume


def test_cache_rejects_non_token_hooks(tiny_model_and_images, tmp_path):
    folder, images = tiny_model_and_images
    result = CliRunner().invoke(app, ["cache", "--model", str(folder), "--images", str(images), "--out", str(tmp_path / "c"),
                                      "--hooks", "blocks.0.attn.hook_pattern", "--device", "cpu"])
    assert result.exit_code == 2 and "not per-token" in result.output
