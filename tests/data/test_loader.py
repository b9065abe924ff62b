"""Dataset, collate, DataLoader workers and the run summary (vitcircuits.data.loader)."""

import hashlib
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from vitcircuits.data import (
    ImageDataset,
    LoadedImage,
    PreprocessConfig,
    SkippedImage,
    collate_records,
    image_list_sha256,
    iter_batches,
    make_loader,
    read_labels,
    resolve_source,
)

IMAGENET_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "imagenet-samples"
# mean/std 0.5 maps a solid channel value v to 2 * v / 255 - 1
CONFIG = PreprocessConfig(input_size=(8, 8), crop_pct=1.0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
BAD = {
    "03_empty.png": "empty file (0 bytes)",
    "06_text.jpg": "not a recognised image format",
    "07_tiny.png": "too small: 3x3 < min_size 8",
}


def expected_value(red: int) -> float:
    return 2 * red / 255 - 1


@pytest.fixture
def folder(tmp_path):
    """Ten files 00..09: solid images with red = 10 * i, plus three bad ones, and labels for a few."""
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(10):
        name = next((n for n in BAD if n.startswith(f"{i:02d}_")), f"{i:02d}.png")
        if name == "03_empty.png":
            (root / name).write_bytes(b"")
        elif name == "06_text.jpg":
            (root / name).write_text("hello")
        elif name == "07_tiny.png":
            Image.new("RGB", (3, 3)).save(root / name)
        else:
            Image.new("RGB", (12, 10), (10 * i, 0, 0)).save(root / name)
    (root / "labels.tsv").write_text("filename\tindex\n00.png\t4\n01.png\t5\n")
    return root


def collect(batches):
    return [(batch.indices, batch.paths, batch.images_BCHW, batch.labels_B) for batch in batches]


def test_batches_order_values_labels_and_summary(folder, caplog):
    source = resolve_source(str(folder))
    with caplog.at_level(logging.WARNING, logger="vitcircuits.data"):
        batches = iter_batches(source, CONFIG, batch_size=4, progress=False)
        result = collect(batches)
    assert [indices for indices, *_ in result] == [(0, 1, 2), (4, 5), (8, 9)]  # batch 2 lost 6 and 7
    paths = [p for _, batch_paths, *_ in result for p in batch_paths]
    assert paths == ["00.png", "01.png", "02.png", "04.png", "05.png", "08.png", "09.png"]
    for indices, _, images_BCHW, _ in result:
        assert images_BCHW.shape == (len(indices), 3, 8, 8)
        for row, index in enumerate(indices):
            assert torch.allclose(
                images_BCHW[row, 0], torch.full((8, 8), expected_value(10 * index)), atol=1e-6
            )
            assert torch.allclose(images_BCHW[row, 1:], torch.full((2, 8, 8), -1.0))
    assert result[0][3].tolist() == [4, 5, -1]  # -1 where unknown
    assert result[1][3] is None and result[2][3] is None  # no label in the batch

    messages = [r.getMessage() for r in caplog.records if r.name == "vitcircuits.data"]
    assert messages == [f"skipped image {name}: {reason}" for name, reason in BAD.items()] + [
        f"skipped 3 of 10 images in {folder}; the list with reasons is in the run manifest (images.skipped)"
    ]
    summary = batches.summary()
    assert (summary.spec, summary.n_total, summary.n_ok) == (str(folder), 10, 7)
    assert [(s.index, s.id, s.reason) for s in summary.skipped] == [
        (int(name[:2]), name, reason) for name, reason in BAD.items()
    ]
    assert summary.image_list_sha256 == hashlib.sha256("\n".join(source.ids).encode()).hexdigest()


def test_workers_give_same_batches_and_report_each_failure_once(folder, caplog):
    with caplog.at_level(logging.WARNING, logger="vitcircuits.data"):
        batches = iter_batches(resolve_source(str(folder)), CONFIG, batch_size=3, num_workers=2, progress=False)
        parallel = collect(batches)
    serial = collect(iter_batches(resolve_source(str(folder)), CONFIG, batch_size=3, num_workers=0, progress=False))
    assert [r[:2] for r in parallel] == [r[:2] for r in serial]
    assert all(torch.equal(a[2], b[2]) for a, b in zip(parallel, serial, strict=True))
    messages = [r.getMessage() for r in caplog.records if r.name == "vitcircuits.data"]
    assert messages[:-1] == [f"skipped image {name}: {reason}" for name, reason in BAD.items()]
    assert batches.summary().n_ok == 7 and len(batches.summary().skipped) == 3


def test_every_stage_rereading_the_source_warns_each_skip_once(folder, caplog):
    """`hunt` resolves and reads the images again in every stage: the warnings come once per process,
    with one summary line; each pass still records every skip for its manifest."""
    with caplog.at_level(logging.WARNING, logger="vitcircuits.data"):
        passes = []
        for _ in range(7):
            batches = iter_batches(resolve_source(str(folder)), CONFIG, batch_size=4, progress=False)
            list(batches)
            passes.append(batches.summary())
    messages = [r.getMessage() for r in caplog.records if r.name == "vitcircuits.data"]
    assert len(messages) == len(BAD) + 1
    assert sorted(messages[:-1]) == sorted(f"skipped image {name}: {reason}" for name, reason in BAD.items())
    assert messages[-1].startswith("skipped 3 of 10 images") and "images.skipped" in messages[-1]
    assert all(len(summary.skipped) == 3 for summary in passes)


def test_all_bad_batch_not_yielded_but_counted(folder):
    source = resolve_source(str(folder / "0[367]_*"))
    batches = iter_batches(source, CONFIG, batch_size=2, progress=False)
    assert list(batches) == []
    summary = batches.summary()
    assert (summary.n_total, summary.n_ok, len(summary.skipped)) == (3, 0, 3)


def test_make_loader_keeps_empty_batches_with_shape(folder):
    source = resolve_source(str(folder / "0[367]_*"))
    batches = list(make_loader(source, CONFIG, batch_size=2))
    assert [b.images_BCHW.shape for b in batches] == [(0, 3, 8, 8), (0, 3, 8, 8)]
    assert [s.id for b in batches for s in b.skipped] == ["03_empty.png", "06_text.jpg", "07_tiny.png"]


def test_max_images_and_sample_flow_into_summary(folder):
    first = iter_batches(resolve_source(str(folder), max_images=4), CONFIG, batch_size=8, progress=False)
    assert [b.indices for b in first] == [(0, 1, 2)]
    assert (first.summary().n_total, first.summary().n_ok) == (4, 3)
    sample = resolve_source(str(folder), max_images=4, sample_seed=7)
    indices = [i for b in iter_batches(sample, CONFIG, batch_size=8, progress=False) for i in b.indices]
    assert indices == [item.index for item in sample.items if item.id not in BAD]
    assert image_list_sha256(sample) != image_list_sha256(resolve_source(str(folder), max_images=4))


def test_dataset_records_and_collate():
    config = PreprocessConfig(input_size=(4, 4), crop_pct=1.0)
    loaded = LoadedImage(index=5, id="x.png", label=None, image_CHW=torch.zeros(3, 4, 4))
    skipped = SkippedImage(index=6, id="y.png", reason="empty file (0 bytes)")
    batch = collate_records([loaded, skipped], input_size=config.input_size)
    assert batch.indices == (5,) and batch.paths == ("x.png",) and batch.labels_B is None
    assert batch.skipped == (skipped,)


def test_progress_bar_runs(folder, capsys):
    batches = iter_batches(resolve_source(str(folder), max_images=3), CONFIG, batch_size=2, progress=True)
    assert sum(len(b.indices) for b in batches) == 3
    assert "3/3" in capsys.readouterr().err


@pytest.mark.skipif(
    not IMAGENET_DIR.is_dir(), reason="shared ImageNet samples (../shared/data/imagenet-samples) absent"
)
def test_imagenet_samples_end_to_end():
    source = resolve_source(str(IMAGENET_DIR), max_images=6, sample_seed=0)
    config = PreprocessConfig(input_size=(64, 64), crop_pct=0.9)
    dataset = ImageDataset(source.items, config)
    batches = iter_batches(source, config, batch_size=4, progress=False)
    images_BCHW = torch.cat([b.images_BCHW for b in batches])
    labels_B = torch.cat([b.labels_B for b in batches])
    assert images_BCHW.shape == (6, 3, 64, 64)
    assert torch.equal(images_BCHW[2], dataset[2].image_CHW)
    labels = read_labels(IMAGENET_DIR)
    assert labels_B.tolist() == [labels[item.id] for item in source.items]
