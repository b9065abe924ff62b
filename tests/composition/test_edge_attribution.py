"""Edge attribution: its gradients are exactly those of a reference built from plain autograd, and
it ranks the organism's edges like exact task-level path patching does."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vitcircuits.composition.ablation import ZStats
from vitcircuits.composition.edge_attribution import (
    EdgeAttribution,
    EdgeAttributionConfig,
    LNPullBack,
    _role_gradients,
    edge_attribution_batch,
    spearman,
)
from vitcircuits.composition.patching import PATHS
from vitcircuits.composition.task_metric import TaskMetric
from vitcircuits.composition.task_patching import all_edges, edge_drops
from vitcircuits.groundtruth.ground_truth import roc_auc
from vitcircuits.inputs import ImageOptions
from vitcircuits.models.loading import load_model


@pytest.fixture(scope="module")
def organism():
    torch.set_num_threads(1)
    loaded = load_model("bundled:shapes-vit", device="cpu")
    images = torch.cat([b.images_BCHW for b in ImageOptions(images="bundled:shapes", batch_size=100).open(loaded).batches(progress=False)])
    images = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:64]]
    stats = ZStats.empty(loaded.model)
    stats.update(loaded.model, images)
    return loaded.model, images, stats


def test_ln_pull_back_is_the_autograd_gradient(organism):
    model, images, _ = organism
    resid = model(images[:4], stop_at_layer=2).double()
    block = copy.deepcopy(model.blocks[2]).double()
    g_3BHNd = torch.randn(3, 4, model.cfg.n_heads, resid.shape[1], model.cfg.d_head, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = resid.clone().requires_grad_(True)
    normed = F.layer_norm(x, block.ln1.weight.shape, block.ln1.weight, block.ln1.bias, block.ln1.eps)
    B, N, H, Dh = 4, resid.shape[1], model.cfg.n_heads, model.cfg.d_head
    qkv_3BHNd = block.attn.qkv(normed).view(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4)
    for role in range(3):
        ours_HBND = LNPullBack(block, resid, role)(g_3BHNd[role])
        for head in range(H):
            (grad,) = torch.autograd.grad((qkv_3BHNd[role, :, head] * g_3BHNd[role, :, head]).sum(), x, retain_graph=True)
            torch.testing.assert_close(ours_HBND[head], grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("role", [0, 1, 2])
def test_role_gradients_match_a_perturbation_of_one_input(organism, role):
    """The gradient with respect to the residual as head ``h`` of layer ``l`` reads it through
    ``role``, on the interpolated run, equals the autograd gradient of a zero perturbation added
    to that one head's input there."""
    model, images, stats = organism
    metric = TaskMetric("margin")
    x = images[:6]
    with torch.no_grad():
        targets = metric.targets(metric.output(model, x))
    L, H, Dh = model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head
    shift_LBND = 0.3 * torch.randn(L + 1, 6, model.layout.n_tokens, model.cfg.d_model, generator=torch.Generator().manual_seed(2))
    alpha, layer, head = 0.5, 2, 1
    ours, final = _role_gradients(model, x, targets, metric, shift_LBND, alpha, role)
    assert (final is not None) == (PATHS[role] == "v")
    perturbation = torch.zeros(6, model.layout.n_tokens, model.cfg.d_model, requires_grad=True)
    saved = {}

    def read(layer_):
        def fn(t_BNHd, hook):
            blk = model.blocks[layer_]
            x_BND = saved[layer_] + alpha * shift_LBND[layer_]
            normed = F.layer_norm(x_BND, blk.ln1.weight.shape, blk.ln1.weight, blk.ln1.bias, blk.ln1.eps)
            new = blk.attn.qkv(normed).view(*x_BND.shape[:2], 3, H, Dh)[:, :, role].clone()
            if layer_ == layer:
                normed_h = F.layer_norm(x_BND + perturbation, blk.ln1.weight.shape, blk.ln1.weight, blk.ln1.bias, blk.ln1.eps)
                new[:, :, head] = blk.attn.qkv(normed_h).view(*x_BND.shape[:2], 3, H, Dh)[:, :, role, head]
            return new
        return fn

    def grab(layer_):
        def fn(t, hook):
            saved[layer_] = t
            return t
        return fn

    hooks = []
    for layer_ in range(1, L):
        hooks += [(f"blocks.{layer_}.hook_resid_pre", grab(layer_)), (f"blocks.{layer_}.attn.hook_{PATHS[role]}", read(layer_))]
    if PATHS[role] == "v":
        hooks.append((f"blocks.{L - 1}.hook_resid_post", lambda t, hook: t + alpha * shift_LBND[L]))
    with model.hooks(hooks):
        value = metric.value(metric.output(model, x), targets).sum()
    (reference,) = torch.autograd.grad(value, perturbation)
    assert reference.abs().max() > 1e-4, "the head should matter at all"
    torch.testing.assert_close(ours[layer][head], reference, rtol=1e-3, atol=1e-5)


def test_attribution_ranks_the_organisms_edges_like_exact_patching(organism):
    model, images, stats = organism
    metric = TaskMetric("margin")
    with torch.no_grad():
        targets = metric.targets(metric.output(model, images))
    sums = EdgeAttribution(model.cfg.n_layers, model.cfg.n_heads)
    for start in range(0, 64, 32):
        edge_attribution_batch(model, images[start : start + 32], targets[start : start + 32], metric, stats, sums, EdgeAttributionConfig())
    est_LHJLH, direct_LH = (t.numpy() for t in sums.mean())
    edges = all_edges(model)
    drops = edge_drops(model, images, targets, edges, stats, metric)
    exact = np.array([drops.mean(e) for e in edges])
    est = np.array([est_LHJLH[sl, sh, PATHS.index(kind), rl, rh] for sl, sh, rl, rh, kind in edges])
    floor = metric.floor(drops.clean_I)
    assert roc_auc(exact >= floor, est) >= 0.95
    top = np.argsort(-exact)[:10]
    assert spearman(est[top], exact[top]) > 0.5
    assert np.isfinite(direct_LH).all() and np.abs(direct_LH).max() > 0
    for sl in range(model.cfg.n_layers):
        assert (est_LHJLH[sl, :, :, : sl + 1] == 0).all(), "no edge into the same or an earlier layer"
