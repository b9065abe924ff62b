"""The head atlas on the real DINOv2-S (../shared) pins the qualitative result in docs/findings.md:
four early shift heads, one per cardinal direction, and no single modular head."""
import pytest

from tests.conftest import DINO_DIR, IMAGENET_DIR, requires_dino, requires_imagenet
from vitcircuits.heads.atlas import AtlasConfig
from vitcircuits.heads.scan import scan_heads
from vitcircuits.inputs import ImageOptions
from vitcircuits.models.loading import load_model

SHIFT_HEADS = {(1, 1): (0, 1), (2, 3): (0, -1), (3, 1): (1, 0), (3, 4): (-1, 0)}


@pytest.mark.slow
@requires_dino
@requires_imagenet
def test_dinov2_small_has_four_cardinal_shift_heads_and_no_modular_head():
    loaded = load_model(str(DINO_DIR), img_size=224, device="cpu")
    batches = ImageOptions(images=str(IMAGENET_DIR), batch_size=12, max_images=24).open(loaded).batches(progress=False)
    atlas, _ = scan_heads(loaded.model, batches, AtlasConfig(n_boot=50), loaded.model_id)
    uniform = atlas.baselines["uniform"].modular_score
    for (layer, head), offset in SHIFT_HEADS.items():
        row = atlas.row(layer, head)
        assert row.kind == "directional", row
        assert (row.peak_dy, row.peak_dx) == offset
        assert row.peak_mass > 0.45 and row.neighbour_mass > 0.55
        assert uniform < row.modular_score_lo and row.modular_score_hi < 0.5
    assert atlas.heads_of_kind("modular") == []
    assert max(r.modular_score for r in atlas.rows) < 0.5
    assert sum(r.kind == "global" for r in atlas.rows if r.layer == 0) >= 4  # layer 0 looks far
