"""Reproducible training of the bundled CIFAR-10 ViT model organism.

The organism is a timm ``vit_tiny_patch16_224`` re-shaped for 32x32 inputs
(4x4 patches: an 8x8 grid plus a CLS token, 65 tokens) and trained from
scratch on CPU. The result is written in timm hub layout (``config.json`` +
``model.safetensors``) so that::

    timm.create_model("local-dir:<out_dir>", pretrained=True)

rebuilds it, and ``timm.data.create_transform(**resolve_data_config(...))``
reproduces the evaluation preprocessing used here (ToTensor + Normalize; the
resize/centre-crop to 32 px is the identity on 32x32 images).

Run from the repository root::

    vitcircuits train-organism cifar10 --zip ../shared/data/cifar10-jpeg.zip \
        --out src/vitcircuits/assets/organisms/cifar10-vit --seed 0

The zip holds ``{train,test}/<class>/NNNN.jpg`` (32x32 JPEG). It is read
directly and decoded once into a uint8 tensor in memory.
"""
from __future__ import annotations

import dataclasses
import io
import math
import os
import platform
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from safetensors.torch import save_file
from timm.optim import create_optimizer_v2

from vitcircuits.files import write_bytes, write_json, write_text, write_with
from vitcircuits.organisms.series import SeriesRecorder, group_metrics

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
TIMM_ARCHITECTURE = "vit_tiny_patch16_224"
IMAGE_SIZE = 32

_ASSETS = Path(__file__).resolve().parents[1] / "assets"
BUNDLED_MODEL_DIR = _ASSETS / "organisms" / "cifar10-vit"
BUNDLED_IMAGES_DIR = _ASSETS / "images" / "cifar10"


@dataclass(frozen=True)
class CifarOrganismConfig:
    """Everything that determines a training run (given the same data and thread count)."""

    seed: int = 0
    """Seeds model init (torch.manual_seed) and the generator for shuffling/augmentation."""
    epochs: int = 8
    """Passes over the training set."""
    batch_size: int = 128
    """Training batch size; the last incomplete batch of each epoch is dropped."""
    lr: float = 2e-3
    """Peak AdamW learning rate, reached after warm-up, then cosine-decayed to 0."""
    weight_decay: float = 0.05
    """AdamW decoupled weight decay (not applied to biases, norms, pos_embed, cls_token)."""
    warmup_epochs: float = 0.5
    """Linear warm-up length from 0 to `lr`, in (fractional) epochs."""
    label_smoothing: float = 0.0
    """Label smoothing of the training cross-entropy (evaluation always uses hard labels)."""
    grad_clip_norm: float = 1.0
    """Global gradient-norm clip; 0 disables clipping."""
    embed_dim: int = 128
    """Residual stream width."""
    depth: int = 4
    """Number of transformer blocks."""
    num_heads: int = 4
    """Attention heads per block (head dim = embed_dim / num_heads)."""
    mlp_ratio: float = 2.0
    """MLP hidden width as a multiple of embed_dim."""
    patch_size: int = 4
    """Patch side in pixels; 4 gives an 8x8 grid (64 patches + CLS = 65 tokens)."""
    crop_padding: int = 4
    """Random-crop augmentation: zero-pad by this many pixels, crop back to 32; 0 disables."""
    horizontal_flip: bool = True
    """Random horizontal flip augmentation with probability 0.5."""
    threads: int = 2
    """torch intra-op CPU threads (results are bit-reproducible for a fixed value)."""
    max_train_images: int | None = None
    """Use only this many training images (class round-robin subset); None = all 50k."""
    max_test_images: int | None = None
    """Evaluate on only this many test images (class round-robin subset); None = all 10k."""
    max_steps: int | None = None
    """Stop after this many optimiser steps (the LR schedule is shortened to match)."""
    eval_batch_size: int = 500
    """Batch size for evaluation (does not affect results)."""
    checkpoints: int = 0
    """Checkpoints saved through training, log-uniformly spaced in steps, with the test loss and
    accuracy (:mod:`vitcircuits.organisms.series`); 0: none. They do not change the trained
    weights."""

    def model_args(self) -> dict:
        """Keyword overrides for `timm.create_model(TIMM_ARCHITECTURE, ...)`."""
        return {
            "img_size": IMAGE_SIZE,
            "patch_size": self.patch_size,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio,
            "qkv_bias": True,
            "class_token": True,
            "global_pool": "token",
            "num_classes": len(CIFAR10_CLASSES),
        }


