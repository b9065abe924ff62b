"""A packed checkpoint series unpacks to the series it was packed from: every weight within half a
quantisation step, the last checkpoint exact, and damage or another final model refused."""
import json
import lzma
import shutil

import numpy as np
import pytest
import timm
from safetensors.numpy import load, load_file, save

from vitcircuits.organisms.packed import PACKED, pack_organism, unpack_series
from vitcircuits.organisms.series import SERIES, read_series
from vitcircuits.organisms.shapes import ShapesOrganismConfig, train_shapes_organism

TINY = dict(epochs=2, batch_size=16, embed_dim=16, depth=2, num_heads=2, n_train=320, n_test=60, threads=1, checkpoints=8)
ALPHA = 2**-5


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed")
    train_shapes_organism(ShapesOrganismConfig(**TINY), root / "organism", progress=False)
    index = pack_organism(root / "organism", root / "bundle", ALPHA)
    return root, index


def test_unpacked_weights_are_within_half_a_step(packed, tmp_path):
    root, index = packed
    original = read_series(root / "organism")
    unpacked = unpack_series(root / "bundle" / SERIES, root / "bundle", tmp_path / "series")
    assert [s for s, _ in unpacked] == [s for s, _ in original] and len(original) >= 6
    for (step, a), (_, b) in zip(original, unpacked):
        wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
        assert all(wb[k].dtype == np.float16 for k in wb)
        for k in wa:
            error = np.abs(wa[k].astype(np.float32) - wb[k].astype(np.float32)).max()
            # half a step, plus float16 rounding of the original and of the rebuilt weight
            bound = index["step_q"][k] / 2 + 2 * 2**-11 * np.abs(wa[k].astype(np.float32)).max() + 1e-7
            assert error <= bound, (step, k, error, bound)
        assert json.loads((b / "checkpoint.json").read_text()) == json.loads((a / "checkpoint.json").read_text())
    last_a, last_b = original[-1][1] / "model.safetensors", unpacked[-1][1] / "model.safetensors"
    assert load_file(str(last_a)).keys() == load_file(str(last_b)).keys()
    assert all(np.array_equal(load_file(str(last_a))[k], load_file(str(last_b))[k]) for k in load_file(str(last_a)))


def test_damage_and_another_final_model_are_refused(packed, tmp_path):
    root, index = packed
    bundle = tmp_path / "bundle"
    shutil.copytree(root / "bundle", bundle)
    other = tmp_path / "other"
    train_shapes_organism(ShapesOrganismConfig(**{**TINY, "seed": 1, "checkpoints": 0}), other, progress=False)
    with pytest.raises(ValueError, match="not the final model"):
        unpack_series(bundle / SERIES, other, tmp_path / "a")
    damaged = bundle / SERIES / index["checkpoints"][2]["file"]
    codes = load(lzma.decompress(damaged.read_bytes()))
    name = sorted(codes)[0]
    codes[name] = codes[name] + np.ones_like(codes[name])
    damaged.write_bytes(lzma.compress(save(codes)))
    with pytest.raises(ValueError, match="does not match its sha256"):
        unpack_series(bundle / SERIES, bundle, tmp_path / "b")
    (bundle / SERIES / PACKED).unlink()
    with pytest.raises(FileNotFoundError, match="not a packed series"):
        unpack_series(bundle / SERIES, bundle, tmp_path / "c")


def test_the_bundled_series_reproduces_its_recorded_test_metrics(tmp_path):
    """The bundled series, unpacked (every checkpoint's sha256 checked), scores the trainer's 5,000
    test images as the float32 originals did when training recorded them. Measured over all 29
    checkpoints: loss within 0.029, accuracy within 0.015 (early, noisy steps); through the phase
    change within 0.002. The bounds leave a margin over those."""
    from vitcircuits.models.loading import bundled_model_folder
    from vitcircuits.organisms import shapes_task
    from vitcircuits.organisms.cifar import normalize_images
    from vitcircuits.organisms.series import group_metrics
    from vitcircuits.organisms.shapes import GROUPS

    organism = bundled_model_folder("shapes-vit-series")
    series = unpack_series(organism / SERIES, organism, tmp_path / "series")
    assert len(series) == 29 and series[0][0] == 1 and series[-1][0] == 9372
    images, labels = shapes_task.dataset(2, 5000)
    inputs = normalize_images(images)
    for step, folder in (s for s in series if s[0] in (155, 1031, 1937, 2655, 9372)):
        model = timm.create_model(f"local-dir:{folder}", pretrained=True).float().eval()
        got, recorded = group_metrics(model, inputs, labels, GROUPS), json.loads((folder / "checkpoint.json").read_text())
        assert abs(got["loss"] - recorded["loss"]) < 0.05 and abs(got["compositional_accuracy"] - recorded["compositional_accuracy"]) < 0.02, step
