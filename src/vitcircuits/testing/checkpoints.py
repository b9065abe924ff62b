"""Write models and images in the layouts loaders read: timm hub folders, a HuggingFace hub cache
and folders of noise images.

Used by tests to load models "by name" with ``HF_HUB_OFFLINE=1`` and no network.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import timm
from PIL import Image
from safetensors.torch import save_file
from torch import nn

TINY_VIT = {"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 3, "num_heads": 2, "num_classes": 3}
"""A randomly initialised ``vit_tiny_patch16_224`` small enough for command-line tests (8 x 8 grid)."""


def save_timm_folder(model: nn.Module, folder: str | Path, architecture: str, model_args: dict | None = None) -> Path:
    """Save a timm model as ``config.json`` + ``model.safetensors`` (timm hub layout)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pretrained_cfg = {k: v for k, v in model.pretrained_cfg.items() if isinstance(v, (int, float, str, list, tuple, bool, type(None)))}
    config = {
        "architecture": architecture,
        "num_classes": model.num_classes,
        "model_args": dict(model_args or {}),
        "pretrained_cfg": pretrained_cfg,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    return folder


def populate_hf_cache(cache_dir: str | Path, repo_id: str, files: dict[str, Path], revision: str = "main") -> Path:
    """Lay out ``files`` (name → source path) as huggingface_hub's cache would after a download
    of ``repo_id``, so ``hf_hub_download`` finds them offline. Returns the snapshot folder."""
    cache_dir = Path(cache_dir)
    repo_dir = cache_dir / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / revision).write_text(commit)
    for name, source in files.items():
        shutil.copyfile(source, snapshot / name)
    return snapshot


def tiny_vit_folder(folder: str | Path, **overrides) -> Path:
    """A random :data:`TINY_VIT` (with ``overrides``) saved in timm hub layout."""
    args = {**TINY_VIT, **overrides}
    return save_timm_folder(timm.create_model("vit_tiny_patch16_224", pretrained=False, **args), folder, "vit_tiny_patch16_224", args)


def noise_image_folder(folder: str | Path, n: int, seed: int = 0, size: tuple[int, int] = (32, 32), prefix: str = "") -> Path:
    """``n`` seeded uniform-noise RGB PNGs named ``{prefix}00.png``, ``{prefix}01.png`` …"""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"{prefix}{i:02d}.png")
    return folder
