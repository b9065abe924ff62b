"""HookedViT vs transformers ViT, DeiT (distilled) and CLIP-vision: every hook within 1e-4 (fp32)."""
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers (the 'hf' extra) is not installed")

from vitcircuits.models.families.hf_vit import _ROLES, _find, _layers  # noqa: E402
from vitcircuits.models.loading import load_model  # noqa: E402

TOL = 1e-4
SMALL = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=8)


def hf_intermediates(layers, x_fn):
    acts, handles = {}, []
    for i, layer in enumerate(layers):
        p = f"blocks.{i}."
        roles = {r: _find(layer, _ROLES[r]) for r in _ROLES}
        handles += [
            layer.register_forward_hook(lambda m, a, o, p=p: acts.__setitem__(p + "hook_resid_post", o[0] if isinstance(o, tuple) else o)),
            roles["ln1"].register_forward_pre_hook(lambda m, a, p=p: acts.__setitem__(p + "hook_resid_pre", a[0])),
            roles["ln1"].register_forward_hook(lambda m, a, o, p=p: acts.__setitem__(p + "ln1.hook_normalized", o)),
            roles["ln2"].register_forward_pre_hook(lambda m, a, p=p: acts.__setitem__(p + "hook_resid_mid", a[0])),
            roles["ln2"].register_forward_hook(lambda m, a, o, p=p: acts.__setitem__(p + "ln2.hook_normalized", o)),
            roles["q"].register_forward_hook(lambda m, a, o, p=p: acts.__setitem__(p + "attn.hook_q", o)),
            roles["k"].register_forward_hook(lambda m, a, o, p=p: acts.__setitem__(p + "attn.hook_k", o)),
            roles["v"].register_forward_hook(lambda m, a, o, p=p: acts.__setitem__(p + "attn.hook_v", o)),
            roles["o"].register_forward_pre_hook(lambda m, a, p=p: acts.__setitem__(p + "attn.hook_z", a[0])),
            roles["fc1"].register_forward_hook(lambda m, a, o, p=p: acts.__setitem__(p + "mlp.hook_pre", o)),
            roles["fc2"].register_forward_pre_hook(lambda m, a, p=p: acts.__setitem__(p + "mlp.hook_post", a[0])),
        ]
    try:
        with torch.no_grad():
            out = x_fn()
    finally:
        for h in handles:
            h.remove()
    return out, acts


def compare(ours, layers, x_fn, ours_x, out_fn, extra=None):
    out, acts = hf_intermediates(layers, x_fn)
    with torch.no_grad():
        mine, cache = ours.run_with_cache(ours_x)
    for name, ref in acts.items():
        act = cache[name]
        if name.split(".")[-1] in ("hook_q", "hook_k", "hook_v", "hook_z"):
            act = act.flatten(2)
        err = (act - ref).abs().max().item()
        assert err <= TOL, f"{name}: {err:.2e}"
    assert len(acts) == 11 * ours.cfg.n_layers
    err = (mine - out_fn(out)).abs().max().item()
    assert err <= TOL, f"output: {err:.2e}"
    return cache, out


def test_vit_for_classification(tmp_path):
    hf = transformers.ViTForImageClassification(transformers.ViTConfig(**SMALL, num_labels=5)).eval()
    hf.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), device="cpu")
    assert loaded.family == "transformers:vit" and len(loaded.weights_sha256) == 64
    x = torch.randn(2, 3, 32, 32)
    compare(loaded.model, _layers(hf.vit), lambda: hf(pixel_values=x).logits, x, lambda o: o)


def test_deit_distilled_with_teacher(tmp_path):
    hf = transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(**SMALL, num_labels=4)).eval()
    hf.save_pretrained(tmp_path)
    model = load_model(str(tmp_path), device="cpu").model
    assert model.layout.dist_index == 1 and model.head_dist is not None
    x = torch.randn(2, 3, 32, 32)
    compare(model, _layers(hf.deit), lambda: hf(pixel_values=x).logits, x, lambda o: o)


def test_clip_vision_with_projection(tmp_path):
    cfg = transformers.CLIPVisionConfig(**SMALL, projection_dim=16)
    hf = transformers.CLIPVisionModelWithProjection(cfg).eval()
    hf.save_pretrained(tmp_path)
    model = load_model(str(tmp_path), device="cpu").model
    assert model.cfg.pre_norm and model.cfg.final_norm == "pooled" and model.cfg.activation == "quick_gelu"
    x = torch.randn(2, 3, 32, 32)
    cache, _ = compare(model, hf.vision_model.encoder.layers, lambda: hf(pixel_values=x).image_embeds, x, lambda o: o)
    with torch.no_grad():
        hidden = hf(pixel_values=x, output_hidden_states=True).hidden_states[0]
    assert (cache["ln_pre.hook_normalized"] - hidden).abs().max() <= TOL


def test_vit_img_size_override_matches_timm_resampling(tmp_path):
    hf = transformers.ViTModel(transformers.ViTConfig(**SMALL), add_pooling_layer=False).eval()
    hf.save_pretrained(tmp_path)
    model = load_model(str(tmp_path), img_size=48, device="cpu").model
    assert model.cfg.grid == (6, 6)
    from timm.layers import resample_abs_pos_embed

    expected = resample_abs_pos_embed(hf.embeddings.position_embeddings.detach(), new_size=[6, 6], num_prefix_tokens=1)
    assert torch.equal(model.pos_embed.detach(), expected)


def test_transformers_model_by_hub_id_from_offline_cache(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from vitcircuits.testing.checkpoints import populate_hf_cache

    hf = transformers.ViTForImageClassification(transformers.ViTConfig(**SMALL, num_labels=3)).eval()
    hf.save_pretrained(tmp_path / "src")
    (tmp_path / "src" / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"height": 32, "width": 32}, "resample": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    files = {p.name: p for p in (tmp_path / "src").iterdir()}
    populate_hf_cache(tmp_path / "cache", "someone/vit-tiny", files)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache")}
    code = ("from vitcircuits.models.loading import load_model; import json; m = load_model('someone/vit-tiny', device='cpu'); "
            "print(json.dumps([m.family, m.pretrained_cfg['crop_mode'], m.model.cfg.n_classes, m.weights_sha256 is not None]))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["transformers:vit", "squash", 3, True]
