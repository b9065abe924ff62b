"""The compositional shapes task, its bundled ViT organism, and head-ablation necessity."""
import dataclasses
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

from vitcircuits.composition.necessity import NecessityConfig, ablated_predictions, group_accuracy, necessity_report, zstats_of
from vitcircuits.inputs import ImageOptions
from vitcircuits.models.loading import bundled_model_names, load_model
from vitcircuits.organisms import shapes_task as st
from vitcircuits.organisms.cifar import normalize_images
from vitcircuits.organisms.shapes import (
    BUNDLED_IMAGES_COUNT,
    BUNDLED_IMAGES_DIR,
    BUNDLED_IMAGES_SEED,
    BUNDLED_MODEL_DIR,
    GROUPS,
    ShapesOrganismConfig,
    train_shapes_organism,
)

TRAIN = "vitcircuits.organisms.shapes.train_shapes_organism"



N_CHECK = 300
MARGIN = 0.07
"""Allowed drop below the recorded test accuracy on the 300 bundled images (≈ 3 binomial std)."""


def test_generator_is_deterministic():
    first, label = st.render(5, 17)
    again, label_again = st.render(5, 17)
    assert first.shape == (32, 32, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again) and label == label_again == 17 % len(st.CLASSES)
    assert not np.array_equal(first, st.render(6, 17)[0])
    images, labels = st.dataset(5, 12, start=10)
    assert images.shape == (12, 3, 32, 32) and images.dtype == torch.uint8
    assert np.array_equal(images[7].permute(1, 2, 0).numpy(), first) and labels.tolist() == [i % 6 for i in range(10, 22)]


def _counts(parts: np.ndarray) -> list[int]:
    return np.bincount(parts.ravel(), minlength=len(st.PART_NAMES)).tolist()


def test_labels_are_correct_by_construction():
    for index in range(N_CHECK):
        image, label = st.render(11, index)
        parts = st.scene(11, index).parts
        assert np.array_equal(st.parse(image), parts), "the rendered image does not show the scene's parts"
        counts = _counts(parts)
        assert counts[st.H] == counts[st.V] == st.N_BARS
        arrangements = {k: st.arrangement_count(parts, k) for k in sorted(st.COMPOSITIONAL)}
        if label in st.COMPOSITIONAL:
            assert arrangements == {k: int(k == label) for k in arrangements}, (index, arrangements)
            assert counts[st.DOT] == 1 and counts[st.PLUS] == counts[st.BOX] == 0
        else:
            assert set(arrangements.values()) == {0}, (index, arrangements)
            assert counts[st.DOT] == 0


def test_training_variant_repeats_only_its_own_arrangement():
    for index in range(0, 240):
        n_pairs = st.pairs_of(index, 4)
        s = st.scene(14, index, n_pairs)
        if s.label in st.COMPOSITIONAL:
            assert {k: st.arrangement_count(s.parts, k) for k in sorted(st.COMPOSITIONAL)} == {k: n_pairs * (k == s.label) for k in sorted(st.COMPOSITIONAL)}
    assert sorted({st.pairs_of(i, 4) for i in range(24)}) == [1, 2, 3, 4] and st.pairs_of(23, 1) == 1


def test_single_patch_classes_are_decided_by_their_special_patch():
    special_of = {part: label for label, part in st.SPECIAL.items()}
    for index in range(N_CHECK):
        s = st.scene(12, index)
        if s.label not in st.SINGLE_PATCH:
            continue
        special = np.isin(s.parts, list(special_of))
        assert special.sum() == 1 and special_of[int(s.parts[special][0])] == s.label
        rest = np.where(special, st.EMPTY, s.parts)
        assert _counts(rest) == [st.GRID**2 - 2 * st.N_BARS, st.N_BARS, st.N_BARS, 0, 0, 0]


def test_palette_contrast_and_label_balance():
    _, labels = st.dataset(13, 60)
    assert np.bincount(labels.numpy()).tolist() == [10] * 6
    s = st.scene(13, 3)
    occupied = s.colours[s.parts != st.EMPTY].astype(float)
    assert (np.linalg.norm(occupied - s.background.astype(float), axis=1) >= st.MIN_CONTRAST).all()


def test_bundled_images_match_the_generator():
    rows = [line.split("\t") for line in (BUNDLED_IMAGES_DIR / "labels.tsv").read_text().splitlines()]
    assert rows[0] == ["filename", "index", "label"] and len(rows) == BUNDLED_IMAGES_COUNT + 1
    assert all(st.CLASSES[int(index)] == name for _, index, name in rows[1:])
    for filename, index, _ in rows[1::37]:
        position = int(filename.rsplit("_", 1)[1].removesuffix(".png"))
        image, label = st.render(BUNDLED_IMAGES_SEED, position)
        assert label == int(index) and np.array_equal(np.asarray(Image.open(BUNDLED_IMAGES_DIR / filename).convert("RGB")), image)


def test_write_image_folder(tmp_path):
    st.write_image_folder(tmp_path, 7, 8)
    rows = (tmp_path / "labels.tsv").read_text().splitlines()
    assert rows[0] == "filename\tindex\tlabel" and len(rows) == 9 and len(list(tmp_path.glob("*.png"))) == 8


