"""The sparse TopK / BatchTopK training step has the losses and gradients of the dense one."""

import pytest
import torch

from vitcircuits.sae.model import SAE, SAEConfig
from vitcircuits.sae.train import _dense_step, _sparse_step


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("with_dead", [False, True])
def test_sparse_step_matches_dense_step(arch, with_dead):
    cfg = SAEConfig(d_in=16, d_sae=64, architecture=arch, k=4, aux_k=6, dtype="float64")
    sae = SAE(cfg, generator=torch.Generator().manual_seed(1)).train()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(64, generator=g, dtype=torch.float64))
        sae.b_dec.copy_(0.1 * torch.randn(16, generator=g, dtype=torch.float64))
    assert sae.supports_sparse_training
    xn_BD = torch.randn(37, 16, generator=g, dtype=torch.float64)
    dead_F = torch.rand(64, generator=g) < 0.5 if with_dead else torch.zeros(64, dtype=torch.bool)
    results = []
    for step in (_dense_step, _sparse_step):
        sae.zero_grad(set_to_none=True)
        loss, mse, aux, _, recon_BD, feats, fired_F = step(sae, xn_BD, dead_F)
        loss.backward()
        results.append((loss.detach(), aux.detach(), recon_BD.detach(), fired_F, float((feats > 0).sum()),
                        {name: p.grad.clone() for name, p in sae.named_parameters()}))
    (loss_d, aux_d, recon_d, fired_d, n_d, grads_d), (loss_s, aux_s, recon_s, fired_s, n_s, grads_s) = results
    assert (float(aux_d) > 0) == with_dead
    torch.testing.assert_close(loss_s, loss_d, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(aux_s, aux_d, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(recon_s, recon_d, atol=1e-10, rtol=1e-10)
    assert torch.equal(fired_s, fired_d) and n_s == n_d
    for name, grad in grads_d.items():
        torch.testing.assert_close(grads_s[name], grad, atol=1e-10, rtol=1e-10, msg=name)
