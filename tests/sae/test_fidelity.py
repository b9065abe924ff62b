"""Behaviour tests of downstream SAE fidelity (splicing an SAE reconstruction into a HookedViT)."""

import dataclasses
import json

import pytest
import torch

from vitcircuits.groundtruth.planted import PlantedConfig, random_like
from vitcircuits.models import HookedViT
from vitcircuits.sae.fidelity import FidelityConfig, downstream_fidelity
from vitcircuits.sae.model import SAE, SAEConfig

PLANTED = PlantedConfig(grid=(3, 3), patch_size=2, n_layers=2, n_heads=4, offsets=(), content_dims=2)
HOOK = "blocks.1.hook_resid_pre"


def classifier(n_classes=10, seed=0):
    model = HookedViT(dataclasses.replace(PLANTED.vit_config, n_classes=n_classes)).eval()
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    return model


def backbone():
    return random_like(PLANTED).model


def image_batches(sizes=(5, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 6, 6, generator=g) for n in sizes]


def exact_sae(d_in, hook_name=HOOK):
    """ReLU SAE with W_enc = [I, -I], W_dec = [I; -I]: relu(x) - relu(-x) = x, so it reconstructs exactly."""
    sae = SAE(SAEConfig(d_in=d_in, d_sae=2 * d_in, architecture="relu", normalize_activations=False, hook_name=hook_name))
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
    return sae


def random_sae(d_in, seed=1):
    return SAE(SAEConfig(d_in=d_in, d_sae=2 * d_in, k=4, normalize_activations=False), generator=torch.Generator().manual_seed(seed))


def noisy_sae(d_in, noise, seed=2):
    """The exact SAE with Gaussian noise on its decoder: lossy, increasingly so with ``noise``.
    (Scaling the decoder would not do: the pre-norm blocks are nearly blind to the residual's scale.)"""
    sae = exact_sae(d_in)
    with torch.no_grad():
        sae.W_dec.add_(noise * torch.randn(2 * d_in, d_in, generator=torch.Generator().manual_seed(seed)) / d_in**0.5)
    return sae


def test_exact_sae_is_lossless_and_mean_ablation_is_not():
    model = classifier()
    D = model.cfg.d_model
    result = downstream_fidelity(model, exact_sae(D), HOOK, image_batches())
    json.dumps(result)  # JSON-serialisable
    assert result["hook"] == HOOK and result["n_images"] == 8
    assert result["spliced_tokens"] == "patches" and result["output_kind"] == "logits"
    assert result["explained_variance"] == pytest.approx(1.0, abs=1e-9)
    assert result["relative_mse"] == pytest.approx(0.0, abs=1e-9)
    assert result["sae"]["kl"] == pytest.approx(0.0, abs=1e-9)
    assert result["sae"]["top1_agreement"] == 1.0
    assert result["mean_ablation"]["kl"] > 1e-4
    assert result["loss_recovered"] == pytest.approx(1.0, abs=1e-6)
    assert "accuracy" not in result["sae"] and "clean_accuracy" not in result  # no labels given


def test_worse_sae_recovers_less():
    model = classifier()
    D = model.cfg.d_model
    batches = image_batches()
    saes = (exact_sae(D), noisy_sae(D, 0.1), noisy_sae(D, 0.3), random_sae(D))
    results = [downstream_fidelity(model, sae, HOOK, batches) for sae in saes]
    ev = [r["explained_variance"] for r in results]
    kl = [r["sae"]["kl"] for r in results]
    recovered = [r["loss_recovered"] for r in results]
    assert all(a > b for a, b in zip(ev, ev[1:])) and ev[-1] < 0.5
    assert all(a < b for a, b in zip(kl, kl[1:])) and kl[1] > 1e-4
    assert all(a > b for a, b in zip(recovered, recovered[1:])) and recovered[-1] < 0.9
    # the mean-ablation baseline does not depend on the SAE
    assert {round(r["mean_ablation"]["kl"], 12) for r in results} == {round(results[0]["mean_ablation"]["kl"], 12)}


@pytest.mark.parametrize("include_prefix", [False, True])
def test_splice_replaces_only_patch_tokens(include_prefix):
    """ln1 of block 1 is per token, so its CLS row depends only on the CLS row of the spliced resid_pre."""
    model = classifier()
    cls = model.layout.cls_index
    seen = []

    def capture(tensor, hook):
        seen.append(tensor.clone())

    with model.hooks([("blocks.1.ln1.hook_normalized", capture)]):
        result = downstream_fidelity(model, random_sae(model.cfg.d_model), HOOK, image_batches(sizes=(4,)), FidelityConfig(include_prefix))
    assert result["spliced_tokens"] == ("all" if include_prefix else "patches")
    assert len(seen) == 4  # pass 1, then clean, SAE and mean-ablation forwards of the single batch
    cls_same = [torch.allclose(x[:, cls], seen[0][:, cls]) for x in seen]
    patches_same = [torch.allclose(x[:, model.layout.patch_start :], seen[0][:, model.layout.patch_start :]) for x in seen]
    assert not all(patches_same)
    assert all(cls_same) != include_prefix


