"""Downstream fidelity of an SAE: splice its reconstruction into the model and measure what changes.

At the SAE's hook, the activations of the spliced tokens (patch tokens by default, as SAEs are
trained; every token with ``include_prefix``) are replaced in one forward pass by the SAE
reconstruction and in another by the dataset mean of that activation (mean ablation, the baseline
of an SAE that reconstructs nothing). Both outputs are compared with the clean output:

* classifiers (logits): ``kl`` = mean over images of ``KL(softmax(clean) || softmax(variant))`` in
  nats, ``top1_agreement`` = fraction of images whose argmax is unchanged, and with labels the
  variant's ``accuracy`` and ``delta_accuracy`` (variant minus clean). ``loss_recovered`` =
  ``1 - kl_sae / kl_mean_ablation``: 1 for a perfect SAE, 0 for one no better than the mean.
* backbones (no head): ``cosine`` and ``relative_error`` = ``||e' - e|| / ||e||`` of the final
  embedding (all final tokens flattened when the model does not pool), averaged over images.
  ``cosine_recovered`` = ``(cos_sae - cos_mean) / (1 - cos_mean)``.

Shape suffixes: ``B`` images, ``N`` tokens, ``T`` spliced tokens, ``R`` rows (``B * T``), ``W`` hook
width (trailing dims flattened, e.g. ``hook_z`` ``[B, N, H, Dh]`` has ``W = H * Dh``), ``O`` output
width (classes or embedding dims).
"""

from __future__ import annotations

from collections.abc import Iterable, Sized
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from vitcircuits.models.hooked_vit import HookedViT
from vitcircuits.models.hooks import check_hooks
from vitcircuits.sae.model import SAE

Batch = torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]
"""Images ``[B, 3, H, W]``, or ``(images, labels)`` with labels ``[B]`` (-1 where unknown) or ``None``."""


@dataclass(frozen=True)
class FidelityConfig:
    """Which tokens the SAE reconstruction replaces."""

    include_prefix: bool = False
    """Also splice CLS/distillation/register tokens (only if the SAE was trained on them, i.e. its
    activations were cached with ``include_prefix=True``); otherwise only patch tokens are replaced
    and the prefix tokens keep their clean activations."""


def _images_labels(item: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(item, torch.Tensor):
        return item, None
    images_BCHW, labels_B = item
    return images_BCHW, labels_B


def _spliced_rows(act_BN_: torch.Tensor, start: int) -> torch.Tensor:
    """The spliced tokens ``[start:]`` of a hook activation, flattened to ``[R, W]``."""
    spliced = act_BN_[:, start:]
    return spliced.reshape(spliced.shape[0] * spliced.shape[1], -1)


def _replace_rows(act_BN_: torch.Tensor, start: int, new_ND: torch.Tensor) -> torch.Tensor:
    """A copy of ``act_BN_`` whose tokens ``[start:]`` are ``new_ND`` (in the activation's dtype and device)."""
    out = act_BN_.clone()
    out[:, start:] = new_ND.reshape(out[:, start:].shape).to(out)
    return out


def _progress(enabled: bool) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), disable=not enabled)


def _mean_activation(model: HookedViT, sae: SAE, hook_name: str, batches: Iterable[Batch], start: int, bar: Progress, total: int | None) -> torch.Tensor:
    """Pass 1: dataset mean ``[W]`` (float64) of the hook activation over the spliced tokens."""
    task = bar.add_task("fidelity: mean", total=total)
    sum_D, n_rows = None, 0
    for item in batches:
        images_BCHW, _ = _images_labels(item)
        _, cache = model.run_with_cache(images_BCHW, names_filter=hook_name)
        x_ND = _spliced_rows(cache[hook_name], start).double()
        if x_ND.shape[1] != sae.cfg.d_in:
            trained_on = f" (trained on {sae.cfg.hook_name!r})" if sae.cfg.hook_name else ""
            raise ValueError(f"hook {hook_name!r} has width {x_ND.shape[1]} but the SAE{trained_on} has d_in={sae.cfg.d_in}")
        sum_D = x_ND.sum(0) if sum_D is None else sum_D + x_ND.sum(0)
        n_rows += x_ND.shape[0]
        bar.advance(task)
    if sum_D is None:
        raise ValueError("downstream_fidelity needs at least one batch of images; `batches` is empty")
    return sum_D / n_rows


def _compare(clean_BO: torch.Tensor, variant_BO: torch.Tensor, logits: bool) -> dict[str, torch.Tensor]:
    """Per-image agreement ``[B]`` of a variant output with the clean one."""
    clean, variant = clean_BO.double().flatten(1), variant_BO.double().flatten(1)
    if logits:
        logp_clean, logp_variant = clean.log_softmax(-1), variant.log_softmax(-1)
        kl_B = (logp_clean.exp() * (logp_clean - logp_variant)).sum(-1)
        return {"kl": kl_B, "top1_agreement": (clean.argmax(-1) == variant.argmax(-1)).double()}
    return {
        "cosine": F.cosine_similarity(variant, clean, dim=-1),
        "relative_error": (variant - clean).norm(dim=-1) / clean.norm(dim=-1).clamp_min(1e-30),
    }


def _n_correct(logits_BO: torch.Tensor, labels_B: torch.Tensor) -> int:
    """Images whose argmax equals their label, among those with a known label (>= 0)."""
    labels_B = labels_B.to(logits_BO.device)
    known_B = labels_B >= 0
    return int((logits_BO.argmax(-1)[known_B] == labels_B[known_B]).sum())


