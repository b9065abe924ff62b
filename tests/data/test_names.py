"""File names are data, never text: hostile names are hashed by their bytes, logged and stored
escaped, and never stop a run (vitcircuits.data.names and its use along the pipeline)."""

import hashlib
import json
import logging
import os

import pytest
from PIL import Image

from vitcircuits.data import PreprocessConfig, display_id, image_list_sha256, iter_batches, name_bytes, resolve_source
from vitcircuits.inputs import images_manifest

CONFIG = PreprocessConfig(input_size=(8, 8), crop_pct=1.0)
# raw file names (bytes, as on disk) -> the id they must get
HOSTILE = {
    b"latin1_\xe9.png": "latin1_\\xe9.png",
    b"evil\nINFO all images fine.png": "evil\\nINFO all images fine.png",
    b"bell\x07\x1b[31mred.png": "bell\\x07\\x1b[31mred.png",
    b"rtl_\xe2\x80\xaegnp.png": "rtl_\\u202egnp.png",
    b"math_$x^$.png": "math_\\x24x^\\x24.png",
    b"back\\slash.png": "back\\\\slash.png",
    "café_猫.png".encode(): "café_猫.png",
}
BROKEN = b"broken_\xff\r\n.png"  # not an image, so it is skipped and warned about


def test_display_id_escapes_what_is_not_printable():
    for raw, shown in HOSTILE.items():
        assert display_id(os.fsdecode(raw)) == shown
    assert display_id("nel\x85 nbsp\xa0 zwj\u200d tab\t cr\r") == "nel\\u0085 nbsp\\u00a0 zwj\\u200d tab\\t cr\\r"
    assert display_id("\U000e0001 \ud800") == "\\U000e0001 \\ud800"  # tag character, unpaired high surrogate


def test_display_id_is_printable_strict_utf8_and_one_to_one():
    names = [os.fsdecode(raw) for raw in HOSTILE] + ["a\\x07", "a\x07", "a\\xe9", os.fsdecode(b"a\xe9"), "a\xe9", "a\\u0085", "a\x85"]
    shown = [display_id(name) for name in names]
    assert len(set(shown)) == len(names)
    for text in shown:
        assert text.isprintable()
        text.encode("utf-8")  # strict: no surrogates left


def test_name_bytes_round_trips_file_system_names():
    for raw in HOSTILE:
        assert name_bytes(os.fsdecode(raw)) == raw
    assert name_bytes("\ud800") == b"\xed\xa0\x80"  # no byte decodes to it; still encodable


@pytest.fixture
def hostile_folder(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    try:
        for i, raw in enumerate([*HOSTILE, BROKEN]):
            path = os.path.join(os.fsencode(root), raw)
            if raw == BROKEN:
                with open(path, "wb") as handle:
                    handle.write(b"junk")
            else:
                Image.new("RGB", (10, 10), (i, 0, 0)).save(os.fsdecode(path), format="PNG")
    except (OSError, UnicodeError) as exc:
        pytest.skip(f"file system refuses arbitrary bytes in names: {exc}")
    return root


def test_hostile_names_are_hashed_by_bytes_logged_escaped_and_never_stop_a_run(hostile_folder, caplog):
    source = resolve_source(str(hostile_folder))
    raw_names = sorted(os.fsdecode(raw) for raw in [*HOSTILE, BROKEN])
    assert [item.name for item in source.items] == raw_names
    assert list(source.ids) == [display_id(name) for name in raw_names]
    assert set(source.ids) >= set(HOSTILE.values())
    expected = hashlib.sha256(b"\n".join(os.fsencode(name) for name in raw_names)).hexdigest()
    assert image_list_sha256(source) == expected

    with caplog.at_level(logging.INFO, logger="vitcircuits.data"):
        batches = iter_batches(source, CONFIG, batch_size=3, progress=False)
        paths = [path for batch in batches for path in batch.paths]
    assert sorted(paths) == sorted(HOSTILE.values())
    messages = [record.getMessage() for record in caplog.records]
    assert messages[0] == "skipped image broken_\\xff\\r\\n.png: not a recognised image format"
    assert all(message.isprintable() for message in messages)  # no forged lines, no terminal escapes

    manifest = images_manifest(batches)
    assert manifest["skipped"] == [{"id": "broken_\\xff\\r\\n.png", "reason": "not a recognised image format"}]
    text = json.dumps(manifest, ensure_ascii=False, allow_nan=False)
    assert json.loads(text.encode("utf-8").decode("utf-8", errors="strict")) == manifest


def test_one_byte_apart_names_hash_differently(tmp_path):
    hashes = []
    for byte in (b"\xe8", b"\xe9"):
        folder = tmp_path / byte.hex()
        folder.mkdir()
        try:
            Image.new("RGB", (8, 8)).save(os.fsdecode(os.path.join(os.fsencode(folder), b"x" + byte + b".png")), format="PNG")
        except (OSError, UnicodeError) as exc:
            pytest.skip(f"file system refuses arbitrary bytes in names: {exc}")
        hashes.append(image_list_sha256(resolve_source(str(folder))))
    assert hashes[0] != hashes[1]


def test_list_file_names_files_by_their_bytes(hostile_folder):
    list_path = hostile_folder / "list.txt"
    list_path.write_bytes(b"latin1_\xe9.png\nmath_$x^$.png\n")
    source = resolve_source(str(list_path))
    assert source.ids == ("latin1_\\xe9.png", "math_\\x24x^\\x24.png")
    assert sum(len(batch.paths) for batch in iter_batches(source, CONFIG, progress=False)) == 2


def test_labels_file_may_name_a_non_utf8_file_by_its_id(hostile_folder):
    (hostile_folder / "labels.tsv").write_text("filename\tindex\nlatin1_\\xe9.png\t3\ncafé_猫.png\t4\n")
    labels = {item.id: item.label for item in resolve_source(str(hostile_folder)).items}
    assert labels["latin1_\\xe9.png"] == 3 and labels["café_猫.png"] == 4
