"""HookedViT behaviour: hooks API, fused vs explicit attention, stop_at_layer, weight views, LN folding."""
import pytest
import torch

from vitcircuits.models import HookedViT, ViTConfig
from vitcircuits.models.weights import fold_layer_norm


def small_cfg(**changes) -> ViTConfig:
    base = dict(d_model=48, n_layers=3, n_heads=4, d_head=12, d_mlp=96, patch_size=(8, 8), img_size=(32, 40), n_classes=7)
    return ViTConfig(**{**base, **changes})


def randomized(cfg: ViTConfig) -> HookedViT:
    model = HookedViT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def test_token_layout_positions():
    layout = small_cfg(dist_token=True, n_registers=3).layout
    assert (layout.cls_index, layout.dist_index, layout.register_slice, layout.patch_start) == (0, 1, (2, 5), 5)
    assert (layout.rows, layout.cols, layout.n_tokens) == (4, 5, 25)
    assert layout.patch_index(2, 3) == 5 + 2 * 5 + 3
    assert layout.patch_position(layout.patch_index(3, 1)) == (3, 1)
    with pytest.raises(IndexError):
        layout.patch_index(4, 0)
    no_cls = small_cfg(class_token=False, pooling="avg").layout
    assert no_cls.cls_index is None and no_cls.patch_start == 0


def test_invalid_configs_are_rejected():
    with pytest.raises(ValueError, match="class token"):
        small_cfg(class_token=False)
    with pytest.raises(ValueError, match="multiple"):
        small_cfg(img_size=(30, 40))


def test_pattern_hook_is_the_attention_actually_used():
    model = randomized(small_cfg())
    x = torch.randn(2, 3, 32, 40)
    fused = model(x)
    _, cache = model.run_with_cache(x, names_filter=lambda n: n.endswith(("hook_pattern", "hook_v", "hook_z")))
    for layer in range(3):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
        assert torch.allclose(pattern.sum(-1), torch.ones_like(pattern[..., 0]), atol=1e-5)
        z = torch.einsum("bhqk,bkhd->bqhd", pattern, cache[f"blocks.{layer}.attn.hook_v"])
        assert torch.allclose(z, cache[f"blocks.{layer}.attn.hook_z"], atol=1e-5)
    explicit = model.run_with_hooks(x, fwd_hooks=[(lambda n: n.endswith("hook_pattern"), lambda t, hook: None)])
    assert torch.allclose(fused, explicit, atol=1e-5)


def test_hook_can_replace_activation_and_hooks_are_removed():
    model = randomized(small_cfg())
    x = torch.randn(2, 3, 32, 40)
    clean = model(x)

    def uniform(pattern, hook):
        return torch.full_like(pattern, 1.0 / pattern.shape[-1])

    patched, cache = None, None
    with model.hooks([("blocks.1.attn.hook_pattern", uniform)]):
        patched, cache = model.run_with_cache(x, names_filter="blocks.1.attn.hook_pattern")
    assert torch.allclose(cache["blocks.1.attn.hook_pattern"], torch.full_like(cache["blocks.1.attn.hook_pattern"], 1 / 21))
    assert not torch.allclose(patched, clean)
    assert all(not hp.has_hooks for hp in model.hook_dict.values())
    assert torch.equal(model(x), clean)
    with pytest.raises(RuntimeError):
        with model.hooks([("blocks.0.hook_resid_pre", lambda t, hook: t * 0)]):
            raise RuntimeError("boom")
    assert torch.equal(model(x), clean)
    with pytest.raises(KeyError, match="no hook point"):
        model.run_with_hooks(x, fwd_hooks=[("blocks.9.hook_resid_pre", uniform)])


def test_zeroing_a_head_through_hook_z_changes_only_that_heads_result():
    model = randomized(small_cfg())
    x = torch.randn(1, 3, 32, 40)
    _, clean = model.run_with_cache(x, names_filter="blocks.0.attn.hook_result")

    def kill_head_2(z, hook):
        z = z.clone()
        z[:, :, 2] = 0
        return z

    with model.hooks([("blocks.0.attn.hook_z", kill_head_2)]):
        _, ablated = model.run_with_cache(x, names_filter="blocks.0.attn.hook_result")
    diff = (clean["blocks.0.attn.hook_result"] - ablated["blocks.0.attn.hook_result"]).abs().amax(dim=(0, 1, 3))
    assert diff[2] > 0 and diff[[0, 1, 3]].max() == 0


