"""Fuzz: broken and odd images, under hostile names, through the image pipeline (resolve_source ->
batches with real preprocessing configs). It never raises and accounts for every file.

Seeded and bounded (a few hundred files, well under a minute on one core), so it runs in CI.
"""

import io
import json
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

from vitcircuits.data import DEFAULT_MAX_PIXELS, PreprocessConfig, iter_batches, resolve_source
from vitcircuits.inputs import images_manifest

SEEDS = (1234, 5, 77)
CONFIGS = {
    "timm default (center 224)": PreprocessConfig(),
    "border 32": PreprocessConfig(input_size=(32, 32), crop_pct=1.0, crop_mode="border"),
    "squash 24x40": PreprocessConfig(input_size=(24, 40), crop_mode="squash", interpolation="bilinear"),
}
# (mode, format) pairs PIL can write; F is written but rejected on read (no defined range)
MODES_FORMATS = [
    ("1", "PNG"), ("1", "BMP"), ("L", "PNG"), ("L", "JPEG"), ("LA", "PNG"), ("P", "PNG"), ("P", "GIF"),
    ("RGB", "JPEG"), ("RGB", "PNG"), ("RGB", "WEBP"), ("RGB", "PPM"), ("RGBA", "PNG"), ("RGBA", "TIFF"),
    ("CMYK", "JPEG"), ("CMYK", "TIFF"), ("I;16", "PNG"), ("I;16", "TIFF"), ("I", "TIFF"), ("F", "TIFF"),
]
SIZES = [(1, 1), (7, 7), (8, 8), (9, 31), (64, 48), (33, 200), (300, 8), (8, 300), (2000, 8), (12, 1500)]
EXTENSIONS = {"PNG": ".png", "BMP": ".bmp", "JPEG": ".jpg", "GIF": ".gif", "WEBP": ".webp", "PPM": ".ppm", "TIFF": ".tif"}
MAGIC = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"II*\x00", b"P6\n"]


def pixels(rng: np.random.Generator, mode: str, size: tuple[int, int]) -> Image.Image:
    width, height = size
    if mode in ("I;16", "I"):
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16 if mode == "I;16" else np.int32))
    if mode == "F":
        return Image.fromarray(rng.random((height, width), dtype=np.float32))
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB").convert(mode)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def hostile_name(rng: random.Random, index: int, extension: str) -> bytes:
    """``NNN_`` then random bytes (never ``/`` or NUL: those cannot be in a name) then the extension."""
    noise = bytes(b for b in rng.randbytes(rng.randrange(0, 12)) if b not in (0, 0x2F))
    return f"{index:03d}_".encode() + noise + extension.encode()


