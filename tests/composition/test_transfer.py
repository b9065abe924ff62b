"""Neighbour → centre transfer probes on a planted model: the modular head moves neighbour content in.

The model has four planted layer-0 heads (modular, self, sink, global; no directional head, which
would copy one neighbour whole). On noise images neighbouring patches are independent, so the
centre's residual predicts a neighbour's embedding only after the modular head has written the
average of the 8 neighbours: one neighbour is 1/8 of that average, R² <= 1/8 in theory (measured
about 0.08-0.12 over image and split seeds; radius-2 offsets stay below 0.03).
"""
import numpy as np
import pytest
import torch

from vitcircuits.composition.ablation import ZStats
from vitcircuits.composition.transfer import (
    SPLITS,
    TooFewImages,
    TransferConfig,
    TransferProbe,
    fit_target_basis,
    image_split,
    offsets_within,
    plot_receptive_field,
    transfer_curves,
)
from vitcircuits.groundtruth.planted import PlantedConfig, build_planted_heads

CONFIG = TransferConfig()
RING_O = np.array([max(abs(dy), abs(dx)) for dy, dx in offsets_within(CONFIG.radius)])
MODULAR_HEAD = (0, 0)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The probes solve many small systems; one thread avoids oversubscribing a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return build_planted_heads(PlantedConfig(offsets=(), n_heads=4)).model


@pytest.fixture(scope="module")
def images():
    return torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def zero_results(model, images):
    return transfer_curves(model, [images[:24], images[24:]], CONFIG, {"modular": [MODULAR_HEAD]}, stats=None)


@pytest.fixture(scope="module")
def mean_results(model, images):
    stats = ZStats.empty(model)
    stats.update(model, images)
    return transfer_curves(model, [images[:24], images[24:]], CONFIG, {"modular": [MODULAR_HEAD]}, stats=stats)


def test_layout_of_result(zero_results):
    clean = zero_results["clean"]
    assert clean.layer_names == ("embed", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post")
    assert len(clean.offsets) == 25 and clean.r2_LO.shape == (3, 25) and clean.ridge_LO.shape == (3, 25)
    assert clean.centres_per_image == 16  # the 4x4 interior of the 8x8 grid
    assert clean.n_train_images + clean.n_test_images == 48
    assert clean.target_dims == 4 and clean.target_variance_kept == pytest.approx(1.0)  # content is +/- pairs: rank 4
    assert clean.ablation == "none" and zero_results["modular"].ablation.startswith("zero")


def test_embed_layer_holds_own_content_only(zero_results):
    r2_O = zero_results["clean"].r2_LO[0]
    assert r2_O[RING_O == 0].item() > 0.95
    assert np.abs(r2_O[RING_O > 0]).max() < 0.06


def test_modular_head_moves_radius_one_content_in(zero_results):
    embed_O, after0_O = zero_results["clean"].r2_LO[:2]
    assert after0_O[RING_O == 0].item() > 0.95
    assert after0_O[RING_O == 1].min() > 0.02
    assert after0_O[RING_O == 1].mean() > 0.05 + embed_O[RING_O == 1].mean()
    assert after0_O[RING_O == 2].mean() < 0.03 and after0_O[RING_O == 2].max() < 0.06


@pytest.mark.parametrize("kind", ["zero", "mean"])
def test_ablating_the_modular_head_removes_the_transfer(kind, zero_results, mean_results):
    results = zero_results if kind == "zero" else mean_results
    assert results["modular"].ablation.startswith(kind)
    clean_O, ablated_O = results["clean"].r2_LO[1], results["modular"].r2_LO[1]
    assert ablated_O[RING_O == 1].mean() < 0.03
    assert clean_O[RING_O == 1].mean() - ablated_O[RING_O == 1].mean() > 0.05
    assert ablated_O[RING_O == 0].item() > 0.95  # the centre's own content is untouched
    np.testing.assert_allclose(results["modular"].r2_LO[0], results["clean"].r2_LO[0], atol=1e-9)  # before the head


def test_streaming_over_batches_equals_one_batch(model, images):
    basis = fit_target_basis(model, [images], CONFIG)
    whole, halves = TransferProbe(CONFIG, basis), TransferProbe(CONFIG, basis)
    whole.update(model, images, range(48))
    halves.update(model, images[:24], range(24))
    halves.update(model, images[24:], range(24, 48))
    torch.testing.assert_close(halves.gram_SLEE, whole.gram_SLEE, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(halves.result().r2_LO, whole.result().r2_LO, atol=1e-8)


def test_split_is_by_image_and_independent_of_batching(model, images):
    splits = [image_split(index, CONFIG) for index in range(400)]
    assert set(splits) == set(SPLITS)
    assert 0.18 < splits.count("test") / 400 < 0.32
    assert splits != [image_split(index, TransferConfig(seed=1)) for index in range(400)]
    basis = fit_target_basis(model, [images], CONFIG)
    full = TransferProbe(CONFIG, basis)
    full.update(model, images, range(48))
    test = [i for i in range(48) if splits[i] == "test"]
    train = [i for i in range(48) if splits[i] != "test"]
    assert full.n_images["test"] == len(test) and full.n_images["fit"] + full.n_images["val"] == len(train)
    test_only = TransferProbe(CONFIG, basis)  # the test images alone, shuffled: same held-out statistics
    order = test[::-1]
    test_only.update(model, images[order], order)
    assert test_only.n_images == {"fit": 0, "val": 0, "test": len(test)}
    np.testing.assert_allclose(test_only.result(fit_from=full).r2_LO, full.result().r2_LO, atol=1e-8)
    with pytest.raises(TooFewImages, match="training split"):
        test_only.result()


def test_plot_receptive_field(zero_results, tmp_path):
    path = plot_receptive_field(zero_results, tmp_path / "transfer.png")
    assert path.stat().st_size > 0
