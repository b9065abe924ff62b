"""Harvest for SAEs: augmented views, reading shards back, the image-level train/held-out split."""
import pytest
import torch

from vitcircuits.cache import CacheConfig, write_cache
from vitcircuits.data.augment import AugmentConfig, augmented_view, with_views
from vitcircuits.data.loader import ImageBatch
from vitcircuits.groundtruth.planted import PlantedConfig, random_like
from vitcircuits.sae.harvest import ShardReader, training_batches


def test_views_are_deterministic_crops_and_view_zero_is_the_image():
    image = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(0))
    config = AugmentConfig(seed=3)
    assert torch.equal(augmented_view(image, 7, 0, config), image)
    a, b = augmented_view(image, 7, 1, config), augmented_view(image, 7, 1, config)
    assert torch.equal(a, b) and a.shape == image.shape
    assert not torch.allclose(a, augmented_view(image, 7, 2, config))
    assert not torch.allclose(a, augmented_view(image, 8, 1, AugmentConfig(seed=3)))
    # a crop of a constant image is the same constant: views only move and rescale content
    flat = torch.full((3, 32, 32), 0.25)
    assert torch.allclose(augmented_view(flat, 1, 1, config), flat, atol=1e-6)
    stacked = with_views(image[None], (7,), 3, config)
    assert stacked.shape == (3, 3, 32, 32) and torch.equal(stacked[0], image) and torch.equal(stacked[1], a)


def _batches(n_images: int, batch: int):
    x = torch.randn(n_images, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for start in range(0, n_images, batch):
        idx = tuple(range(start, min(n_images, start + batch)))
        yield ImageBatch(images_BCHW=x[list(idx)], indices=idx, paths=tuple(f"img{i}" for i in idx), labels_B=None, skipped=())


def test_reader_returns_cached_rows_and_splits_by_image(tmp_path):
    model = random_like(PlantedConfig(grid=(4, 4), patch_size=8, n_layers=2)).model
    hook = "blocks.1.hook_resid_post"
    config = CacheConfig((hook,), shard_rows=50, views=2)
    write_cache(tmp_path, model, _batches(10, 4), config, {"images": "synthetic"})
    reader = ShardReader(tmp_path, hook)
    assert reader.n_rows == 10 * 2 * 16 and reader.width == model.cfg.d_model
    rows = list(reader.rows())
    views = torch.cat([r.view_N for r in rows])
    images = torch.cat([r.image_index_N for r in rows])
    assert (views == 0).sum() == (views == 1).sum() == 160
    # view-0 rows equal the model's activations on the original image
    x = next(_batches(10, 10)).images_BCHW
    _, cache = model.run_with_cache(x, names_filter=hook)
    acts = torch.cat([r.acts_ND for r in rows])
    pick = (images == 3) & (views == 0)
    assert torch.allclose(acts[pick], cache[hook][3, model.layout.patch_start :], atol=1e-6)
    held = torch.cat([r.image_index_N for r in reader.split(True, holdout_every=5)])
    train = torch.cat([r.image_index_N for r in reader.split(False, holdout_every=5)])
    assert set(held.tolist()) == {0, 5} and not set(train.tolist()) & {0, 5}
    # two epochs of training batches: every training row exactly twice, never a held-out row
    batches = list(training_batches(reader, batch_size=16, epochs=2, holdout_every=5, capacity_rows=64, seed=0))
    seen = torch.cat(batches)
    train_acts = torch.cat([r.acts_ND for r in reader.split(False, holdout_every=5)])
    assert seen.shape[0] == 2 * train_acts.shape[0]
    key = lambda t: sorted(map(tuple, t.round(decimals=5).tolist()))  # noqa: E731
    assert key(seen) == key(torch.cat([train_acts, train_acts]))


def test_reader_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no activation cache"):
        ShardReader(tmp_path, "blocks.0.hook_resid_post")
    model = random_like(PlantedConfig(grid=(4, 4), patch_size=8, n_layers=1)).model
    write_cache(tmp_path, model, _batches(2, 2), CacheConfig(("blocks.0.hook_resid_post",)), {"images": "synthetic"})
    with pytest.raises(ValueError, match="was not cached"):
        ShardReader(tmp_path, "blocks.0.hook_mlp_out")


def test_a_truncated_shard_is_named(tmp_path):
    model = random_like(PlantedConfig(grid=(4, 4), patch_size=8, n_layers=1)).model
    write_cache(tmp_path, model, _batches(4, 2), CacheConfig(("blocks.0.hook_resid_post",), shard_rows=16), {"images": "synthetic"})
    shard = tmp_path / "shard_00000002.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match="shard_00000002.safetensors: unreadable activation shard"):
        list(ShardReader(tmp_path, "blocks.0.hook_resid_post").rows())


def test_training_row_count_from_the_index_equals_the_rows_read(tmp_path):
    model = random_like(PlantedConfig(grid=(4, 4), patch_size=8, n_layers=1)).model
    write_cache(tmp_path, model, _batches(23, 4), CacheConfig(("blocks.0.hook_resid_post",), shard_rows=40, views=2), {"images": "synthetic"})
    reader = ShardReader(tmp_path, "blocks.0.hook_resid_post")
    assert len(reader.index["shards"]) > 2
    for every in (2, 3, 10):
        read = sum(int((r.image_index_N % every != 0).sum()) for r in reader.rows())
        assert reader.n_training_rows(every) == read > 0