def generate(seed: int) -> tuple[dict[bytes, tuple[str, bytes]], dict[bytes, tuple[int, int]], dict[bytes, bytes]]:
    """``{name: (kind, data)}`` of the files the source must list, ``{name: (width, height)}`` of
    the valid images that must load when their size passes the resize limits, and
    ``{name: data}`` of the files it must ignore."""
    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    files: dict[bytes, tuple[str, bytes]] = {}
    valid: dict[bytes, tuple[int, int]] = {}

    def add(kind: str, data: bytes, extension: str, valid_size: tuple[int, int] | None = None) -> None:
        name = hostile_name(rng, len(files), extension)
        files[name] = (kind, data)
        if valid_size is not None:
            valid[name] = valid_size

    for mode, fmt in MODES_FORMATS:
        for size in SIZES:
            data = encode(pixels(np_rng, mode, size), fmt, **({"lossless": True} if fmt == "WEBP" else {}))
            add(f"valid {mode} {fmt} {size}", data, EXTENSIONS[fmt], size if mode != "F" and min(size) >= 8 else None)
    wide = encode(Image.new("1", (100_000, 8)), "PNG")  # tiny file, extreme aspect ratio
    add("extreme aspect 100000x8", wide, ".png")
    frames = [pixels(np_rng, "RGB", (24, 16)) for _ in range(3)]
    add("animated gif", encode(frames[0], "GIF", save_all=True, append_images=frames[1:]), ".gif", (24, 16))
    add("16-bit png", encode(Image.fromarray(np_rng.integers(0, 65536, (20, 20), dtype=np.uint16)), "PNG"), ".png", (20, 20))
    for fmt, options, n_cuts in [("JPEG", {}, 60), ("JPEG", {"progressive": True}, 30), ("PNG", {}, 60), ("GIF", {}, 10),
                                 ("TIFF", {}, 10), ("BMP", {}, 10), ("WEBP", {}, 10)]:
        data = encode(pixels(np_rng, "RGB", (48, 40)), fmt, **options)
        for _ in range(n_cuts):
            add(f"truncated {fmt}", data[: rng.randrange(len(data))], EXTENSIONS[fmt])
        for _ in range(n_cuts // 2):
            flipped = bytearray(data)
            for _ in range(rng.randrange(1, 8)):
                flipped[rng.randrange(len(flipped))] = rng.randrange(256)
            add(f"flipped {fmt}", bytes(flipped), EXTENSIONS[fmt])
    for _ in range(40):
        add("random bytes", rng.randbytes(rng.randrange(1, 2048)), rng.choice(list(EXTENSIONS.values())))
    for magic in MAGIC * 5:
        add("magic + random bytes", magic + rng.randbytes(rng.randrange(0, 512)), rng.choice(list(EXTENSIONS.values())))
    for _ in range(3):
        add("zero bytes", b"", rng.choice(list(EXTENSIONS.values())))
    ignored = {b".hidden.png": b"", b"photo.heic": b"\x00\x00\x00\x18ftypheic", b"notes.txt": b"x"}
    return files, valid, ignored


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzzed_images_never_raise_and_every_file_is_accounted_for(tmp_path, caplog, seed):
    folder = tmp_path / "fuzz"
    folder.mkdir()
    files, valid, ignored = generate(seed)
    try:
        for name, data in [*((name, data) for name, (_, data) in files.items()), *ignored.items()]:
            with open(os.path.join(os.fsencode(folder), name), "wb") as handle:
                handle.write(data)
    except OSError as exc:
        pytest.skip(f"file system refuses arbitrary bytes in names: {exc}")
    kinds = {name: kind for name, (kind, _) in files.items()}
    source = resolve_source(str(folder))
    assert len(source) == len(kinds) and source.ignored.n == len(ignored)
    by_index = {item.index: os.fsencode(item.name) for item in source.items}
    assert set(by_index.values()) == set(kinds)
    for label, config in CONFIGS.items():
        batches = iter_batches(source, config, batch_size=16, progress=False)
        loaded = []
        for batch in batches:
            assert batch.images_BCHW.shape == (len(batch.indices), 3, *config.input_size)
            assert torch.isfinite(batch.images_BCHW).all()
            loaded += batch.indices
        summary = batches.summary()
        skipped = {s.index: s.reason for s in summary.skipped}
        assert summary.n_ok + len(skipped) == summary.n_total == len(kinds), label
        assert set(loaded) | set(skipped) == set(by_index) and not set(loaded) & set(skipped), label
        for index, reason in skipped.items():
            assert reason and reason.isprintable(), (label, kinds[by_index[index]], reason)
        must_load = {index for index, name in by_index.items() if name in valid and fits(valid[name], config)}
        assert must_load <= set(loaded), (label, sorted(kinds[by_index[i]] for i in must_load - set(loaded)))
        json.dumps(images_manifest(batches), allow_nan=False).encode("utf-8")
    assert caplog.records and all(record.getMessage().isprintable() for record in caplog.records)


def fits(size: tuple[int, int], config: PreprocessConfig) -> bool:
    """Whether an image of ``size`` (W, H) passes the resize limits of ``config``."""
    resized_h, resized_w = config.resized_hw(*size)
    return min(resized_h, resized_w) >= 1 and resized_h * resized_w <= DEFAULT_MAX_PIXELS

