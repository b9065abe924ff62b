"""Behaviour tests of the sparse autoencoder package (model, training, metrics, SAELens I/O)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from vitcircuits.sae.harvest import ShuffleBuffer
from vitcircuits.sae.io import load_sae, save_sae
from vitcircuits.sae.metrics import density_histogram, evaluate_sae
from vitcircuits.sae.model import SAE, SAEConfig
from vitcircuits.sae.train import TrainConfig, geometric_median, train_sae


def planted_dictionary(n=20000, d=32, m=64, active=3, noise=0.01, seed=0):
    """Rows that are sums of ``active`` random unit-norm atoms with positive magnitudes, plus noise."""
    g = torch.Generator().manual_seed(seed)
    atoms_MD = torch.randn(m, d, generator=g)
    atoms_MD /= atoms_MD.norm(dim=1, keepdim=True)
    idx_NA = torch.rand(n, m, generator=g).argsort(dim=1)[:, :active]
    mags_NA = 0.5 + 1.5 * torch.rand(n, active, generator=g)
    codes_NM = torch.zeros(n, m).scatter(1, idx_NA, mags_NA)
    return codes_NM @ atoms_MD + noise * torch.randn(n, d, generator=g), atoms_MD


@pytest.fixture(scope="module")
def planted():
    return planted_dictionary()


def max_cosines(atoms_MD, W_dec_FD):
    dec_FD = W_dec_FD / W_dec_FD.norm(dim=1, keepdim=True)
    return (atoms_MD @ dec_FD.T).max(dim=1).values


def quick(**kw):
    base = dict(lr=3e-3, warmup_steps=20, total_steps=150, batch_size=256, log_every=10)
    return TrainConfig(**{**base, **kw})


def test_topk_recovers_planted_dictionary(planted):
    x_ND, atoms_MD = planted
    sae, history = train_sae(x_ND, SAEConfig(d_in=32, d_sae=128, k=3, dead_steps_threshold=50), quick(total_steps=400), progress=False)
    cos_M = max_cosines(atoms_MD, sae.W_dec.detach())
    assert cos_M.mean() >= 0.9, f"mean max cosine {cos_M.mean():.3f}"
    assert history[-1]["explained_variance"] > 0.9
    assert history[-1]["l0"] == pytest.approx(3.0)


def test_batchtopk_and_relu_train(planted):
    x_ND, _ = planted
    cfg = SAEConfig(d_in=32, d_sae=128, architecture="batchtopk", k=3, dead_steps_threshold=50)
    sae, history = train_sae(x_ND, cfg, quick(), progress=False)
    assert history[-1]["mse"] < 0.5 * history[0]["mse"]
    assert history[-1]["l0"] == pytest.approx(3.0)  # k * B latents over the batch on average
    assert float(sae.threshold.min()) > 0 and int(sae.threshold_updates) == 150
    ev = evaluate_sae(sae, x_ND[:4096])  # eval mode: JumpReLU with the estimated threshold
    assert 1.0 < ev.l0 < 9.0 and ev.explained_variance > 0.7

    cfg = SAEConfig(d_in=32, d_sae=128, architecture="relu", l1_coefficient=1.0)
    sae, history = train_sae(x_ND, cfg, quick(total_steps=300, lr=1e-2), progress=False)
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    ev = evaluate_sae(sae, x_ND[:4096])
    assert ev.l0 < 128 / 8, ev
    assert ev.explained_variance > 0.8


def test_decoder_rows_unit_norm_after_training(planted):
    x_ND, _ = planted
    for arch in ("topk", "relu"):
        sae, _ = train_sae(x_ND, SAEConfig(d_in=32, d_sae=64, architecture=arch, k=4), quick(total_steps=30), progress=False)
        torch.testing.assert_close(sae.W_dec.detach().norm(dim=1), torch.ones(64), atol=1e-5, rtol=0)


def test_parallel_decoder_gradient_removed():
    sae = SAE(SAEConfig(d_in=8, d_sae=16, k=2))
    sae.W_dec.grad = torch.randn(16, 8)
    sae.remove_parallel_decoder_grad_()
    torch.testing.assert_close((sae.W_dec.grad * sae.W_dec.detach()).sum(1), torch.zeros(16), atol=1e-6, rtol=0)


def test_fold_normalization_keeps_outputs(planted):
    x_ND = planted[0] * 7.0 + 3.0  # raw scale far from sqrt(d_in)
    for arch in ("topk", "batchtopk", "relu"):
        sae, _ = train_sae(x_ND, SAEConfig(d_in=32, d_sae=64, architecture=arch, k=4), quick(total_steps=30), progress=False)
        assert abs(float(sae.norm_scale) - 1.0) > 0.1
        raw_BD = x_ND[:512]
        recon_before, feats_before = sae(raw_BD)
        sae.fold_normalization_()
        assert float(sae.norm_scale) == 1.0
        recon_after, feats_after = sae(raw_BD)
        torch.testing.assert_close(feats_after, feats_before, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(recon_after, recon_before, atol=1e-4, rtol=1e-4)


def test_norm_scale_gives_mean_norm_sqrt_d():
    x_ND = 5.0 * torch.randn(1000, 16)
    sae = SAE(SAEConfig(d_in=16, d_sae=32, k=2))
    s = sae.estimate_norm_scale_(x_ND)
    assert (x_ND * s).norm(dim=1).mean().item() == pytest.approx(4.0, rel=1e-5)


@pytest.mark.parametrize("arch,saelens", [("topk", "topk"), ("batchtopk", "jumprelu"), ("relu", "standard")])
def test_save_load_round_trip(planted, tmp_path, arch, saelens):
    x_ND = planted[0] * 3.0
    cfg = SAEConfig(d_in=32, d_sae=64, architecture=arch, k=4, hook_name="blocks.3.hook_resid_post", hook_layer=3)
    sae, _ = train_sae(x_ND, cfg, quick(total_steps=30), progress=False)
    folder = save_sae(sae, tmp_path / "sae")
    raw = json.loads((folder / "cfg.json").read_text())
    for key in ("architecture", "d_in", "d_sae", "dtype", "device", "hook_name", "hook_layer", "normalize_activations", "vitcircuits"):
        assert key in raw
    assert raw["architecture"] == saelens and raw["normalize_activations"] == "none"
    assert raw["hook_layer"] == 3 and raw["vitcircuits"]["config"]["architecture"] == arch
    assert ("k" in raw) == (arch == "topk")
    tensors = load_file(str(folder / "sae_weights.safetensors"))
    assert set(tensors) == {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"threshold"} if arch == "batchtopk" else set())
    assert list(tmp_path.joinpath("sae").iterdir()) and not list(folder.glob("*.tmp"))

    loaded = load_sae(folder)
    assert loaded.cfg == cfg
    xb = x_ND[:256]
    torch.testing.assert_close(loaded.encode(xb), sae.encode(xb), atol=1e-5, rtol=1e-5)
    feats = sae.encode(xb)
    torch.testing.assert_close(loaded.decode(feats), sae.decode(feats), atol=1e-5, rtol=1e-5)


def test_load_rejects_bad_folders(tmp_path):
    sae = SAE(SAEConfig(d_in=8, d_sae=16, k=2))
    folder = save_sae(sae, tmp_path / "sae")
    raw = json.loads((folder / "cfg.json").read_text())

    (folder / "cfg.json").write_text(json.dumps({**raw, "architecture": "gated"}))
    with pytest.raises(ValueError, match="unsupported SAE architecture 'gated'"):
        load_sae(folder)

    (folder / "cfg.json").write_text(json.dumps(raw))
    tensors = load_file(str(folder / "sae_weights.safetensors"))
    save_file({**tensors, "W_enc": torch.zeros(8, 15)}, str(folder / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match=r"W_enc has shape \(8, 15\), expected \(8, 16\)"):
        load_sae(folder)

    with pytest.raises(FileNotFoundError):
        load_sae(tmp_path / "missing")


def test_resume_reproduces_uninterrupted_run(planted, tmp_path):
    x_ND, _ = planted
    scfg = SAEConfig(d_in=32, d_sae=64, architecture="batchtopk", k=4, dead_steps_threshold=5)
    tcfg = quick(total_steps=40, warmup_steps=5, checkpoint_every=20, log_every=5)
    straight, hist_straight = train_sae(x_ND, scfg, tcfg, out_dir=tmp_path / "a", progress=False)

    train_sae(x_ND, scfg, tcfg, out_dir=tmp_path / "b", progress=False)
    ckpts = tmp_path / "b" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000020", "step_00000040"]
    for p in (ckpts / "step_00000040").iterdir():  # simulate an interruption right after step 20
        p.unlink()
    (ckpts / "step_00000040").rmdir()
    resumed, hist_resumed = train_sae(x_ND, scfg, tcfg, out_dir=tmp_path / "b", resume=True, progress=False)

    for name, tensor in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], tensor, atol=1e-6, rtol=0)
    assert hist_resumed == hist_straight

    with pytest.raises(ValueError, match="differs"):
        train_sae(x_ND, scfg, quick(total_steps=41, checkpoint_every=20), out_dir=tmp_path / "b", resume=True, progress=False)


def test_resume_with_iterable_source(planted, tmp_path):
    x_ND, _ = planted
    source = ShuffleBuffer(list(x_ND[:6000].split(500)), capacity_rows=2048, batch_size=128, seed=3)
    scfg = SAEConfig(d_in=32, d_sae=64, k=4)
    tcfg = quick(total_steps=30, batch_size=128, warmup_steps=5, checkpoint_every=15, init_sample_rows=512)
    straight, _ = train_sae(source, scfg, tcfg, out_dir=tmp_path / "a", progress=False)
    train_sae(source, scfg, tcfg, out_dir=tmp_path / "b", progress=False)
    last = tmp_path / "b" / "checkpoints" / "step_00000030"
    for p in last.iterdir():
        p.unlink()
    last.rmdir()
    resumed, _ = train_sae(source, scfg, tcfg, out_dir=tmp_path / "b", resume=True, progress=False)
    torch.testing.assert_close(resumed.W_dec, straight.W_dec, atol=1e-6, rtol=0)
    torch.testing.assert_close(resumed.b_dec, straight.b_dec, atol=1e-6, rtol=0)


def _reference_shuffle(source, capacity_rows: int, batch_size: int, seed: int):
    """The buffer's rule written plainly: concatenate, permute, emit, keep the rest."""
    gen = torch.Generator().manual_seed(seed)
    held, n_held = [], 0
    for batch in source:
        held.append(batch.reshape(-1, batch.shape[-1]))
        n_held += held[-1].shape[0]
        if n_held < capacity_rows:
            continue
        pool = torch.cat(held)[torch.randperm(n_held, generator=gen)]
        n_out = (n_held - capacity_rows // 2) // batch_size * batch_size
        yield from pool[:n_out].split(batch_size)
        held, n_held = [pool[n_out:]], n_held - n_out
    if n_held:
        yield from torch.cat(held)[torch.randperm(n_held, generator=gen)].split(batch_size)


def test_shuffle_buffer_emits_the_plain_rule_and_its_batches_stay_valid():
    x_ND = torch.randn(7000, 8, generator=torch.Generator().manual_seed(2))
    source = list(x_ND.split(700)) + [x_ND[:1500]]  # a larger last chunk makes the buffers grow
    got = list(ShuffleBuffer(source, capacity_rows=2000, batch_size=128, seed=5))
    want = list(_reference_shuffle(source, 2000, 128, 5))
    assert len(got) == len(want) and all(torch.equal(g, w) for g, w in zip(got, want))  # held batches were not overwritten


def test_shuffle_buffer_yields_each_row_once_with_bounded_memory():
    ids_N = torch.arange(5000, dtype=torch.float32)
    source = [chunk[:, None].expand(-1, 4) for chunk in ids_N.split(300)]
    buf = ShuffleBuffer(source, capacity_rows=1000, batch_size=64, seed=1)
    first = list(buf)
    assert all(b.shape[0] == 64 for b in first[:-1]) and 0 < first[-1].shape[0] <= 64
    seen_N = torch.cat(first)[:, 0]
    assert torch.equal(seen_N.sort().values, ids_N)
    assert not torch.equal(seen_N, ids_N)  # actually shuffled
    assert buf.peak_rows < 1000 + 300
    second = torch.cat(list(buf))[:, 0]
    assert torch.equal(second, seen_N)  # a pass is deterministic given the seed
    with pytest.raises(ValueError):
        ShuffleBuffer(source, capacity_rows=100, batch_size=64)


def test_auxk_loss_is_zero_without_dead_latents_and_positive_with_them(planted):
    x_ND, _ = planted
    # Generous threshold: nothing is dead during 30 steps, so the AuxK term stays exactly zero.
    _, history = train_sae(x_ND, SAEConfig(d_in=32, d_sae=128, k=3, dead_steps_threshold=1000), quick(total_steps=30), progress=False)
    assert all(h["aux"] == 0.0 and h["dead_fraction"] == 0.0 for h in history)
    # Threshold of one step: latents not fired in the previous batch are dead and AuxK is active.
    _, history = train_sae(x_ND, SAEConfig(d_in=32, d_sae=128, k=3, dead_steps_threshold=1), quick(total_steps=30), progress=False)
    assert any(h["dead_fraction"] > 0 for h in history)
    assert all(h["aux"] > 0 for h in history if h["dead_fraction"] > 0)


def test_auxk_pulls_dead_latents_towards_the_residual():
    sae = SAE(SAEConfig(d_in=8, d_sae=16, k=2, aux_k=8))
    pre_BF = torch.randn(4, 16)
    dead_F = torch.zeros(16, dtype=torch.bool)
    assert torch.count_nonzero(sae.auxk_reconstruction(pre_BF, dead_F)) == 0
    dead_F[:5] = True
    pre_BF[:, :5] = 1.0
    aux_BD = sae.auxk_reconstruction(pre_BF, dead_F)
    torch.testing.assert_close(aux_BD, sae.W_dec[:5].sum(0).detach().expand(4, 8))  # only dead latents, all 5 < aux_k
    assert SAEConfig(d_in=8, d_sae=16, k=2).resolved_aux_k == 4  # d_in // 2 by default


def test_schedule_and_geometric_median():
    tcfg = TrainConfig(lr=1.0, warmup_steps=10, total_steps=100)
    assert tcfg.lr_at(0) == pytest.approx(0.1) and tcfg.lr_at(9) == pytest.approx(1.0)
    assert tcfg.lr_at(79) == 1.0 and tcfg.lr_at(80) == pytest.approx(1.0) and tcfg.lr_at(99) == pytest.approx(0.05)
    assert TrainConfig(total_steps=None, n_tokens=1000, batch_size=300).steps == 4

    inliers_ND = torch.randn(200, 4) * 0.1
    outliers_ND = torch.full((40, 4), 100.0)
    median_D = geometric_median(torch.cat([inliers_ND, outliers_ND]), n_iter=30)
    assert median_D.norm() < 1.0 < torch.cat([inliers_ND, outliers_ND]).mean(0).norm()


def test_metrics():
    sae = SAE(SAEConfig(d_in=8, d_sae=8, architecture="relu", normalize_activations=False))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(8))
        sae.W_dec.copy_(torch.eye(8))
    x_ND = torch.rand(100, 8)
    x_ND[:, 7] = 0.0  # latent 7 never fires
    x_ND[:, 6] = (torch.arange(100) < 5).float()  # latent 6 fires on 5% of rows
    ev = evaluate_sae(sae, x_ND, batch_size=32)
    assert ev.explained_variance == pytest.approx(1.0) and ev.n_tokens == 100
    assert ev.dead_fraction == pytest.approx(1 / 8) and ev.dense_fraction == pytest.approx(6 / 8)
    assert ev.density_F[6] == pytest.approx(0.05)
    hist = density_histogram(ev.density_F, bins=8)
    assert hist.n_dead == 1 and hist.counts.sum() == 7


