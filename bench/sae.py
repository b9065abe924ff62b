"""Our SAE trainer vs SAELens's, on the same cached ViT activations, measured in one run (CPU).

    python bench/sae.py [--model ../shared/models/dinov2-small-imgfocus] [--image-dir ../shared/data/imagenet-samples]
                        [--images 128] [--hook blocks.6.hook_resid_post] [--steps 50] [--batch-size 4096]
                        [--k 32] [--expansion 8] [--lr 4e-4] [--warmup-steps STEPS/10] [--holdout 0.125]
                        [--acts-cache FILE.pt] [--random-acts ROWS]

Activations: the patch tokens (prefix tokens dropped) of ``--hook`` on the first ``--images`` images,
``[rows, d_in]`` float32. The last ``--holdout`` of the *images* is held out for evaluation; both
trainers see the same training rows. ``--acts-cache`` stores / reuses the cached tensor;
``--random-acts ROWS`` replaces it with seeded Gaussian rows (no model, for a quick check).

Both trainers train a TopK SAE (``d_sae = expansion * d_in``, ``k``) for ``--steps`` Adam steps on
``--batch-size`` rows, with the same learning rate, warm-up and linear decay over the last 20% of the
steps, the same data order, the same initial weights, the same decoder-bias initialisation and the
same input normalisation (a scalar making the mean norm ``sqrt(d_in)``).

How SAELens is driven: with its own :class:`sae_lens.training.sae_trainer.SAETrainer` (``fit()``),
whose data provider is simply an iterator of activation batches, so no activation store, model,
dataset or wandb is involved (``log_to_wandb=False``, ``WANDB_MODE=disabled``, ``HF_HUB_OFFLINE=1``).
The training SAE is ``TopKTrainingSAE`` (``TopKTrainingSAEConfig``) with

* the data provider: the very batches of our trainer, from its own batching function
  (``vitcircuits.sae.train._tensor_stream``, fresh seeded permutation per epoch);
* normalisation ``"expected_average_only_in"``: SAELens's ``ActivationScaler`` estimates the scale on
  the same 4096-row sample our trainer uses, before ``fit()`` (so ``fit`` does not consume batches
  for it) and folds it into the weights at the end, as ours does on save;
* initial ``W_enc``/``W_dec`` copied from our seeded initialisation (unit-norm decoder rows, encoder
  = decoder transpose, zero encoder bias) and ``b_dec`` set to the same geometric median of the
  normalised sample (SAELens 6 itself starts ``b_dec`` at zero);
* ``lr_scheduler_name="constant"`` with ``lr_warm_up_steps`` and ``lr_decay_steps`` (``lr_end = lr``),
  which gives step for step the same learning rates as ours (checked: identical to 1e-19);
* AuxK weight ``aux_loss_coefficient = 1/32`` (ours) and the dead window matched (SAELens: dead when
  more than ``dead_feature_window`` steps without firing; ours: at least ``dead_steps_threshold``).

Differences that its API does not let us remove: SAETrainer always clips the gradient norm to 1; it
keeps unit-norm decoder rows implicitly (``rescale_acts_by_decoder_norm=True``: latents are scaled
by the decoder row norms) where ours renormalises the rows and removes the parallel gradient; its
AuxK loss is scaled by ``min(n_dead / k_aux, 1)``. It also keeps per-latent firing counts every
step, as ours does. Its ``use_sparse_activations=True`` is not used: with the decoder-norm rescaling
its backward pass fails on the CPU (torch 2.14: no SparseCPU kernel for ``aten::view``), and without
the rescaling it was no faster than dense (2.06 vs 2.14 s per 4096-row step on 2 busy cores).
The gradient clipping matters for quality in short runs: in a 300-step ablation (batch 1024) it was
worth about 2 points of explained variance to SAELens, and adding it to ours gave about as much.

Timing: wall clock of the training steps only (ours: ``train_sae`` minus the same call with zero
steps, i.e. its set-up; SAELens: ``SAETrainer.fit()`` after the SAE, the trainer and the scale were
built), torch threads as set by the environment. Evaluation on the held-out rows: L0, explained
variance ``1 - SSE/SST`` (SST around the held-out mean) and the fraction of latents that never fire,
computed by the same function on each SAE's ``encode``/``decode``; ours is also evaluated with
:func:`vitcircuits.sae.metrics.evaluate_sae` (which must agree). Goals: throughput ratio ours / SAELens
at least 1.5; explained variance within 1 point at equal L0.
"""
from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from vitcircuits.sae.metrics import evaluate_sae  # noqa: E402
from vitcircuits.sae.model import SAE, SAEConfig  # noqa: E402
from vitcircuits.sae.train import TrainConfig, _init_sample, _tensor_stream, geometric_median, train_sae  # noqa: E402


