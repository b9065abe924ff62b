"""The CIFAR-10 ViT model organism: reproducible training and the bundled checkpoint."""
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

from vitcircuits.organisms.cifar import (
    BUNDLED_IMAGES_DIR,
    BUNDLED_MODEL_DIR,
    CIFAR10_CLASSES,
    CifarOrganismConfig,
    export_bundled_images,
    normalize_images,
    train_cifar_organism,
)
from vitcircuits.organisms.series import SERIES, checkpoint_steps

TRAIN = "vitcircuits.organisms.cifar.train_cifar_organism"



CIFAR_ZIP = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cifar10-jpeg.zip"
requires_cifar_zip = pytest.mark.skipif(
    not CIFAR_ZIP.is_file(), reason="../shared/data/cifar10-jpeg.zip is absent (only on the project's CI and dev machines)"
)

TINY_CFG = CifarOrganismConfig(
    epochs=4, batch_size=32, embed_dim=64, depth=2, num_heads=2,
    max_train_images=128, max_test_images=50, warmup_epochs=0.5, threads=2,
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[dict, Path]:
    out_dir = tmp_path_factory.mktemp("tiny_organism")
    return train_cifar_organism(TINY_CFG, CIFAR_ZIP, out_dir, progress=False), out_dir


@pytest.fixture(scope="module")
def bundled_model() -> torch.nn.Module:
    return timm.create_model(f"local-dir:{BUNDLED_MODEL_DIR}", pretrained=True).eval()


@requires_cifar_zip
def test_tiny_training_reduces_loss(tiny_run):
    metrics, out_dir = tiny_run
    losses = [epoch["train_loss"] for epoch in metrics["history"]]
    assert metrics["steps"] == 16 and len(losses) == 4
    assert losses[-1] < losses[0] - 0.05, losses
    assert {p.name for p in out_dir.iterdir()} == {"config.json", "model.safetensors", "training.json"}
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["num_test_images"] == 50


@requires_cifar_zip
def test_tiny_training_is_deterministic_with_or_without_checkpoints(tiny_run, tmp_path):
    metrics, first_dir = tiny_run
    train_cifar_organism(dataclasses.replace(TINY_CFG, checkpoints=4), CIFAR_ZIP, tmp_path, progress=False)
    first, second = load_file(first_dir / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    series = json.loads((tmp_path / SERIES / "series.json").read_text())["steps"]
    assert series == checkpoint_steps(16, 4) and series[-1] == 16
    last = json.loads((tmp_path / SERIES / "step_00000016" / "checkpoint.json").read_text())
    assert last["accuracy"] == metrics["test_accuracy"] and {"loss", "train_loss"} <= last.keys()


@requires_cifar_zip
def test_bundled_images_are_reproducible(tmp_path):
    export_bundled_images(CIFAR_ZIP, tmp_path)
    bundled = sorted(p.name for p in BUNDLED_IMAGES_DIR.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == bundled
    assert all((tmp_path / name).read_bytes() == (BUNDLED_IMAGES_DIR / name).read_bytes() for name in bundled)


def test_recorded_command_reproduces_recorded_config(recorded_config):
    training = json.loads((BUNDLED_MODEL_DIR / "training.json").read_text())
    # fields added after the organism was trained (``checkpoints``) take their defaults
    added = {k: v for k, v in dataclasses.asdict(CifarOrganismConfig()).items() if k not in training["config"]}
    assert added.keys() <= {"checkpoints"}
    assert recorded_config(training["command"], TRAIN) == {**training["config"], **added}


def test_bundled_checkpoint_shape(bundled_model):
    training = json.loads((BUNDLED_MODEL_DIR / "training.json").read_text())
    cfg = CifarOrganismConfig(**training["config"])
    assert bundled_model.pos_embed.shape == (1, 65, cfg.embed_dim)
    assert len(bundled_model.blocks) == cfg.depth and bundled_model.num_classes == 10
    assert tuple(bundled_model.pretrained_cfg["label_names"]) == CIFAR10_CLASSES


def test_bundled_checkpoint_accuracy_on_bundled_images(bundled_model):
    rows = [line.split("\t") for line in (BUNDLED_IMAGES_DIR / "labels.tsv").read_text().splitlines()]
    assert rows[0] == ["filename", "index", "label"] and len(rows) == 501
    assert all(CIFAR10_CLASSES[int(index)] == label for _, index, label in rows[1:])
    pil_images = [Image.open(BUNDLED_IMAGES_DIR / filename).convert("RGB") for filename, _, _ in rows[1:]]
    labels_I = torch.tensor([int(index) for _, index, _ in rows[1:]])

    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(bundled_model))
    inputs_ICHW = torch.stack([transform(image) for image in pil_images])
    images_ICHW = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in pil_images])
    assert torch.equal(inputs_ICHW, normalize_images(images_ICHW)), "timm eval transform != training eval preprocessing"

    with torch.inference_mode():
        accuracy = (bundled_model(inputs_ICHW).argmax(-1) == labels_I).float().mean().item()
    recorded = json.loads((BUNDLED_MODEL_DIR / "training.json").read_text())["test_accuracy"]
    assert accuracy > 0.4
    assert abs(accuracy - recorded) < 0.08, (accuracy, recorded)