def _ratio(numerator: float, denominator: float) -> float | None:
    return None if denominator == 0 else numerator / denominator


@torch.no_grad()
def downstream_fidelity(
    model: HookedViT,
    sae: SAE,
    hook_name: str,
    batches: Iterable[Batch],
    config: FidelityConfig = FidelityConfig(),
    progress: bool = False,
) -> dict:
    """Splice ``sae`` into ``model`` at ``hook_name`` and measure the downstream effect (module docstring).

    ``batches`` is iterated twice (first for the mean-ablation baseline, then for the comparison), so it
    must be re-iterable (a list or a DataLoader, not a generator). Items are image tensors or
    ``(images, labels)`` pairs; labels (-1 where unknown) are only used for classifiers.

    Returns a JSON-serialisable dict: ``hook``, ``n_images``, ``spliced_tokens`` (``"patches"`` or
    ``"all"``), ``output_kind`` (``"logits"`` or ``"embedding"``), ``explained_variance`` and
    ``relative_mse`` (``sum ||x - x_hat||^2 / sum ||x||^2``) of the reconstruction over the spliced
    tokens, one dict of metrics for each of ``"sae"`` and ``"mean_ablation"``, then ``loss_recovered``
    (and ``clean_accuracy`` when any label is known) for classifiers or ``cosine_recovered`` for backbones;
    the recovered fractions are ``None`` when mean ablation changes nothing.

    Raises:
        ValueError: unknown or non-per-token hook, hook width different from ``sae.cfg.d_in``, no
            batches, or a one-shot iterator as ``batches``.
    """
    check_hooks(model, (hook_name,))
    if iter(batches) is batches:
        raise ValueError("batches must be re-iterable (e.g. a list or a DataLoader): it is read twice")
    start = 0 if config.include_prefix else model.layout.patch_start
    logits = model.cfg.n_classes > 0 and model.cfg.pooling != "none"
    total = len(batches) if isinstance(batches, Sized) else None
    was_training = sae.training
    sae.eval()
    try:
        with _progress(progress) as bar:
            mean_D = _mean_activation(model, sae, hook_name, batches, start, bar, total)
            recon = {"sq_err": 0.0, "sq_dev": 0.0, "sq_x": 0.0}

            def splice_sae(act: torch.Tensor, hook) -> torch.Tensor:
                x_ND = _spliced_rows(act, start)
                recon_ND, _ = sae(x_ND.to(sae.W_enc))
                x, r = x_ND.double(), recon_ND.double().to(x_ND.device)
                recon["sq_err"] += float((x - r).pow(2).sum())
                recon["sq_dev"] += float((x - mean_D.to(x.device)).pow(2).sum())
                recon["sq_x"] += float(x.pow(2).sum())
                return _replace_rows(act, start, recon_ND)

            def splice_mean(act: torch.Tensor, hook) -> torch.Tensor:
                return _replace_rows(act, start, mean_D.expand(act.shape[0] * (act.shape[1] - start), -1))

            variants = {"sae": splice_sae, "mean_ablation": splice_mean}
            sums = {name: {} for name in variants}
            correct = {"clean": 0, **{name: 0 for name in variants}}
            n_images, n_labeled = 0, 0
            task = bar.add_task("fidelity: splice", total=total)
            for item in batches:
                images_BCHW, labels_B = _images_labels(item)
                clean_BO = model(images_BCHW)
                use_labels = logits and labels_B is not None
                if use_labels:
                    n_labeled += int((labels_B >= 0).sum())
                    correct["clean"] += _n_correct(clean_BO, labels_B)
                for name, splice in variants.items():
                    with model.hooks([(hook_name, splice)]):
                        variant_BO = model(images_BCHW)
                    for metric, value_B in _compare(clean_BO, variant_BO, logits).items():
                        sums[name][metric] = sums[name].get(metric, 0.0) + float(value_B.sum())
                    if use_labels:
                        correct[name] += _n_correct(variant_BO, labels_B)
                n_images += images_BCHW.shape[0]
                bar.advance(task)
    finally:
        sae.train(was_training)

    result = {
        "hook": hook_name,
        "n_images": n_images,
        "spliced_tokens": "all" if config.include_prefix else "patches",
        "output_kind": "logits" if logits else "embedding",
        "explained_variance": 1.0 - recon["sq_err"] / max(recon["sq_dev"], 1e-30),
        "relative_mse": recon["sq_err"] / max(recon["sq_x"], 1e-30),
    }
    for name, metric_sums in sums.items():
        result[name] = {metric: value / n_images for metric, value in metric_sums.items()}
        if n_labeled:
            result[name]["accuracy"] = correct[name] / n_labeled
            result[name]["delta_accuracy"] = (correct[name] - correct["clean"]) / n_labeled
    sae_metrics, mean_metrics = result["sae"], result["mean_ablation"]
    if logits:
        if n_labeled:
            result["clean_accuracy"] = correct["clean"] / n_labeled
        kl_fraction = _ratio(sae_metrics["kl"], mean_metrics["kl"])
        result["loss_recovered"] = None if kl_fraction is None else 1.0 - kl_fraction
    else:
        result["cosine_recovered"] = _ratio(sae_metrics["cosine"] - mean_metrics["cosine"], 1.0 - mean_metrics["cosine"])
    return result
