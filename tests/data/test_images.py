"""Safe decoding, bad-input policy, and source resolution (vitcircuits.data.images)."""

import importlib.resources
import io
import logging
import struct
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

from vitcircuits.data import (
    BadImage,
    SkipLog,
    SkippedImage,
    open_image,
    open_item,
    read_labels,
    resolve_source,
    to_rgb,
)

IMAGENET_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "imagenet-samples"
BUNDLED_CIFAR = Path(str(importlib.resources.files("vitcircuits"))) / "assets" / "images" / "cifar10"


def save(image: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def png_header_only(width: int, height: int) -> bytes:
    """A syntactically valid PNG that declares ``width`` x ``height`` but holds no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


# ------------------------------------------------------------------------------------------------
# Bad inputs


def bad_reason(source, **kwargs) -> str:
    with pytest.raises(BadImage) as info:
        open_image(source, **kwargs)
    reason = str(info.value)
    assert "\n" not in reason
    return reason


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert "empty file" in bad_reason(path)


def test_missing_file(tmp_path):
    assert bad_reason(tmp_path / "nope.png") == "file not found"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file(tmp_path, fmt):
    buffer = io.BytesIO()
    noise(64, 64).save(buffer, format=fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    assert "OSError: image file is truncated" in bad_reason(path)


def test_text_with_image_extension(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("definitely not a JPEG\n")
    assert "not a recognised image format" in bad_reason(path)


def test_decompression_bomb_with_small_limit(tmp_path):
    path = save(noise(100, 100), tmp_path / "ok.png")
    assert open_image(path).size == (100, 100)
    assert "decompression bomb: 100x100 = 10000 pixels > max_pixels 5000" in bad_reason(path, max_pixels=5000)


def test_decompression_bomb_headers_leave_pil_untouched():
    limit_before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # above PIL's warning threshold, below its hard limit: our check rejects it, PIL stays quiet
        assert "max_pixels" in bad_reason(png_header_only(12_000, 12_000), max_pixels=100_000_000)
        # above PIL's hard limit: PIL's DecompressionBombError becomes a BadImage
        assert "decompression bomb" in bad_reason(png_header_only(20_000, 20_000), max_pixels=10**12)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert limit_before == Image.MAX_IMAGE_PIXELS


def test_tiny_image(tmp_path):
    assert "too small: 4x20 < min_size 8" in bad_reason(save(noise(4, 20), tmp_path / "tiny.png"))
    assert open_image(save(noise(8, 8), tmp_path / "small.png")).size == (8, 8)
    assert open_image(tmp_path / "tiny.png", min_size=1).size == (4, 20)


def test_float_mode_rejected():
    with pytest.raises(BadImage, match="mode F"):
        to_rgb(Image.new("F", (8, 8), 0.5))


# ------------------------------------------------------------------------------------------------
# Colour modes, orientation, animation


def test_rgb_passthrough_exact(tmp_path):
    image = noise(20, 10, seed=3)
    decoded = open_image(save(image, tmp_path / "x.png"))
    assert decoded.mode == "RGB"
    assert np.array_equal(np.asarray(decoded), np.asarray(image))


def test_grayscale(tmp_path):
    decoded = open_image(save(Image.new("L", (10, 10), 77), tmp_path / "gray.png"))
    assert decoded.mode == "RGB" and decoded.getpixel((3, 3)) == (77, 77, 77)


def test_sixteen_bit_gray_scaled_not_clipped(tmp_path):
    values = np.array([[0, 65535, 257 * 128, 1000]] * 8, dtype=np.uint16)
    path = save(Image.fromarray(values), tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I")
    decoded = open_image(path, min_size=4)
    assert [decoded.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (255,) * 3, (128,) * 3, (4,) * 3]


def test_mode_i_is_treated_as_sixteen_bit():
    image = Image.fromarray(np.array([[65535, 0, -5, 70000]], dtype=np.int32))
    assert image.mode == "I"
    assert [to_rgb(image).getpixel((x, 0))[0] for x in range(4)] == [255, 0, 0, 255]


def test_cmyk(tmp_path):
    path = save(Image.new("CMYK", (10, 10), (0, 255, 255, 0)), tmp_path / "cmyk.tiff")
    assert open_image(path).getpixel((5, 5)) == (255, 0, 0)


def test_palette_with_transparency_composited_on_white(tmp_path):
    image = Image.new("P", (10, 10), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.paste(1, (0, 0, 5, 10))
    path = save(image, tmp_path / "pal.png", transparency=1)
    decoded = open_image(path)
    assert decoded.getpixel((1, 1)) == (255, 255, 255)  # transparent index -> white
    assert decoded.getpixel((8, 8)) == (255, 0, 0)
    plain = open_image(save(image, tmp_path / "pal_opaque.png"))
    assert plain.getpixel((1, 1)) == (0, 0, 255)


def test_rgba_composited_on_white(tmp_path):
    image = Image.new("RGBA", (10, 10), (0, 0, 255, 0))
    image.putpixel((9, 9), (0, 0, 255, 255))
    image.putpixel((5, 5), (0, 0, 0, 128))
    decoded = open_image(save(image, tmp_path / "rgba.png"))
    assert decoded.getpixel((0, 0)) == (255, 255, 255)
    assert decoded.getpixel((9, 9)) == (0, 0, 255)
    assert all(abs(v - 127) <= 1 for v in decoded.getpixel((5, 5)))


def test_la_composited_on_white(tmp_path):
    image = Image.new("LA", (10, 10), (0, 0))
    image.putpixel((2, 2), (30, 255))
    decoded = open_image(save(image, tmp_path / "la.png"))
    assert decoded.getpixel((0, 0)) == (255, 255, 255)
    assert decoded.getpixel((2, 2)) == (30, 30, 30)


def test_exif_orientation_applied(tmp_path):
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 8, 8))  # red block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    decoded = open_image(save(stored, tmp_path / "rot.jpg", exif=exif, quality=95))
    assert decoded.size == (20, 40)
    red_corner = np.asarray(decoded)[2, 17]  # stored top-left ends up at the displayed top-right
    assert red_corner[0] > 200 and red_corner[2] < 60
    assert np.asarray(decoded)[2, 2][2] > 200  # displayed top-left is blue


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_first_frame(tmp_path, fmt):
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("Pillow built without WebP support")
    frames = [Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 255))]
    extra = {"lossless": True} if fmt == "WEBP" else {}
    path = save(frames[0], tmp_path / f"anim.{fmt.lower()}", save_all=True, append_images=frames[1:], **extra)
    assert getattr(Image.open(path), "n_frames", 1) == 2
    assert open_image(path).getpixel((8, 8)) == (255, 0, 0)


def test_open_bytes():
    buffer = io.BytesIO()
    Image.new("RGB", (9, 9), (1, 2, 3)).save(buffer, format="PNG")
    assert open_image(buffer.getvalue()).getpixel((0, 0)) == (1, 2, 3)


# ------------------------------------------------------------------------------------------------
# Bad-input policy


def test_skip_log_warns_once_per_input(caplog):
    log = SkipLog()
    with caplog.at_level(logging.WARNING, logger="vitcircuits.data"):
        log.record(SkippedImage(3, "b/x.jpg", "empty file (0 bytes)"))
        log.record(SkippedImage(1, "a.png", "too small: 2x2 < min_size 8"))
        log.record(SkippedImage(3, "b/x.jpg", "empty file (0 bytes)"))
    messages = [r.getMessage() for r in caplog.records if r.name == "vitcircuits.data"]
    assert messages == [
        "skipped image b/x.jpg: empty file (0 bytes)",
        "skipped image a.png: too small: 2x2 < min_size 8",
    ]
    assert [s.index for s in log.skipped] == [1, 3] and len(log) == 2


def test_bad_image_reason_is_one_line():
    assert str(BadImage("broken\n  data\tstream")) == "broken data stream"


# ------------------------------------------------------------------------------------------------
# Sources


@pytest.fixture
def tree(tmp_path):
    """A folder with images in nested dirs, label file, and files that are not images."""
    root = tmp_path / "imgs"
    save(Image.new("RGB", (10, 10), (10, 0, 0)), root / "b.png")
    save(Image.new("RGB", (10, 10), (20, 0, 0)), root / "a" / "c.jpg")
    save(Image.new("RGB", (10, 10), (30, 0, 0)), root / "a" / "B.PNG")
    save(Image.new("RGB", (10, 10), (40, 0, 0)), root / "z" / "deep" / "d.webp")
    save(Image.new("RGB", (10, 10)), root / ".hidden.jpg")
    save(Image.new("RGB", (10, 10)), root / ".cache" / "e.jpg")
    (root / "notes.txt").write_text("not listed\n")
    (root / "labels.tsv").write_text("filename\tindex\tlabel\nb.png\t7\tseven\na/c.jpg\t2\ttwo\n")
    return root


def test_folder_recursive_sorted_with_labels(tree):
    source = resolve_source(str(tree))
    assert source.ids == ("a/B.PNG", "a/c.jpg", "b.png", "z/deep/d.webp")
    assert [item.index for item in source.items] == [0, 1, 2, 3]
    assert [item.label for item in source.items] == [None, 2, 7, None]
    assert open_item(source.items[2]).getpixel((0, 0)) == (10, 0, 0)


def test_list_file(tree, tmp_path, monkeypatch):
    list_path = tree / "a" / "list.txt"
    absolute = tree / "b.png"
    list_path.write_text(f"# my selection\nc.jpg\n\n   B.PNG  \n{absolute}\nmissing.png\n../labels.tsv\n")
    monkeypatch.chdir(tmp_path)  # relative entries resolve against the list file, not the cwd
    source = resolve_source(str(list_path))
    assert source.ids == (
        "c.jpg",
        "B.PNG",
        absolute.resolve().as_posix(),
        "missing.png",
        absolute.parent.resolve().as_posix() + "/labels.tsv",
    )
    assert open_item(source.items[1]).getpixel((0, 0)) == (30, 0, 0)
    assert open_item(source.items[2]).getpixel((0, 0)) == (10, 0, 0)
    with pytest.raises(BadImage, match="file not found"):
        open_item(source.items[3])
    with pytest.raises(BadImage, match="not a recognised image format"):
        open_item(source.items[4])


def test_single_file_and_explicit_non_image(tree):
    source = resolve_source(str(tree / "a" / "c.jpg"))
    assert source.ids == ("c.jpg",) and source.items[0].label is None
    labelled = resolve_source(str(tree / "b.png"))
    assert labelled.items[0].label == 7
    explicit = resolve_source(str(tree / "labels.tsv"))
    with pytest.raises(BadImage, match="not a recognised image format"):
        open_item(explicit.items[0])


def test_glob(tree):
    assert resolve_source(str(tree / "**" / "*.[pP][nN][gG]")).ids == ("a/B.PNG", "b.png")
    assert resolve_source(str(tree / "a" / "?.*")).ids == ("B.PNG", "c.jpg")
    with pytest.raises(FileNotFoundError, match="no image files match"):
        resolve_source(str(tree / "*.gif"))


def test_missing_path_error_names_it(tmp_path):
    missing = tmp_path / "does" / "not" / "exist"
    with pytest.raises(FileNotFoundError) as info:
        resolve_source(str(missing))
    assert str(info.value) == f"image source not found: {missing}"


def test_empty_folder(tmp_path):
    (tmp_path / "readme.md").write_text("x")
    with pytest.raises(FileNotFoundError, match="no image files"):
        resolve_source(str(tmp_path))


def test_first_n_and_seeded_sample(tmp_path):
    for i in range(20):
        save(Image.new("RGB", (8, 8)), tmp_path / f"{i:02d}.png")
    spec = str(tmp_path)
    assert resolve_source(spec, max_images=3).ids == ("00.png", "01.png", "02.png")
    sample = resolve_source(spec, max_images=5, sample_seed=0)
    assert sample.ids == resolve_source(spec, max_images=5, sample_seed=0).ids
    assert sample.ids != resolve_source(spec, max_images=5, sample_seed=1).ids
    indices = [item.index for item in sample.items]
    assert len(set(indices)) == 5 and indices == sorted(indices)
    assert [f"{i:02d}.png" for i in indices] == list(sample.ids)
    assert len(resolve_source(spec, max_images=50, sample_seed=0)) == 20
    with pytest.raises(ValueError, match="max_images"):
        resolve_source(spec, sample_seed=0)


def test_bundled_lists_names(tmp_path, monkeypatch):
    package = tmp_path / "pkg"
    save(Image.new("RGB", (8, 8), (5, 6, 7)), package / "assets" / "images" / "toy" / "x.png")
    (package / "assets" / "images" / "other").mkdir()
    monkeypatch.setattr(importlib.resources, "files", lambda name: package)
    with pytest.raises(ValueError, match="available: bundled:other, bundled:toy"):
        resolve_source("bundled:")
    with pytest.raises(ValueError, match="unknown bundled image set 'nope'"):
        resolve_source("bundled:nope")
    source = resolve_source("bundled:toy")
    assert source.ids == ("x.png",) and open_item(source.items[0]).getpixel((0, 0)) == (5, 6, 7)


@pytest.mark.skipif(not BUNDLED_CIFAR.is_dir(), reason="bundled cifar10 images not installed yet")
def test_bundled_cifar10():
    source = resolve_source("bundled:cifar10")
    assert len(source) > 0 and all(0 <= item.label < 10 for item in source.items)
    assert open_item(source.items[0]).mode == "RGB"


def test_read_labels_errors(tmp_path):
    assert read_labels(tmp_path) is None
    (tmp_path / "labels.tsv").write_text("file\tclass\na.png\t1\n")
    with pytest.raises(ValueError, match="lacks column"):
        read_labels(tmp_path)
    (tmp_path / "labels.tsv").write_text("filename\tindex\na.png\tone\n")
    with pytest.raises(ValueError, match="line 2: bad index 'one'"):
        read_labels(tmp_path)


@pytest.mark.skipif(
    not IMAGENET_DIR.is_dir(), reason="shared ImageNet samples (../shared/data/imagenet-samples) absent"
)
def test_imagenet_samples_labels():
    labels = read_labels(IMAGENET_DIR)
    assert len(labels) == 1000 and sorted(labels.values()) == list(range(1000))
    assert labels["n01440764_tench.jpg"] == 0 and labels["n15075141_toilet_tissue.jpg"] == 999
    source = resolve_source(str(IMAGENET_DIR), max_images=2)
    assert [(item.id, item.label) for item in source.items] == [
        ("n01440764_tench.jpg", 0),
        ("n01443537_goldfish.jpg", 1),
    ]


# ------------------------------------------------------------------------------------------------
# HuggingFace datasets (offline, local data)


def test_hf_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'vitcircuits\[datasets\]'"):
        resolve_source("hf:some/dataset:test")


@pytest.fixture
def hf_imagefolder(tmp_path):
    pytest.importorskip("datasets", reason="optional 'datasets' package not installed")
    root = tmp_path / "hfdata"
    for label, colour in [("cat", (255, 0, 0)), ("dog", (0, 255, 0))]:
        for i in range(3):
            save(Image.new("RGB", (12, 12), colour), root / label / f"{i}.png")
    (root / "dog" / "3.png").write_text("not a png")
    return root


def test_hf_imagefolder_streaming(hf_imagefolder):
    source = resolve_source(f"hf:{hf_imagefolder}:train")
    assert len(source) == 7
    assert source.ids[0] == f"hf:{hf_imagefolder}:train/0" and [item.index for item in source.items] == list(
        range(7)
    )
    assert [item.label for item in source.items] == [0, 0, 0, 1, 1, 1, 1]
    assert source.labels == "dataset" and source.classes == ("cat", "dog")
    assert open_item(source.items[0]).getpixel((0, 0)) == (255, 0, 0)
    assert open_item(source.items[3]).getpixel((0, 0)) == (0, 255, 0)
    with pytest.raises(BadImage, match="not a recognised image format"):
        open_item(source.items[6])
    assert resolve_source(f"hf:{hf_imagefolder}", max_images=2).ids == source.ids[:2]
    sample = resolve_source(f"hf:{hf_imagefolder}", max_images=3, sample_seed=4)
    assert sample.ids == resolve_source(f"hf:{hf_imagefolder}", max_images=3, sample_seed=4).ids
    assert len(set(sample.ids)) == 3 and set(sample.ids) <= set(source.ids)


def test_hf_parquet_rows_hold_bytes(tmp_path):
    datasets = pytest.importorskip("datasets", reason="optional 'datasets' package not installed")
    images = [Image.new("RGB", (10, 10), (i * 40, 0, 0)) for i in range(3)]
    table = datasets.Dataset.from_dict({"img": images, "label": [5, 6, 7]}).cast_column(
        "img", datasets.Image()
    )
    (tmp_path / "data").mkdir()
    table.to_parquet(str(tmp_path / "data" / "test-00000.parquet"))
    source = resolve_source(f"hf:{tmp_path}:test")
    assert [item.label for item in source.items] == [5, 6, 7]
    assert all(item.data is not None and item.path is None for item in source.items)
    assert [open_item(item).getpixel((0, 0)) for item in source.items] == [(0, 0, 0), (40, 0, 0), (80, 0, 0)]
