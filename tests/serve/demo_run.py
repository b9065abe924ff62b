"""One small hunt run of the bundled organism, made once per test session and shared by the serve
and browser tests. It uses lighter settings than ``vitcircuits demo`` (fewer bootstrap replicates,
baseline samples, patching images and SAE steps) so every stage, SAE features included, runs in
seconds on two CPU cores; the files it writes have the same layout."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

N_IMAGES = 40
_RUN: dict[str, Path] = {}


def light_config():
    from vitcircuits.composition.config import ComposeConfig
    from vitcircuits.composition.weights import CompositionConfig
    from vitcircuits.heads.atlas import AtlasConfig
    from vitcircuits.hunt import HuntConfig
    from vitcircuits.sae.dependence import DependenceConfig
    from vitcircuits.stages.features import AnalyzeConfig
    from vitcircuits.stages.sae import SAEStageConfig

    return HuntConfig(
        n_attention_images=1,
        atlas=AtlasConfig(n_boot=20),
        compose=ComposeConfig(weights=CompositionConfig(n_baseline_samples=40), max_patch_images=2, max_transfer_images=N_IMAGES),
        sae=SAEStageConfig(epochs=1, expansion=2, fidelity_images=4),
        analyze=AnalyzeConfig(dependence=DependenceConfig(n_features=6, n_examples=3, n_control_draws=1), zstats_images=8, gallery_features=3),
    )


def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run folder (created on the first call of the session)."""
    from vitcircuits.models.loading import bundled_model_names

    if "cifar10-vit" not in bundled_model_names():
        pytest.skip("bundled organism checkpoint missing")
    if "run" not in _RUN:
        from vitcircuits.hunt import hunt
        from vitcircuits.inputs import ImageOptions, ModelOptions

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        out = tmp_path_factory.mktemp("serve") / "demo"
        threads = torch.get_num_threads()
        # One intra-op thread: on a busy 2-core machine, two threads per op on these tiny tensors are ~10x slower.
        torch.set_num_threads(1)
        try:
            hunt(str(out), ModelOptions(model="bundled:cifar10-vit", device="cpu"),
                 ImageOptions(images="bundled:cifar10", batch_size=100, max_images=N_IMAGES), light_config())
        finally:
            torch.set_num_threads(threads)
        _RUN["run"] = out
    return _RUN["run"]


SCRIPT = "window.name = 'pwned'; fetch('/api/run').then((r) => r.text()).then((t) => { window.name = 'pwned: ' + t.length; });"
HOSTILE_FILES = {
    "hostile/page.html": f"<!doctype html><title>hostile</title><p>hostile page</p><script>{SCRIPT}</script>",
    "hostile/image.svg": f'<svg xmlns="http://www.w3.org/2000/svg" onload="{SCRIPT}"><script>{SCRIPT}</script><circle r="4"/></svg>',
    "hostile/doc.xml": f'<?xml version="1.0"?><html xmlns="http://www.w3.org/1999/xhtml"><script>{SCRIPT}</script></html>',
    "hostile/doc.xhtml": f'<html xmlns="http://www.w3.org/1999/xhtml"><script>{SCRIPT}</script></html>',
    "hostile/code.js": SCRIPT,
    "hostile/page.htm": f"<script>{SCRIPT}</script>",
    "hostile/noext": f"<script>{SCRIPT}</script>",
}
"""Files an untrusted run folder could hold, each trying to run script on the explorer's origin."""


def add_hostile_files(run: Path) -> None:
    for name, text in HOSTILE_FILES.items():
        (run / name).parent.mkdir(exist_ok=True)
        (run / name).write_text(text)
