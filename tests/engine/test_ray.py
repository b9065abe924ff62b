"""The ``ray`` engine gives the local engine's answer on a 2-CPU local cluster, and loses nothing
when a worker is killed. Tolerances: the atlas statistics are float64 sums of the same per-batch
terms in the same shard order, so they are required to match to 1e-12 relative; activations and
predictions come from the same batches, so they are required to be equal (activations to 1e-6,
in case a worker's thread count changes a reduction)."""
from __future__ import annotations

import pytest
import torch

from vitcircuits.cache import CacheConfig, CacheIndex, HarvestPass, harvest
from vitcircuits.composition.necessity import NecessityConfig, PredictionsPass, ZStatsPass, assemble_report, joined_predictions, necessity_conditions
from vitcircuits.engine import EngineOptions
from vitcircuits.heads.atlas import AtlasConfig, build_atlas
from vitcircuits.heads.scan import AtlasPass
from vitcircuits.inputs import ImageOptions, ModelOptions, provenance
from vitcircuits.sae.harvest import ShardReader
from vitcircuits.stages.overview import PredictionPass
from vitcircuits.testing.faults import KillOnce

ray = pytest.importorskip("ray", reason="the ray engine needs the ray extra (pip install 'vitcircuits[ray]')")

MODEL = ModelOptions(model="bundled:shapes-vit", device="cpu")
IMAGES = ImageOptions(images="bundled:shapes", batch_size=25, max_images=200)
HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def loaded():
    return MODEL.load()


@pytest.fixture(scope="module")
def on_ray(cluster, loaded):
    engine = EngineOptions(engine="ray", workers=2, shard_images=50).start(MODEL, loaded)
    yield IMAGES.open(loaded, engine)
    engine.close()


@pytest.fixture(scope="module")
def local(loaded):
    return IMAGES.open(loaded, EngineOptions(shard_images=50).start(MODEL, loaded))


def _atlas_sums(acc) -> dict[str, torch.Tensor]:
    return {name: getattr(acc, name) for name in acc._SUM_FIELDS}


def test_the_atlas_is_the_local_one(loaded, on_ray, local):
    config = AtlasConfig(n_boot=50)
    a, b = local.map(loaded, AtlasPass(config)), on_ray.map(loaded, AtlasPass(config))
    assert a.result.acc.n_images == b.result.acc.n_images == 200
    for name, value in _atlas_sums(a.result.acc).items():
        torch.testing.assert_close(_atlas_sums(b.result.acc)[name], value, rtol=1e-12, atol=0, msg=name)
    atlas_a = build_atlas(loaded.model, a.result.acc, config, "m")
    atlas_b = build_atlas(loaded.model, b.result.acc, config, "m")
    assert [r.kind for r in atlas_a.rows] == [r.kind for r in atlas_b.rows]
    bounds = lambda atlas: [v for r in atlas.rows for v in (r.modular_score, r.modular_score_lo, r.modular_score_hi)]  # noqa: E731
    assert bounds(atlas_b) == pytest.approx(bounds(atlas_a), rel=1e-9)
    assert [k[0] for k in a.result.kept] == [k[0] for k in b.result.kept] == [0, 1, 2]
    assert a.summary == b.summary


def test_predictions_are_the_local_ones_in_order(loaded, on_ray, local):
    a, b = local.map(loaded, PredictionPass(2)), on_ray.map(loaded, PredictionPass(2))
    assert a.result.rows == b.result.rows and [r[0] for r in b.result.rows] == list(range(200))


def _rows(folder):
    rows = list(ShardReader(folder, HOOK).rows())
    return torch.cat([r.acts_ND for r in rows]), torch.cat([r.image_index_N for r in rows])


def test_the_harvest_has_the_local_rows_in_the_same_order(tmp_path, loaded, on_ray, local):
    config = CacheConfig((HOOK,), shard_rows=700)
    made_from = provenance(loaded, local)
    index_a, a = harvest(tmp_path / "local", local, loaded, config, made_from, keep_every=7, keep_max=5, progress=False)
    index_b, b = harvest(tmp_path / "ray", on_ray, loaded, config, made_from, keep_every=7, keep_max=5, progress=False)
    assert index_a.index["shards"] == index_b.index["shards"]
    acts_a, images_a = _rows(tmp_path / "local")
    acts_b, images_b = _rows(tmp_path / "ray")
    assert torch.equal(images_a, images_b) and images_a.unique().tolist() == list(range(200))
    torch.testing.assert_close(acts_b, acts_a, rtol=0, atol=1e-6)
    assert torch.equal(torch.cat([x for x, _ in a.result.kept]), torch.cat([x for x, _ in b.result.kept]))
    assert sum(len(x) for x, _ in b.result.kept) == 5


def test_a_killed_worker_loses_and_repeats_no_image(tmp_path, loaded, on_ray, local):
    config = AtlasConfig(n_boot=20)
    dying = KillOnce(AtlasPass(config), tmp_path / "killed", at=130)
    b = on_ray.map(loaded, dying)
    assert (tmp_path / "killed").exists()  # a worker did die
    a = local.map(loaded, AtlasPass(config))
    assert b.result.acc.n_images == 200
    for name, value in _atlas_sums(a.result.acc).items():
        torch.testing.assert_close(_atlas_sums(b.result.acc)[name], value, rtol=1e-12, atol=0, msg=name)


def test_a_killed_worker_mid_harvest_leaves_every_row_once(tmp_path, loaded, on_ray, local):
    config = CacheConfig((HOOK,), shard_rows=700)
    made_from = provenance(loaded, local)
    harvest(tmp_path / "local", local, loaded, config, made_from, progress=False)
    index = CacheIndex(tmp_path / "ray", config, made_from)
    on_ray.map(loaded, KillOnce(HarvestPass(tmp_path / "ray", config, index), tmp_path / "killed", at=130), progress=False)
    assert (tmp_path / "killed").exists()
    assert index.done_images == frozenset(range(200))
    acts_a, images_a = _rows(tmp_path / "local")
    acts_b, images_b = _rows(tmp_path / "ray")
    assert torch.equal(images_a, images_b)
    torch.testing.assert_close(acts_b, acts_a, rtol=0, atol=1e-6)
    assert sorted(p.name for p in (tmp_path / "ray").glob("shard_*")) == sorted(s["file"] for s in index.index["shards"])


def test_necessity_is_the_local_one(loaded, on_ray, local):
    config = NecessityConfig(draws=3)
    conditions = necessity_conditions([(0, 3), (3, 0)], loaded.model.cfg.n_heads, config)
    reports = []
    for images in (local, on_ray):
        stats = images.map(loaded, ZStatsPass(), progress=False).result
        predicted = images.map(loaded, PredictionsPass(conditions, stats, config), progress=False).result
        reports.append(assemble_report(loaded.model, conditions, *joined_predictions(predicted), {"compositional": [0, 1, 2, 3]}, config))
    assert reports[0] == reports[1] and reports[0]["n_images"] == 200
    assert reports[0]["circuit"]["overall"] < reports[0]["clean"]["overall"]