def test_stop_at_layer_returns_resid_pre():
    model = randomized(small_cfg())
    x = torch.randn(2, 3, 32, 40)
    _, cache = model.run_with_cache(x, names_filter="blocks.2.hook_resid_pre")
    assert torch.equal(model(x, stop_at_layer=2), cache["blocks.2.hook_resid_pre"])


def test_hook_names_follow_transformerlens():
    model = HookedViT(small_cfg(pre_norm=True))
    names = set(model.hook_names)
    for expected in [
        "hook_embed", "hook_pos_embed", "ln_pre.hook_normalized", "blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid",
        "blocks.2.hook_resid_post", "blocks.1.ln1.hook_normalized", "blocks.1.attn.hook_q", "blocks.1.attn.hook_attn_scores",
        "blocks.1.attn.hook_pattern", "blocks.1.attn.hook_z", "blocks.1.attn.hook_result", "blocks.1.hook_attn_out",
        "blocks.1.mlp.hook_pre", "blocks.1.mlp.hook_post", "blocks.1.hook_mlp_out", "ln_final.hook_normalized",
    ]:
        assert expected in names


@pytest.mark.parametrize("layer_scale", [False, True])
def test_weight_views_reproduce_q_and_head_outputs(layer_scale):
    model = randomized(small_cfg(layer_scale=layer_scale))
    x = torch.randn(2, 3, 32, 40)
    _, cache = model.run_with_cache(x)
    W_Q, b_Q, W_V, W_O, b_O = model.W_Q, model.b_Q, model.W_V, model.W_O, model.b_O
    assert W_Q.shape == (3, 4, 48, 12) and W_O.shape == (3, 4, 12, 48)
    for layer in range(3):
        ln = cache[f"blocks.{layer}.ln1.hook_normalized"]
        q = torch.einsum("bnd,hde->bnhe", ln, W_Q[layer]) + b_Q[layer]
        assert torch.allclose(q, cache[f"blocks.{layer}.attn.hook_q"], atol=1e-5)
        v = torch.einsum("bnd,hde->bnhe", ln, W_V[layer]) + model.b_V[layer]
        assert torch.allclose(v, cache[f"blocks.{layer}.attn.hook_v"], atol=1e-5)
        attn_out = torch.einsum("bnhe,hed->bnd", cache[f"blocks.{layer}.attn.hook_z"], W_O[layer]) + b_O[layer]
        assert torch.allclose(attn_out, cache[f"blocks.{layer}.hook_attn_out"], atol=1e-5)


def test_fold_layer_norm_keeps_outputs_and_makes_ln_affine_identity():
    model = randomized(small_cfg(qkv_bias=False, dist_token=True, layer_scale=True))
    x = torch.randn(2, 3, 32, 40)
    folded = fold_layer_norm(model)
    assert torch.allclose(folded(x), model(x), atol=1e-5)
    for block in folded.blocks:
        for ln in (block.ln1, block.ln2):
            assert torch.equal(ln.weight, torch.ones_like(ln.weight)) and torch.equal(ln.bias, torch.zeros_like(ln.bias))
    _, cache = folded.run_with_cache(x, names_filter="blocks.1.ln1.hook_normalized")
    normed = cache["blocks.1.ln1.hook_normalized"]
    assert torch.allclose(normed.mean(-1), torch.zeros_like(normed[..., 0]), atol=1e-5)
    _, ref = model.run_with_cache(x, names_filter="blocks.1.attn.hook_q")
    _, new = folded.run_with_cache(x, names_filter="blocks.1.attn.hook_q")
    assert torch.allclose(ref["blocks.1.attn.hook_q"], new["blocks.1.attn.hook_q"], atol=1e-5)
    assert not torch.allclose(model.W_Q, folded.W_Q)


def test_wrong_image_size_is_a_clear_error():
    with pytest.raises(ValueError, match=r"expected images of shape \[B, 3, 32, 40\]"):
        HookedViT(small_cfg())(torch.randn(1, 3, 32, 32))


def test_bfloat16_runs_close_to_float32():
    model = randomized(small_cfg())
    x = torch.randn(2, 3, 32, 40)
    ref = model(x)
    out = model.to(torch.bfloat16)(x)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()
