"""HookedViT vs timm: every intermediate matches timm's own modules' activations (fp32, ≤ 1e-4)."""
import pytest
import timm
import torch

from tests.conftest import DINO_DIR, requires_dino
from vitcircuits.models.loading import load_model
from vitcircuits.testing.checkpoints import save_timm_folder

TOL = 1e-4


def timm_intermediates(model, x):
    """Activations of a timm ViT read off its own modules with forward hooks, under our hook names."""
    acts, handles = {}, []

    def out(name, fn=lambda t: t):
        return lambda m, i, o: acts.__setitem__(name, fn(o))

    def inp(name):
        return lambda m, i, o: acts.__setitem__(name, i[0])

    handles.append(model.patch_embed.register_forward_hook(out("hook_embed")))
    if isinstance(model.norm_pre, torch.nn.LayerNorm):
        handles.append(model.norm_pre.register_forward_hook(out("ln_pre.hook_normalized")))
    for i, blk in enumerate(model.blocks):
        p = f"blocks.{i}."
        blk.attn.fused_attn = False
        H, Dh = blk.attn.num_heads, blk.attn.head_dim

        def split(which, H=H, Dh=Dh):
            return lambda t: t.reshape(t.shape[0], t.shape[1], 3, H, Dh)[:, :, which]

        handles += [
            blk.register_forward_hook(inp(p + "hook_resid_pre")),
            blk.norm1.register_forward_hook(out(p + "ln1.hook_normalized")),
            blk.attn.qkv.register_forward_hook(out(p + "attn.hook_q", split(0))),
            blk.attn.qkv.register_forward_hook(out(p + "attn.hook_k", split(1))),
            blk.attn.qkv.register_forward_hook(out(p + "attn.hook_v", split(2))),
            blk.attn.attn_drop.register_forward_hook(out(p + "attn.hook_pattern")),
            blk.attn.proj.register_forward_hook(inp(p + "attn.hook_z")),
            blk.ls1.register_forward_hook(out(p + "hook_attn_out")),
            blk.norm2.register_forward_hook(inp(p + "hook_resid_mid")),
            blk.norm2.register_forward_hook(out(p + "ln2.hook_normalized")),
            blk.mlp.fc1.register_forward_hook(out(p + "mlp.hook_pre")),
            blk.mlp.act.register_forward_hook(out(p + "mlp.hook_post")),
            blk.ls2.register_forward_hook(out(p + "hook_mlp_out")),
            blk.register_forward_hook(out(p + "hook_resid_post")),
        ]
    final = model.fc_norm if isinstance(model.fc_norm, torch.nn.LayerNorm) else model.norm
    if isinstance(final, torch.nn.LayerNorm):
        handles.append(final.register_forward_hook(out("ln_final.hook_normalized")))
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for h in handles:
            h.remove()
        for blk in model.blocks:
            blk.attn.fused_attn = True
    return logits, acts


def assert_matches_timm(ours, ref, x):
    ref_out, ref_acts = timm_intermediates(ref, x)
    with torch.no_grad():
        out, cache = ours.run_with_cache(x)
        fused_out = ours(x)
        ref_fused = ref(x)
    assert torch.allclose(out, ref_out, atol=TOL, rtol=0), (out - ref_out).abs().max()
    assert (fused_out - ref_fused).abs().max() <= TOL
    compared = 0
    for name, ref_act in ref_acts.items():
        act = cache[name]
        if name.endswith("hook_z"):
            act = act.flatten(2)
        assert act.shape == ref_act.shape, name
        err = (act - ref_act).abs().max().item()
        assert err <= TOL, f"{name}: max abs error {err:.2e}"
        compared += 1
    for layer in range(ours.cfg.n_layers):
        q, k = cache[f"blocks.{layer}.attn.hook_q"], cache[f"blocks.{layer}.attn.hook_k"]
        scores = torch.einsum("bqhd,bkhd->bhqk", q * ours.cfg.d_head**-0.5, k)
        assert (cache[f"blocks.{layer}.attn.hook_attn_scores"] - scores).abs().max() <= TOL
        attn_out = cache[f"blocks.{layer}.attn.hook_result"].sum(2) + ours.blocks[layer].attn.proj.bias
        if ours.cfg.layer_scale:
            attn_out = attn_out * ours.blocks[layer].ls1.gamma
        assert (attn_out - ref_acts[f"blocks.{layer}.hook_attn_out"]).abs().max() <= TOL
    assert torch.allclose(cache["hook_pos_embed"][0], ref.pos_embed[0].detach(), atol=TOL)  # resampled exactly as timm does
    assert compared >= 14 * ours.cfg.n_layers


CASES = {
    "vit_base_patch32_224": ("vit_base_patch32_224", {}, None),
    "dinov2": ("vit_small_patch14_dinov2", {"img_size": 98, "depth": 4}, None),
    "dinov2_img_size_override": ("vit_small_patch14_dinov2", {"img_size": 98, "depth": 3}, 70),
    "dinov2_registers": ("vit_small_patch14_reg4_dinov2", {"img_size": 56, "depth": 3}, None),
    "clip_quickgelu_prenorm": ("vit_base_patch32_clip_quickgelu_224", {"depth": 3}, None),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {"depth": 3}, None),
    "no_cls_avg_fcnorm_noqkvbias": (
        "vit_tiny_patch16_224",
        {"depth": 2, "class_token": False, "global_pool": "avg", "qkv_bias": False, "img_size": (64, 96)},
        None,
    ),
    "gelu_tanh_no_head": ("vit_tiny_patch16_224", {"depth": 2, "act_layer": "gelu_tanh", "num_classes": 0}, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_timm_every_hook(case, tmp_path):
    arch, model_args, img_size = CASES[case]
    ref_src = timm.create_model(arch, pretrained=False, **model_args).eval()
    with torch.no_grad():
        for p in ref_src.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    folder = save_timm_folder(ref_src, tmp_path / "ckpt", arch, model_args)
    overrides = {"img_size": img_size} if img_size else {}
    ref = timm.create_model(f"local-dir:{folder}", pretrained=True, **overrides).eval()
    ours = load_model(str(folder), img_size=img_size, device="cpu").model
    assert ours.cfg.grid == tuple(ref.patch_embed.grid_size)
    x = torch.randn(2, 3, *ours.cfg.img_size)
    assert_matches_timm(ours, ref, x)


@requires_dino
def test_real_dinov2_small_matches_timm_at_224():
    ref = timm.create_model(f"local-dir:{DINO_DIR}", pretrained=True, img_size=224).eval()
    loaded = load_model(str(DINO_DIR), img_size=224, device="cpu")
    assert loaded.model.cfg.grid == (16, 16) and loaded.model.cfg.layer_scale
    assert len(loaded.weights_sha256) == 64
    x = torch.randn(2, 3, 224, 224)
    assert_matches_timm(loaded.model, ref, x)