def test_tiny_training_is_deterministic(tmp_path):
    cfg = ShapesOrganismConfig(epochs=2, batch_size=32, embed_dim=16, depth=1, num_heads=2, n_train=64, n_test=30, threads=1)
    first = train_shapes_organism(cfg, tmp_path / "a", progress=False)
    train_shapes_organism(cfg, tmp_path / "b", progress=False)
    assert first["steps"] == 4 and len(first["history"]) == 2 and 0 <= first["test_compositional_accuracy"] <= 1
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {p.name for p in (tmp_path / "a").iterdir()} == {"config.json", "model.safetensors", "training.json"}


@pytest.fixture(scope="module")
def training() -> dict:
    return json.loads((BUNDLED_MODEL_DIR / "training.json").read_text())


@pytest.fixture(scope="module")
def loaded():
    torch.manual_seed(0)
    return load_model("bundled:shapes-vit", device="cpu")


@pytest.fixture(scope="module")
def bundled_batch(loaded) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    batches = list(ImageOptions(images="bundled:shapes", batch_size=100).open(loaded).batches(progress=False))
    return torch.cat([b.images_BCHW for b in batches]), torch.cat([b.labels_B for b in batches]), [p for b in batches for p in b.paths]


def test_recorded_command_reproduces_recorded_config(training, recorded_config):
    # fields added after the organism was trained (``checkpoints``, ``block_layer0_neighbours``) take their defaults
    added = {k: v for k, v in dataclasses.asdict(ShapesOrganismConfig()).items() if k not in training["config"]}
    assert added.keys() <= {"checkpoints", "block_layer0_neighbours"}
    assert recorded_config(training["command"], TRAIN) == {**training["config"], **added}


def test_bundled_checkpoint_loads_both_ways(loaded, bundled_batch):
    assert "shapes-vit" in bundled_model_names() and (BUNDLED_MODEL_DIR / "model.safetensors").stat().st_size < 2_000_000
    assert loaded.label_names == list(st.CLASSES) and loaded.model.layout.n_tokens == 65
    timm_model = timm.create_model(f"local-dir:{BUNDLED_MODEL_DIR}", pretrained=True).eval()
    inputs, labels, paths = bundled_batch
    positions = [int(str(p).rsplit("_", 1)[1].removesuffix(".png")) for p in paths[:12]]
    images = torch.stack([torch.from_numpy(st.render(BUNDLED_IMAGES_SEED, i)[0]).permute(2, 0, 1) for i in positions])
    assert torch.allclose(inputs[:12], normalize_images(images), atol=1e-6), "toolkit preprocessing != training preprocessing"
    with torch.inference_mode():
        assert torch.allclose(timm_model(normalize_images(images)), loaded.model(normalize_images(images)), atol=1e-4)


def _accuracy(model, inputs, labels, heads=(), stats=None) -> dict:
    predictions, labels_B = ablated_predictions(model, [(inputs, labels)], {"condition": heads}, stats)
    return group_accuracy(predictions["condition"], labels_B, GROUPS)


def test_bundled_accuracy_matches_record(loaded, bundled_batch, training):
    inputs, labels, _ = bundled_batch
    report = _accuracy(loaded.model, inputs, labels)
    assert report["compositional"] >= training["test_compositional_accuracy"] - MARGIN, (report, training["test_compositional_accuracy"])
    assert report["single_patch"] >= training["test_single_patch_accuracy"] - MARGIN, (report, training["test_single_patch_accuracy"])


def test_ablating_no_heads_is_clean_and_all_heads_is_chance(loaded, bundled_batch):
    inputs, labels, _ = bundled_batch
    model = loaded.model
    stats = zstats_of(model, [(inputs, labels)])
    with torch.no_grad():
        clean = (model(inputs).argmax(-1) == labels).double()
    in_comp = torch.isin(labels, torch.tensor(sorted(st.COMPOSITIONAL)))
    none = _accuracy(model, inputs, labels, [], stats)
    assert none["overall"] == pytest.approx(float(clean.mean())) and none["compositional"] == pytest.approx(float(clean[in_comp].mean()))
    every = [(layer, head) for layer in range(model.cfg.n_layers) for head in range(model.cfg.n_heads)]
    assert _accuracy(model, inputs, labels, every, stats)["compositional"] <= 0.3


def test_report_on_the_shift_heads(loaded, bundled_batch):
    """On every fifth bundled image (all six classes): the two layer-0 shift heads carry the
    compositional classes only, and the other layer-0 pair (the only random draw) carries neither."""
    inputs, labels, _ = bundled_batch
    report = necessity_report(loaded.model, [(inputs[::5], labels[::5])], [(0, 2), (0, 3)], GROUPS, NecessityConfig(draws=2))
    assert report["n_images"] == 60 and report["circuit"]["heads"] == [[0, 2], [0, 3]] and set(report["clean"]) == {"overall", *GROUPS}
    assert report["circuit"]["compositional"] < 0.6 and report["circuit"]["single_patch"] > 0.9
    assert [d["heads"] for d in report["random"]["draws"]] == [[[0, 0], [0, 1]]] * 2
    assert report["random"]["compositional"]["mean"] > 0.85 and report["random"]["compositional"]["fraction_at_or_below_circuit"] == 0