def cache_activations(model_path: str, image_dir: str, n_images: int, hook: str) -> tuple[torch.Tensor, int]:
    """Patch-token activations ``[n_images * n_patches, d]`` of ``hook`` and the patch count per image."""
    from vitcircuits.inputs import ImageOptions
    from vitcircuits.models.loading import load_model

    loaded = load_model(model_path, img_size=224, device="cpu")
    model = loaded.model.eval()
    start = model.layout.patch_start
    chunks = []
    with torch.inference_mode():
        for batch in ImageOptions(images=image_dir, batch_size=32, max_images=n_images).open(loaded).batches(progress=False):
            _, cache = model.run_with_cache(batch.images_BCHW, names_filter=[hook])
            chunks.append(cache[hook][:, start:].float())
    acts_BTD = torch.cat(chunks)
    return acts_BTD.reshape(-1, acts_BTD.shape[-1]).contiguous(), acts_BTD.shape[1]


@torch.no_grad()
def l0_ev(encode, decode, x_ND: torch.Tensor, batch_size: int = 4096) -> dict:
    """L0, explained variance ``1 - SSE/SST`` and never-firing fraction of ``decode(encode(x))`` on ``x_ND``."""
    n, active, sse = 0, 0.0, 0.0
    sum_D = torch.zeros(x_ND.shape[1], dtype=torch.float64)
    sq, fired_F = 0.0, None
    for x_BD in x_ND.split(batch_size):
        feats_BF = encode(x_BD)
        recon_BD = decode(feats_BF)
        nz_BF = feats_BF != 0
        fired_F = nz_BF.any(0) if fired_F is None else fired_F | nz_BF.any(0)
        active += float(nz_BF.sum())
        xd = x_BD.double()
        sse += float((xd - recon_BD.double()).pow(2).sum())
        sum_D += xd.sum(0)
        sq += float(xd.pow(2).sum())
        n += x_BD.shape[0]
    sst = sq - float(sum_D.pow(2).sum()) / n
    return {"l0": active / n, "explained_variance": 1.0 - sse / sst, "dead_fraction": float((~fired_F).double().mean())}


def time_ours(train_ND: torch.Tensor, scfg: SAEConfig, tcfg: TrainConfig) -> tuple[SAE, float]:
    """Train with ``train_sae``; seconds of the training steps (the whole call minus its set-up)."""
    start = time.perf_counter()
    train_sae(train_ND, scfg, TrainConfig(**{**tcfg.__dict__, "total_steps": 0}), progress=False)
    setup_s = time.perf_counter() - start
    start = time.perf_counter()
    sae, _ = train_sae(train_ND, scfg, tcfg, progress=False)
    return sae, time.perf_counter() - start - setup_s