def timm_hub_config(cfg: CifarOrganismConfig) -> dict:
    """The ``config.json`` contents that let timm's ``local-dir:`` loader rebuild the model."""
    return {
        "architecture": TIMM_ARCHITECTURE,
        "num_classes": len(CIFAR10_CLASSES),
        "model_args": cfg.model_args(),
        "pretrained_cfg": {
            "input_size": [3, IMAGE_SIZE, IMAGE_SIZE],
            "fixed_input_size": True,
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": list(CIFAR10_MEAN),
            "std": list(CIFAR10_STD),
            "num_classes": len(CIFAR10_CLASSES),
            "label_names": list(CIFAR10_CLASSES),
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }


def _split_members(archive: zipfile.ZipFile, split: str) -> dict[str, list[str]]:
    """Sorted ``<split>/<class>/*.jpg`` member names, per class."""
    members = sorted(n for n in archive.namelist() if n.startswith(f"{split}/") and n.endswith(".jpg"))
    return {c: [n for n in members if n.split("/")[1] == c] for c in CIFAR10_CLASSES}


def load_cifar10_split(
    zip_path: str | os.PathLike, split: str, max_images: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a split into ``(images_ICHW uint8, labels_I int64)``.

    Images are taken in class round-robin order (class 0 image 0, class 1
    image 0, ...), so any `max_images` prefix is class-balanced. JPEGs are
    decoded with PIL, exactly as a PIL-based timm transform would see them.
    """
    with zipfile.ZipFile(zip_path) as archive:
        per_class = _split_members(archive, split)
        order = [
            (label, per_class[name][i])
            for i in range(max(len(m) for m in per_class.values()))
            for label, name in enumerate(CIFAR10_CLASSES)
            if i < len(per_class[name])
        ][:max_images]
        images_IHWC = np.stack(
            [np.asarray(Image.open(io.BytesIO(archive.read(member))).convert("RGB")) for _, member in order]
        )
    labels_I = torch.tensor([label for label, _ in order], dtype=torch.int64)
    return torch.from_numpy(images_IHWC).permute(0, 3, 1, 2).contiguous(), labels_I


def normalize_images(images_ICHW: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 model input; same ops as ToTensor + Normalize(CIFAR mean/std)."""
    mean_C11 = torch.tensor(CIFAR10_MEAN, dtype=torch.float32).view(-1, 1, 1)
    std_C11 = torch.tensor(CIFAR10_STD, dtype=torch.float32).view(-1, 1, 1)
    return (images_ICHW.to(torch.float32).div(255) - mean_C11) / std_C11


def augment_images(images_BCHW: torch.Tensor, cfg: CifarOrganismConfig, generator: torch.Generator) -> torch.Tensor:
    """Random zero-padded crop and horizontal flip of a uint8 batch."""
    batch, _, height, width = images_BCHW.shape
    pad = cfg.crop_padding
    if pad > 0:
        padded_BCHW = F.pad(images_BCHW, (pad, pad, pad, pad))
        offset_y_B = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
        offset_x_B = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
        rows_BH = offset_y_B[:, None] + torch.arange(height)
        cols_BW = offset_x_B[:, None] + torch.arange(width)
        images_BCHW = padded_BCHW[
            torch.arange(batch)[:, None, None, None],
            torch.arange(images_BCHW.shape[1])[None, :, None, None],
            rows_BH[:, None, :, None],
            cols_BW[:, None, None, :],
        ]
    if cfg.horizontal_flip:
        flip_B = torch.rand(batch, generator=generator) < 0.5
        images_BCHW = torch.where(flip_B[:, None, None, None], images_BCHW.flip(3), images_BCHW)
    return images_BCHW


def build_model(cfg: CifarOrganismConfig) -> torch.nn.Module:
    """A freshly initialised organism (seed it with torch.manual_seed first)."""
    return timm.create_model(TIMM_ARCHITECTURE, pretrained=False, **cfg.model_args())


@torch.inference_mode()
def evaluate_accuracy(model: torch.nn.Module, images_ICHW: torch.Tensor, labels_I: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy of `model` on uint8 images, with the eval preprocessing."""
    model.eval()
    correct = 0
    for start in range(0, len(labels_I), batch_size):
        logits_BC = model(normalize_images(images_ICHW[start : start + batch_size]))
        correct += int((logits_BC.argmax(-1) == labels_I[start : start + batch_size]).sum())
    return correct / len(labels_I)


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def reproduce_command(cfg: CifarOrganismConfig, zip_path: str | os.PathLike, out_dir: str | os.PathLike) -> str:
    """Shell command (run from the current directory) that reproduces this run."""
    defaults = CifarOrganismConfig()
    flags = [
        f"--{f.name.replace('_', '-')} {getattr(cfg, f.name)}"
        if not isinstance(getattr(cfg, f.name), bool)
        else f"--{'' if getattr(cfg, f.name) else 'no-'}{f.name.replace('_', '-')}"
        for f in dataclasses.fields(cfg)
        if f.name == "seed" or getattr(cfg, f.name) != getattr(defaults, f.name)
    ]
    paths = f"--zip {os.path.relpath(zip_path)} --out {os.path.relpath(out_dir)}"
    return " ".join(["vitcircuits train-organism cifar10", paths, *flags])


def train_cifar_organism(
    cfg: CifarOrganismConfig, zip_path: str | os.PathLike, out_dir: str | os.PathLike, *, progress: bool = True
) -> dict:
    """Train the organism, write ``config.json``/``model.safetensors``/``training.json`` to `out_dir`.

    Returns the metrics recorded in ``training.json`` (incl. ``test_accuracy``).
    Sets torch's global thread count to ``cfg.threads`` for the duration.
    """
    start_time = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        train_images_ICHW, train_labels_I = load_cifar10_split(zip_path, "train", cfg.max_train_images)
        test_images_ICHW, test_labels_I = load_cifar10_split(zip_path, "test", cfg.max_test_images)
        torch.manual_seed(cfg.seed)
        generator = torch.Generator().manual_seed(cfg.seed)
        model = build_model(cfg)
        optimizer = create_optimizer_v2(model, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps_per_epoch = len(train_labels_I) // cfg.batch_size
        if steps_per_epoch == 0:
            raise ValueError(f"need at least batch_size={cfg.batch_size} training images, got {len(train_labels_I)}")
        total_steps = cfg.epochs * steps_per_epoch
        if cfg.max_steps is not None:
            total_steps = min(total_steps, cfg.max_steps)
        warmup_steps = max(1, round(cfg.warmup_epochs * steps_per_epoch))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, warmup_steps, total_steps)
        )
        test_inputs_ICHW = normalize_images(test_images_ICHW) if cfg.checkpoints else None
        recorder = SeriesRecorder(Path(out_dir), total_steps, cfg.checkpoints, model, timm_hub_config(cfg),
                                  lambda: group_metrics(model, test_inputs_ICHW, test_labels_I, {}, cfg.eval_batch_size))
        history = train_loop(
            cfg, model, optimizer, scheduler, train_images_ICHW, train_labels_I, generator,
            steps_per_epoch, total_steps, progress, recorder,
        )  # fmt: skip
        test_accuracy = evaluate_accuracy(model, test_images_ICHW, test_labels_I, cfg.eval_batch_size)
    finally:
        torch.set_num_threads(previous_threads)

    metrics = {
        "config": dataclasses.asdict(cfg),
        "seed": cfg.seed,
        "epochs": cfg.epochs,
        "steps": total_steps,
        "threads": cfg.threads,
        "wall_time_s": round(time.perf_counter() - start_time, 1),
        "num_params": sum(p.numel() for p in model.parameters()),
        "num_train_images": len(train_labels_I),
        "num_test_images": len(test_labels_I),
        "final_train_loss": history[-1]["train_loss"],
        "final_train_accuracy": history[-1]["train_accuracy"],
        "test_accuracy": test_accuracy,
        "history": history,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__},
        "command": reproduce_command(cfg, zip_path, out_dir),
    }
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    write_json(out_path / "config.json", timm_hub_config(cfg))
    state_dict = {k: v.contiguous() for k, v in model.state_dict().items()}
    write_with(out_path / "model.safetensors", lambda tmp: save_file(state_dict, str(tmp)))
    write_json(out_path / "training.json", metrics)
    return metrics


def train_loop(
    cfg: CifarOrganismConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    images_ICHW: torch.Tensor,
    labels_I: torch.Tensor,
    generator: torch.Generator,
    steps_per_epoch: int,
    total_steps: int,
    progress: bool,
    on_step: Callable[[int, float], None] | None = None,
) -> list[dict]:
    """Run `total_steps` optimiser steps; return per-epoch mean train loss/accuracy. `on_step(n,
    loss)` is called after the n-th step of this call (from 1) with that step's training loss."""
    columns = (
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[stats]}"),
    )  # fmt: skip
    history = []
    step = 0
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("train", total=total_steps, stats="")
        for epoch in range(math.ceil(total_steps / steps_per_epoch)):
            model.train()
            order_I = torch.randperm(len(labels_I), generator=generator)
            loss_sum, correct, seen = 0.0, 0, 0
            for batch_index in range(min(steps_per_epoch, total_steps - step)):
                index_B = order_I[batch_index * cfg.batch_size : (batch_index + 1) * cfg.batch_size]
                inputs_BCHW = normalize_images(augment_images(images_ICHW[index_B], cfg, generator))
                logits_BC = model(inputs_BCHW)
                loss = F.cross_entropy(logits_BC, labels_I[index_B], label_smoothing=cfg.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip_norm > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm)
                optimizer.step()
                scheduler.step()
                step += 1
                if on_step is not None:
                    on_step(step, loss.item())
                loss_sum += loss.item() * len(index_B)
                correct += int((logits_BC.argmax(-1) == labels_I[index_B]).sum())
                seen += len(index_B)
                stats = f"epoch {epoch + 1} loss {loss_sum / seen:.3f} acc {correct / seen:.3f}"
                bar.update(task, advance=1, stats=stats)
            history.append({"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_accuracy": correct / seen})
            if progress:
                bar.console.print(f"{stats} (step {step}/{total_steps}, {bar.tasks[0].elapsed:.0f}s)")
    return history


def export_bundled_images(zip_path: str | os.PathLike, out_dir: str | os.PathLike, per_class: int = 50) -> Path:
    """Copy the first `per_class` test JPEGs of each class (sorted member order) as-is.

    Files are named ``{class}_{NNNN}.jpg``; ``labels.tsv`` (header
    ``filename\\tindex\\tlabel``) lists them. Returns the path of ``labels.tsv``.
    """
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    rows = ["filename\tindex\tlabel"]
    with zipfile.ZipFile(zip_path) as archive:
        for index, (name, members) in enumerate(_split_members(archive, "test").items()):
            for member in members[:per_class]:
                filename = f"{name}_{Path(member).name}"
                write_bytes(out_path / filename, archive.read(member))
                rows.append(f"{filename}\t{index}\t{name}")
    labels_path = out_path / "labels.tsv"
    write_text(labels_path, "\n".join(rows) + "\n")
    return labels_path