def test_backbone_reports_embedding_agreement():
    model = backbone()
    assert model.cfg.n_classes == 0
    hook = "blocks.0.attn.hook_z"  # [B, N, H, Dh]: trailing dims flattened to H * Dh
    width = model.cfg.n_heads * model.cfg.d_head
    batches = [(x, None) for x in image_batches()]
    exact = downstream_fidelity(model, exact_sae(width, hook), hook, batches, progress=True)
    assert exact["output_kind"] == "embedding" and "kl" not in exact["sae"]
    assert exact["sae"]["cosine"] == pytest.approx(1.0, abs=1e-9)
    assert exact["sae"]["relative_error"] == pytest.approx(0.0, abs=1e-6)
    assert exact["mean_ablation"]["cosine"] < 1.0 - 1e-6 and exact["mean_ablation"]["relative_error"] > 1e-4
    assert exact["cosine_recovered"] == pytest.approx(1.0, abs=1e-6)
    bad = downstream_fidelity(model, random_sae(width), hook, batches)
    assert bad["sae"]["cosine"] < exact["sae"]["cosine"] and bad["sae"]["relative_error"] > exact["sae"]["relative_error"]


@torch.no_grad()
def test_accuracy_matches_a_manual_mean_ablation():
    model = classifier()
    D = model.cfg.d_model
    images = image_batches(sizes=(6,))[0]
    clean_pred = model(images).argmax(-1)
    # images 0-2 labelled with the clean prediction, 3-4 with a wrong class, 5 unknown: clean accuracy 3/5
    labels = torch.cat([clean_pred[:3], (clean_pred[3:5] + 1) % 10, torch.tensor([-1])])
    batches = [(images[:4], labels[:4]), (images[4:], labels[4:])]
    result = downstream_fidelity(model, exact_sae(D), HOOK, batches)
    assert result["clean_accuracy"] == pytest.approx(3 / 5)
    assert result["sae"]["accuracy"] == pytest.approx(3 / 5) and result["sae"]["delta_accuracy"] == 0.0

    start = model.layout.patch_start
    _, cache = model.run_with_cache(images, names_filter=HOOK)
    mean_D = cache[HOOK][:, start:].double().reshape(-1, D).mean(0)

    def ablate(tensor, hook):
        tensor = tensor.clone()
        tensor[:, start:] = mean_D.to(tensor.dtype)
        return tensor

    ablated = model.run_with_hooks(images, fwd_hooks=[(HOOK, ablate)])
    ablated_pred = ablated.argmax(-1)
    expected_acc = float((ablated_pred[:5] == labels[:5]).double().mean())
    assert expected_acc != 3 / 5  # mean ablation changes the accuracy, so the check below is not vacuous
    assert result["mean_ablation"]["accuracy"] == pytest.approx(expected_acc)
    assert result["mean_ablation"]["delta_accuracy"] == pytest.approx(expected_acc - 3 / 5)
    assert result["mean_ablation"]["top1_agreement"] == pytest.approx(float((ablated_pred == clean_pred).double().mean()))
    clean_logp, ablated_logp = model(images).double().log_softmax(-1), ablated.double().log_softmax(-1)
    kl = (clean_logp.exp() * (clean_logp - ablated_logp)).sum(-1).mean()
    assert result["mean_ablation"]["kl"] == pytest.approx(float(kl), rel=1e-4)


def test_errors_name_the_hook():
    model = classifier()
    D = model.cfg.d_model
    with pytest.raises(ValueError, match=HOOK) as info:
        downstream_fidelity(model, exact_sae(D + 1), HOOK, image_batches())
    assert str(D) in str(info.value) and str(D + 1) in str(info.value)
    with pytest.raises(ValueError, match="blocks.9.hook_resid_pre"):
        downstream_fidelity(model, exact_sae(D), "blocks.9.hook_resid_pre", image_batches())
    with pytest.raises(ValueError, match="empty"):
        downstream_fidelity(model, exact_sae(D), HOOK, [])
    with pytest.raises(ValueError, match="re-iterable"):
        downstream_fidelity(model, exact_sae(D), HOOK, iter(image_batches()))