def time_saelens(train_ND: torch.Tensor, scfg: SAEConfig, tcfg: TrainConfig):
    """Train SAELens's ``TopKTrainingSAE`` with its ``SAETrainer`` on our batches; returns ``(sae, seconds of fit())``."""
    from sae_lens import LoggingConfig, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    steps, batch = tcfg.steps, tcfg.batch_size
    cfg = TopKTrainingSAEConfig(
        d_in=scfg.d_in, d_sae=scfg.d_sae, k=scfg.k, dtype=scfg.dtype, device="cpu",
        normalize_activations="expected_average_only_in" if scfg.normalize_activations else "none",
        aux_loss_coefficient=scfg.aux_coefficient, rescale_acts_by_decoder_norm=True, use_sparse_activations=False,
    )
    sae = TopKTrainingSAE(cfg)
    init = SAE(scfg, generator=torch.Generator().manual_seed(tcfg.seed))  # our initial weights, same seed
    decay_steps = steps - int(steps * (1.0 - tcfg.decay_fraction))
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * batch, train_batch_size_samples=batch,
        lr=tcfg.lr, lr_end=tcfg.lr, lr_scheduler_name="constant", lr_warm_up_steps=tcfg.warmup_steps, lr_decay_steps=decay_steps,
        adam_beta1=tcfg.adam_betas[0], adam_beta2=tcfg.adam_betas[1], device="cpu", autocast=False,
        dead_feature_window=scfg.dead_steps_threshold - 1, feature_sampling_window=max(steps, 1),
        n_checkpoints=0, checkpoint_path=None, save_final_checkpoint=False, logger=LoggingConfig(log_to_wandb=False),
    )
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=_tensor_stream(train_ND, batch, tcfg.seed, 0))
    sample_ND, _ = _init_sample(train_ND, iter(()), tcfg)
    if scfg.normalize_activations:
        trainer.activation_scaler.estimate_scaling_factor(scfg.d_in, iter([sample_ND]), n_batches_for_norm_estimate=1)
    scale = trainer.activation_scaler.scaling_factor or 1.0
    xn_ND = sample_ND * scale
    b_dec_D = xn_ND.mean(0) if tcfg.b_dec_init == "mean" else geometric_median(xn_ND, tcfg.geometric_median_iters)
    with torch.no_grad():
        sae.W_enc.copy_(init.W_enc)
        sae.W_dec.copy_(init.W_dec)
        sae.b_enc.zero_()
        sae.b_dec.copy_(b_dec_D)
    start = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - start
    return trainer.sae.eval(), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="../shared/models/dinov2-small-imgfocus")
    parser.add_argument("--image-dir", default="../shared/data/imagenet-samples")
    parser.add_argument("--images", type=int, default=128, help="images to cache (256 patch tokens each at 224 px)")
    parser.add_argument("--hook", default="blocks.6.hook_resid_post")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--warmup-steps", type=int, default=None, help="default: steps // 10")
    parser.add_argument("--holdout", type=float, default=0.125, help="fraction of the images held out for evaluation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--acts-cache", default=None, help="load the activations from this .pt file, or write them there")
    parser.add_argument("--random-acts", type=int, default=0, help="use this many seeded Gaussian rows instead of a model")
    args = parser.parse_args()

    start = time.perf_counter()
    if args.random_acts:
        g = torch.Generator().manual_seed(args.seed)
        acts_ND, per_image = torch.randn(args.random_acts, 384, generator=g) * 3.0 + 1.0, 1
    elif args.acts_cache and Path(args.acts_cache).is_file():
        saved = torch.load(args.acts_cache, weights_only=True)
        acts_ND, per_image = saved["acts"], int(saved["per_image"])
    else:
        acts_ND, per_image = cache_activations(args.model, args.image_dir, args.images, args.hook)
        if args.acts_cache:
            torch.save({"acts": acts_ND, "per_image": per_image}, args.acts_cache)
    cache_s = time.perf_counter() - start
    n_images = acts_ND.shape[0] // per_image
    n_test = max(1, round(n_images * args.holdout)) * per_image
    train_ND, test_ND = acts_ND[:-n_test].contiguous(), acts_ND[-n_test:].contiguous()

    d_in = acts_ND.shape[1]
    scfg = SAEConfig(d_in=d_in, d_sae=args.expansion * d_in, architecture="topk", k=args.k, hook_name=args.hook)
    warmup = args.warmup_steps if args.warmup_steps is not None else args.steps // 10
    tcfg = TrainConfig(lr=args.lr, warmup_steps=warmup, total_steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                       init_sample_rows=min(4096, train_ND.shape[0]), log_every=max(args.steps, 1))

    ours, ours_s = time_ours(train_ND, scfg, tcfg)
    theirs, theirs_s = time_saelens(train_ND, scfg, tcfg)

    rows = args.steps * args.batch_size
    ours_eval, theirs_eval = l0_ev(ours.encode, ours.decode, test_ND), l0_ev(theirs.encode, theirs.decode, test_ND)
    ev_ours = evaluate_sae(ours, test_ND)
    print(json.dumps({
        "activations": "random" if args.random_acts else {"model": args.model, "hook": args.hook, "images": n_images},
        "train_rows": train_ND.shape[0], "test_rows": test_ND.shape[0], "d_in": d_in, "d_sae": scfg.d_sae, "k": args.k,
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "warmup_steps": warmup,
        "threads": torch.get_num_threads(), "cache_s": round(cache_s, 1),
        "ours_train_s": round(ours_s, 2), "saelens_train_s": round(theirs_s, 2),
        "ours_acts_per_s": round(rows / ours_s), "saelens_acts_per_s": round(rows / theirs_s),
        "throughput_ratio_ours_over_saelens": round(theirs_s / ours_s, 3),
        "ours": {k: round(v, 4) for k, v in ours_eval.items()},
        "saelens": {k: round(v, 4) for k, v in theirs_eval.items()},
        "ours_evaluate_sae": {"l0": round(ev_ours.l0, 4), "explained_variance": round(ev_ours.explained_variance, 4)},
        "explained_variance_diff_points": round(100 * (ours_eval["explained_variance"] - theirs_eval["explained_variance"]), 2),
    }, indent=2))


if __name__ == "__main__":
    main()
