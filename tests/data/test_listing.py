"""What a folder source lists, ignores and counts; symlinked folders; the ImageFolder layout."""

import json
import os

import pytest
import torch
from PIL import Image

from vitcircuits.data import IgnoredFiles, PreprocessConfig, iter_batches, list_folder, resolve_source
from vitcircuits.inputs import images_manifest

CONFIG = PreprocessConfig(input_size=(8, 8), crop_pct=1.0)


def image(path, colour=(0, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (10, 10), colour).save(path)


@pytest.fixture
def folders(tmp_path):
    """``src`` (the source) with hidden files, other extensions and symlinked folders; ``outside``
    (three images) is reached only through symlinks."""
    root, outside = tmp_path / "src", tmp_path / "outside"
    image(root / "a.jpg")
    image(root / "sub" / "b.png")
    image(root / ".hidden.jpg")
    image(root / ".cache" / "c.jpg")
    (root / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    (root / "sub" / "notes.txt").write_text("x")
    (root / "README").write_text("x")
    for i in range(3):
        image(outside / f"{i}.png")
    (root / "linked").symlink_to(outside, target_is_directory=True)  # followed: its images are listed
    (root / "zz_again").symlink_to(outside, target_is_directory=True)  # same folder again
    (root / "loop").symlink_to(root, target_is_directory=True)  # the source itself
    (root / "up").symlink_to(tmp_path, target_is_directory=True)  # contains the source
    (root / "sub" / "inner").symlink_to(root / "sub", target_is_directory=True)  # inside the source
    (outside / "back").symlink_to(outside, target_is_directory=True)  # loop inside the followed folder
    return root


def test_symlinked_folder_listed_and_loops_end(folders):
    listing = list_folder(folders)
    assert listing.names == ("a.jpg", "linked/0.png", "linked/1.png", "linked/2.png", "sub/b.png")
    assert listing.ignored == IgnoredFiles(hidden=2, extensions={"(none)": 1, ".heic": 1, ".txt": 1}, repeated_folders=5)
    assert listing.ignored.n == 10


def test_manifest_counts_ignored_files(folders):
    batches = iter_batches(resolve_source(str(folders)), CONFIG, progress=False)
    assert sum(len(batch.paths) for batch in batches) == 5
    section = images_manifest(batches)
    assert section["ignored"] == {"n": 10, "hidden": 2, "extensions": {"(none)": 1, ".heic": 1, ".txt": 1},
                                  "repeated_folders": 5, "unreadable_folders": 0}
    assert (section["labels"], section["classes"]) == (None, None)
    json.dumps(section, allow_nan=False)


def test_labels_file_is_not_counted_as_ignored(tmp_path):
    image(tmp_path / "a.png")
    (tmp_path / "labels.tsv").write_text("filename\tindex\na.png\t1\n")
    assert list_folder(tmp_path).ignored.n == 0


def test_glob_counts_matching_files_with_other_extensions(folders):
    source = resolve_source(str(folders / "*"))
    assert source.ids == ("a.jpg",)
    assert source.ignored == IgnoredFiles(extensions={"(none)": 1, ".heic": 1})


def test_special_file_with_image_extension_is_listed_then_skipped_without_blocking(tmp_path):
    image(tmp_path / "a.png")
    os.mkfifo(tmp_path / "pipe.jpg")  # opening it for reading would wait for a writer forever
    (tmp_path / "dangling.png").symlink_to(tmp_path / "gone.png")
    batches = iter_batches(resolve_source(str(tmp_path)), CONFIG, progress=False)
    assert [batch.paths for batch in batches] == [("a.png",)]
    assert {s.id: s.reason for s in batches.summary().skipped} == {"dangling.png": "file not found", "pipe.jpg": "not a regular file"}


def test_unreadable_folder_is_counted(tmp_path, monkeypatch):
    image(tmp_path / "a.png")
    image(tmp_path / "locked" / "b.png")
    scandir = os.scandir

    def refuse_locked(path):
        if os.path.basename(path) == "locked":
            raise PermissionError(13, "Permission denied", path)
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse_locked)  # chmod 0 does not stop root
    listing = list_folder(tmp_path)
    assert listing.names == ("a.png",) and listing.ignored.unreadable_folders == 1


# ------------------------------------------------------------------------------------------------
# ImageFolder layout


@pytest.fixture
def image_folder(tmp_path):
    """``root/class_name/xxx.png`` with an empty class folder sorted first, as torchvision indexes it."""
    root = tmp_path / "classes"
    for name, colour in [("dog", (0, 255, 0)), ("cat", (255, 0, 0)), ("eel", (0, 0, 255))]:
        for i in range(2):
            image(root / name / f"{i}.png", colour)
    (root / "aardvark").mkdir()
    (root / ".ipynb_checkpoints").mkdir()  # hidden: not a class
    return root


def test_image_folder_labelled_like_torchvision(image_folder):
    torchvision = pytest.importorskip("torchvision")
    (image_folder / ".ipynb_checkpoints").rmdir()  # torchvision would take it as a class
    reference = torchvision.datasets.ImageFolder(str(image_folder), allow_empty=True)
    (image_folder / ".ipynb_checkpoints").mkdir()
    source = resolve_source(str(image_folder))
    assert source.labels == "folders" and source.classes == tuple(reference.classes) == ("aardvark", "cat", "dog", "eel")
    expected = {os.path.relpath(path, image_folder): target for path, target in reference.samples}
    assert {item.id: item.label for item in source.items} == expected


def test_image_folder_labels_reach_batches_and_manifest(image_folder):
    from vitcircuits.composition.necessity import LabelledBatches

    batches = iter_batches(resolve_source(str(image_folder)), CONFIG, batch_size=4, progress=False)
    labels_B = torch.cat([batch.labels_B for batch in batches])
    assert labels_B.tolist() == [1, 1, 2, 2, 3, 3]
    assert sum(len(labels) for _, labels in LabelledBatches(batches)) == 6  # `necessity` finds labelled images
    section = images_manifest(batches)
    assert (section["labels"], section["classes"]) == ("folders", ["aardvark", "cat", "dog", "eel"])


def test_labels_file_takes_precedence_over_folders(image_folder):
    (image_folder / "labels.tsv").write_text("filename\tindex\ncat/0.png\t7\n")
    source = resolve_source(str(image_folder))
    assert source.labels == "labels.tsv" and source.classes is None
    assert [item.label for item in source.items] == [7, None, None, None, None, None]


@pytest.mark.parametrize("layout", ["train/cat/0.png train/dog/0.png val/cat/1.png", "cat/0.png cat/1.png", "cat/0.png dog/0.png top.png"])
def test_not_an_image_folder(tmp_path, layout):
    """Nested splits, a single class folder or images beside the class folders: no labels rather
    than wrong ones."""
    for rel in layout.split():
        image(tmp_path / rel)
    source = resolve_source(str(tmp_path))
    assert source.labels is None and source.classes is None and all(item.label is None for item in source.items)


def test_symlinked_class_folder_is_a_class(tmp_path):
    image(tmp_path / "data" / "cat" / "0.png")
    image(tmp_path / "elsewhere" / "0.png")
    (tmp_path / "data" / "dog").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    source = resolve_source(str(tmp_path / "data"))
    assert source.classes == ("cat", "dog") and [item.label for item in source.items] == [0, 1]