def test_one_shot_source_ends_training_early(planted, tmp_path):
    x_ND, _ = planted
    stream = (chunk for chunk in x_ND[:1000].split(100))  # 1000 rows = 7 batches of 128
    sae, history = train_sae(stream, SAEConfig(d_in=32, d_sae=64, k=4), quick(total_steps=50, batch_size=128, log_every=1, init_sample_rows=256),
                             out_dir=tmp_path, progress=False)
    assert history[-1]["step"] == 7
    assert (tmp_path / "checkpoints" / "step_00000007" / "state.json").is_file()
    assert load_sae(tmp_path / "sae").cfg.d_sae == 64


def test_old_checkpoints_are_pruned_and_gradients_clipped(planted, tmp_path):
    x_ND, _ = planted
    scfg = SAEConfig(d_in=32, d_sae=64, architecture="topk", k=4)
    train_sae(x_ND, scfg, quick(total_steps=40, checkpoint_every=10, keep_checkpoints=2), out_dir=tmp_path, progress=False)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000030", "step_00000040"]
    # A clip far below the gradient norm pushes the gradients under Adam's eps, so the first step barely moves the weights.
    one = dict(total_steps=1, warmup_steps=1, log_every=1)
    init = train_sae(x_ND, scfg, quick(lr=0.0, **one), progress=False)[0]
    clipped, hist_clipped = train_sae(x_ND, scfg, quick(max_grad_norm=1e-9, **one), progress=False)
    free, hist_free = train_sae(x_ND, scfg, quick(max_grad_norm=None, **one), progress=False)
    assert hist_clipped[0]["loss"] == hist_free[0]["loss"]  # same batch, same initialisation
    moved_clipped, moved_free = (clipped.W_enc - init.W_enc).abs().max(), (free.W_enc - init.W_enc).abs().max()
    assert moved_clipped < 0.2 * moved_free
