"""A neighbour-blocked layer (the training-dynamics co-perturbation): the hooked model equals timm
trained with the same block, its patch queries give the 8 neighbours no attention, and path
patching into a blocked layer stays finite."""
import timm
import torch

from vitcircuits.composition.ablation import ZStats
from vitcircuits.composition.patching import PatchEffects, PatchingConfig, path_patch_batch
from vitcircuits.models import HookedViT, ViTConfig
from vitcircuits.models.loading import load_model
from vitcircuits.organisms.cifar import normalize_images
from vitcircuits.organisms.shapes import ShapesOrganismConfig, train_shapes_organism

TINY = dict(epochs=1, batch_size=16, embed_dim=16, depth=2, num_heads=2, n_train=96, n_test=30, threads=1)


def test_the_hooked_model_equals_timm_with_the_block(tmp_path):
    train_shapes_organism(ShapesOrganismConfig(**TINY, block_layer0_neighbours=True), tmp_path, progress=False)
    loaded = load_model(str(tmp_path), device="cpu")
    assert loaded.model.cfg.neighbour_blocked_layers == (0,)
    images_BCHW = normalize_images(torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))
    reference = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()  # timm knows no block: add it as training did
    mask_NN = loaded.model.layout.neighbour_block_NN()
    reference.blocks[0].attn.register_forward_pre_hook(lambda module, args, kwargs: (args, {**kwargs, "attn_mask": mask_NN}), with_kwargs=True)
    unblocked = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    outputs = {}
    for name, model in (("theirs", reference), ("unblocked", unblocked)):
        model.blocks[0].attn.register_forward_hook(lambda module, args, out, name=name: outputs.__setitem__(name, out))
    with torch.no_grad():
        logits, cache = loaded.model.run_with_cache(images_BCHW, names_filter=lambda n: n == "blocks.0.hook_attn_out")
        assert (logits - reference(images_BCHW)).abs().max() < 1e-6
        unblocked(images_BCHW)
    ours = cache["blocks.0.hook_attn_out"]
    assert (ours - outputs["theirs"]).abs().max() < 1e-6 < 1e-3 < (ours - outputs["unblocked"]).abs().max()
    _, cache = loaded.model.run_with_cache(images_BCHW, names_filter=lambda n: n.endswith("hook_pattern"))
    pattern_HQK = cache["blocks.0.attn.hook_pattern"][0]
    start, layout = loaded.model.layout.patch_start, loaded.model.layout
    centre = layout.patch_index(3, 3)
    neighbours = [layout.patch_index(3 + dy, 3 + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    assert pattern_HQK[:, centre, neighbours].abs().max() == 0 and pattern_HQK[:, centre, centre].min() > 0
    assert cache["blocks.1.attn.hook_pattern"][0][:, centre, neighbours].min() > 0  # layer 1 is open
    assert start == 1


def test_path_patching_into_a_blocked_layer_is_finite():
    cfg = ViTConfig(d_model=32, n_layers=3, n_heads=2, d_head=16, d_mlp=64, patch_size=(4, 4), img_size=(24, 24), n_classes=3,
                    neighbour_blocked_layers=(1,))
    model = HookedViT(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    model.eval()
    images_BCHW = torch.randn(4, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    stats = ZStats.empty(model)
    stats.update(model, images_BCHW)
    senders = [(0, 0), (0, 1), (1, 0)]
    effects = PatchEffects(senders, 3, 2)
    path_patch_batch(model, images_BCHW, senders, effects, stats, PatchingConfig())
    assert torch.isfinite(effects.sum_SJLHM).all() and effects.sum_SJLHM[:2, :2, 1].abs().sum() > 0
