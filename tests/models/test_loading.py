"""Loading by hub id from a fake offline HF cache, offline failure, files with --arch, strict keys."""
import json
import os
import subprocess
import sys
import time

import pytest
import timm
import torch
from safetensors.torch import save_file

from vitcircuits.models.checkpoints import StateDictMismatchError
from vitcircuits.models.loading import load_model
from vitcircuits.testing.checkpoints import populate_hf_cache, save_timm_folder

REF_ID = "timm/vit_base_patch32_224.augreg_in21k_ft_in1k"


def run_cli(args, env_extra, timeout=120):
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"} | env_extra
    return subprocess.run([sys.executable, "-m", "vitcircuits", *args], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def reference_cache(tmp_path_factory):
    """A HF cache holding the reference model's repo: real architecture, random fp16 weights."""
    root = tmp_path_factory.mktemp("hf")
    ref = timm.create_model("vit_base_patch32_224", pretrained=False).eval()
    folder = root / "src"
    save_timm_folder(ref.half(), folder, "vit_base_patch32_224")
    config = json.loads((folder / "config.json").read_text())
    config["pretrained_cfg"] = timm.models.get_pretrained_cfg("vit_base_patch32_224.augreg_in21k_ft_in1k").to_dict()
    (folder / "config.json").write_text(json.dumps(config))
    cache = root / "cache"
    populate_hf_cache(cache, REF_ID, {"config.json": folder / "config.json", "model.safetensors": folder / "model.safetensors"})
    return cache, ref.float()


@pytest.mark.slow
@pytest.mark.parametrize("spec", [REF_ID, "vit_base_patch32_224.augreg_in21k_ft_in1k", f"hf-hub:{REF_ID}"])
def test_load_reference_by_name_from_offline_cache(reference_cache, monkeypatch, spec):
    cache, ref = reference_cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.file_download.HF_HUB_CACHE", str(cache), raising=False)
    loaded = load_model(spec, device="cpu")
    assert loaded.model_id == REF_ID and loaded.arch == "vit_base_patch32_224" and not loaded.random_weights
    assert loaded.pretrained_cfg["crop_pct"] == 0.9
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (loaded.model(x) - ref.half().float()(x)).abs().max() < 1e-4


@pytest.mark.slow
def test_cli_info_against_prepopulated_cache(reference_cache):
    cache, _ = reference_cache
    result = run_cli(["info", REF_ID], {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr
    assert "vit_base_patch32_224" in result.stdout and "7 x 7" in result.stdout
    assert "blocks.{0..11}" in result.stdout and "attn.hook_pattern" in result.stdout


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}], ids=["offline", "unreachable"])
def test_without_cached_weights_fails_fast_naming_the_repo(tmp_path, env):
    start = time.monotonic()
    result = run_cli(["info", REF_ID], {"HF_HUB_CACHE": str(tmp_path / "empty"), **env}, timeout=60)
    elapsed = time.monotonic() - start
    assert result.returncode == 2
    message = " ".join(result.stderr.split())
    assert REF_ID in message and "hf download" in message and "--model" in message
    assert "Traceback" not in result.stderr
    print(f"failed in {elapsed:.1f} s")


def test_weights_file_with_arch_and_pth_weights_only(tmp_path):
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3).eval()
    torch.save({"model": ref.state_dict()}, tmp_path / "w.pth")
    save_file(ref.state_dict(), str(tmp_path / "w.safetensors"))
    x = torch.randn(1, 3, 224, 224)
    with pytest.raises(ValueError, match="--arch"):
        load_model(str(tmp_path / "w.pth"))
    for name in ("w.pth", "w.safetensors"):
        # num_classes comes from the checkpoint's head, not timm's default of 1000: a mismatch is an error
        with pytest.raises(StateDictMismatchError, match="head.weight"):
            load_model(str(tmp_path / name), arch="vit_tiny_patch16_224")
    full = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    torch.save(full.state_dict(), tmp_path / "full.pth")
    loaded = load_model(str(tmp_path / "full.pth"), arch="vit_tiny_patch16_224", device="cpu")
    with torch.no_grad():
        assert (loaded.model(x) - full(x)).abs().max() < 1e-4


def test_plain_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    import pickle

    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"model": Evil()}))
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|global"):
        load_model(str(tmp_path / "evil.pth"), arch="vit_tiny_patch16_224")


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=2)
    folder = save_timm_folder(ref, tmp_path / "m", "vit_tiny_patch16_224", {"depth": 2})
    state = ref.state_dict()
    state.pop("blocks.1.attn.qkv.weight")
    state["extra.thing"] = torch.zeros(1)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(StateDictMismatchError) as err:
        load_model(str(folder))
    assert "missing keys: blocks.1.attn.qkv.weight" in str(err.value) and "unexpected keys: extra.thing" in str(err.value)


def test_random_weights_only_when_asked_and_seeded(tmp_path):
    a = load_model("vit_tiny_patch16_224", random_weights=True, seed=3, device="cpu")
    b = load_model("vit_tiny_patch16_224", random_weights=True, seed=3, device="cpu")
    c = load_model("vit_tiny_patch16_224", random_weights=True, seed=4, device="cpu")
    assert a.random_weights and a.weights_sha256 is None and a.manifest()["random_weights"] is True
    assert torch.equal(a.model.blocks[0].attn.qkv.weight, b.model.blocks[0].attn.qkv.weight)
    assert not torch.equal(a.model.blocks[0].attn.qkv.weight, c.model.blocks[0].attn.qkv.weight)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224"}))
    with pytest.raises(Exception, match="model.safetensors"):
        load_model(str(empty))


def test_bfloat16_checkpoint_and_dtype(tmp_path):
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=2, img_size=64).eval()
    folder = save_timm_folder(ref.to(torch.bfloat16), tmp_path / "bf", "vit_tiny_patch16_224", {"depth": 2, "img_size": 64})
    loaded = load_model(str(folder), device="cpu")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (loaded.model(x) - ref.float()(x)).abs().max() < 1e-4
    half = load_model(str(folder), device="cpu", dtype="bfloat16")
    assert half.model.dtype == torch.bfloat16
