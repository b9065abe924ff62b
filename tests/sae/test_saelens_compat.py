"""Interoperability with SAELens 6: our saved SAEs load there with identical maths, and theirs load here.

SAELens is a dev extra (``pip install -e '.[dev]'``); CI installs it, elsewhere these tests are skipped.
"""

import json

import pytest
import torch

sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is a dev extra (pip install -e '.[dev]'); CI installs it")

from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig  # noqa: E402

from vitcircuits.sae.io import load_sae, save_sae  # noqa: E402
from vitcircuits.sae.model import SAEConfig  # noqa: E402
from vitcircuits.sae.train import TrainConfig, train_sae  # noqa: E402

D_IN, D_SAE, K = 16, 48, 4
HOOK = "blocks.3.hook_resid_post"


@pytest.fixture(scope="module")
def activations():
    """Sparse sums of random atoms, shifted and scaled far from unit norm so that normalisation matters."""
    g = torch.Generator().manual_seed(0)
    atoms_MD = torch.nn.functional.normalize(torch.randn(32, D_IN, generator=g), dim=1)
    codes_NM = torch.rand(3000, 32, generator=g) * (torch.rand(3000, 32, generator=g) < 0.1)
    return 5.0 * (codes_NM @ atoms_MD) + 2.0 + 0.05 * torch.randn(3000, D_IN, generator=g)


def assert_same_maths(ours, theirs, x_BD):
    feats_ours = ours.encode(x_BD)
    assert 0.0 < float((feats_ours != 0).float().mean()) < 1.0  # a non-trivial sparsity pattern
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x_BD), feats_ours, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs.decode(feats_ours), ours.decode(feats_ours), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs(x_BD), ours(x_BD)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch,their_class", [("topk", TopKSAE), ("batchtopk", JumpReLUSAE), ("relu", StandardSAE)])
def test_our_sae_loads_in_saelens(activations, tmp_path, arch, their_class):
    cfg = SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture=arch, k=K, l1_coefficient=0.3, hook_name=HOOK, hook_layer=3)
    tcfg = TrainConfig(lr=3e-3, warmup_steps=3, total_steps=15, batch_size=128, init_sample_rows=512, log_every=15)
    ours, _ = train_sae(activations, cfg, tcfg, progress=False)
    assert abs(float(ours.norm_scale) - 1.0) > 0.1  # saving has to fold the normalisation

    theirs = sae_lens.SAE.load_from_disk(save_sae(ours, tmp_path / "sae"), device="cpu")
    assert type(theirs) is their_class
    assert theirs.cfg.normalize_activations == "none" and theirs.cfg.apply_b_dec_to_input
    assert theirs.cfg.metadata.hook_name == HOOK
    if arch == "topk":
        assert theirs.cfg.k == K and theirs.cfg.rescale_acts_by_decoder_norm is False
    assert_same_maths(ours, theirs, activations[:512])


def _random_weights_(sae, seed: int, threshold: bool = False) -> None:
    g = torch.Generator().manual_seed(seed)
    d_in, d_sae = sae.cfg.d_in, sae.cfg.d_sae
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=g) / d_in**0.5)
        sae.b_enc.copy_(0.1 * torch.randn(d_sae, generator=g))
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=g) * (0.5 + torch.rand(d_sae, 1, generator=g)))  # norms far from 1
        sae.b_dec.copy_(0.3 * torch.randn(d_in, generator=g))
        if threshold:
            sae.threshold.copy_(0.05 + 0.3 * torch.rand(d_sae, generator=g))


@pytest.mark.parametrize(
    "their_cfg,our_arch",
    [
        (TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K), "topk"),
        (TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, rescale_acts_by_decoder_norm=True), "topk"),  # SAELens's training default
        (TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, apply_b_dec_to_input=False), "topk"),
        (JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE), "batchtopk"),
        (StandardSAEConfig(d_in=D_IN, d_sae=D_SAE), "relu"),
        (StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=False), "relu"),
    ],
    ids=["topk", "topk-rescaled", "topk-no-b_dec-in", "jumprelu", "standard", "standard-no-b_dec-in"],
)
def test_saelens_sae_loads_in_ours(activations, tmp_path, their_cfg, our_arch):
    their_cfg.metadata.hook_name = HOOK
    theirs = sae_lens.SAE.from_dict(their_cfg.to_dict())
    _random_weights_(theirs, seed=1, threshold=our_arch == "batchtopk")
    theirs.save_model(tmp_path / "sae")
    assert "sae_lens_version" in json.loads((tmp_path / "sae" / "cfg.json").read_text())["metadata"]

    ours = load_sae(tmp_path / "sae")
    assert ours.cfg.architecture == our_arch and ours.cfg.hook_name == HOOK and not ours.training
    if our_arch == "topk":
        assert ours.cfg.k == K
    x_BD = (activations[:512] - 2.0) / 2.0  # roughly unit-scale inputs for the unit-scale random weights
    assert_same_maths(ours, theirs, x_BD)
