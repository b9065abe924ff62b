"""Reproducible CPU training of the bundled shapes ViT model organism (``bundled:shapes-vit``).

The organism is the same re-shaped timm ``vit_tiny_patch16_224`` as the CIFAR organism (32x32
input, 4 px patches: an 8x8 grid plus a CLS token) trained from scratch on the generated
compositional shapes task of :mod:`vitcircuits.organisms.shapes_task`: four classes
decided only by how two neighbouring parts are arranged, two decided by one patch. Training
reuses the CIFAR organism's loop, schedule and preprocessing (no augmentation: a flip or a shift
would change the label or break the patch alignment) and writes the same timm hub layout
(``config.json`` + ``model.safetensors`` + ``training.json``), so that::

    timm.create_model("local-dir:<out_dir>", pretrained=True)

rebuilds it. Run from the repository root::

    vitcircuits train-organism shapes --out src/vitcircuits/assets/organisms/shapes-vit --seed 0

``--images-out DIR`` also writes the bundled evaluation images (``bundled:shapes``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
from safetensors.torch import save_file
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.optim import create_optimizer_v2

from vitcircuits.files import write_json, write_with
from vitcircuits.models.config import TokenLayout
from vitcircuits.organisms import shapes_task
from vitcircuits.organisms.cifar import TIMM_ARCHITECTURE, CifarOrganismConfig, lr_factor, normalize_images, timm_hub_config, train_loop
from vitcircuits.organisms.series import SeriesRecorder, group_metrics

_ASSETS = Path(__file__).resolve().parents[1] / "assets"
BUNDLED_MODEL_DIR = _ASSETS / "organisms" / "shapes-vit"
BUNDLED_IMAGES_DIR = _ASSETS / "images" / "shapes"
BUNDLED_IMAGES_SEED = 3
"""Generator stream of the bundled evaluation images (training uses 1, testing 2)."""
BUNDLED_IMAGES_COUNT = 300
GROUPS = {"compositional": shapes_task.COMPOSITIONAL, "single_patch": shapes_task.SINGLE_PATCH}


@dataclass(frozen=True)
class ShapesOrganismConfig:
    """Everything that determines a training run (given the same thread count)."""

    seed: int = 0
    """Seeds model init (torch.manual_seed) and the shuffling generator."""
    epochs: int = 6
    """Passes over the training set."""
    batch_size: int = 64
    """Training batch size; the last incomplete batch of each epoch is dropped."""
    lr: float = 2e-3
    """Peak AdamW learning rate, reached after warm-up, then cosine-decayed to 0."""
    weight_decay: float = 0.05
    """AdamW decoupled weight decay (not applied to biases, norms, pos_embed, cls_token)."""
    warmup_epochs: float = 0.25
    """Linear warm-up length from 0 to `lr`, in (fractional) epochs."""
    label_smoothing: float = 0.0
    """Label smoothing of the training cross-entropy."""
    grad_clip_norm: float = 1.0
    """Global gradient-norm clip; 0 disables clipping."""
    embed_dim: int = 64
    """Residual stream width."""
    depth: int = 4
    """Number of transformer blocks."""
    num_heads: int = 4
    """Attention heads per block."""
    mlp_ratio: float = 2.0
    """MLP hidden width as a multiple of embed_dim."""
    pos_embed_init: str = "grid"
    """Start of the (learned) patch position embeddings (CLS: 0): ``grid``: :func:`grid_fourier_pos_embed`,
    with which attention at a fixed offset is easy to express; ``sincos``: timm's 2D sin-cos table;
    ``timm``: timm's random init."""
    n_train: int = 100_000
    """Generated training images (stream `train_data_seed`, indices 0 … n_train-1)."""
    n_test: int = 5_000
    """Generated test images (stream `test_data_seed`)."""
    train_max_pairs: int = 8
    """Training curriculum by data: compositional training images hold 1 … this many copies of
    their arrangement (cycling, see ``shapes_task.pairs_of``), which makes the rare two-patch
    relation a stronger training signal; 1 trains on the task itself. Test images always hold one."""
    train_data_seed: int = 1
    """Generator stream of the training images."""
    test_data_seed: int = 2
    """Generator stream of the test images."""
    threads: int = 1
    """torch intra-op CPU threads (results are bit-reproducible for a fixed value)."""
    max_steps: int | None = None
    """Stop after this many optimiser steps (the LR schedule is shortened to match)."""
    eval_batch_size: int = 500
    """Batch size for evaluation (does not affect results)."""
    checkpoints: int = 0
    """Checkpoints saved through training, log-uniformly spaced in steps, with test loss and
    accuracy per class group (:mod:`vitcircuits.organisms.series`); 0: none. They do not change
    the trained weights."""
    block_layer0_neighbours: bool = False
    """Layer 0's patch queries cannot attend to the 8 patches around them, in training and in every
    analysis (``neighbour_blocked_layers`` in ``config.json``): the co-perturbation of
    ``docs/dynamics.md``."""

    def loop_config(self) -> CifarOrganismConfig:
        """The CIFAR organism's config that drives the shared training loop (augmentation off)."""
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(CifarOrganismConfig) if hasattr(self, f.name)}
        return CifarOrganismConfig(**shared, patch_size=shapes_task.PATCH, crop_padding=0, horizontal_flip=False)

    def model_args(self) -> dict:
        """Keyword overrides for `timm.create_model(TIMM_ARCHITECTURE, ...)`."""
        return {**self.loop_config().model_args(), "num_classes": len(shapes_task.CLASSES)}


def build_model(cfg: ShapesOrganismConfig) -> torch.nn.Module:
    """A freshly initialised organism (seed it with torch.manual_seed first)."""
    model = timm.create_model(TIMM_ARCHITECTURE, pretrained=False, **cfg.model_args())
    tables = {"grid": lambda: grid_fourier_pos_embed(shapes_task.GRID, cfg.embed_dim),
              "sincos": lambda: build_sincos2d_pos_embed([shapes_task.GRID, shapes_task.GRID], cfg.embed_dim)}
    if cfg.pos_embed_init in tables:
        with torch.no_grad():
            model.pos_embed[0, 1:] = tables[cfg.pos_embed_init]()
            model.pos_embed[0, :1] = 0
    elif cfg.pos_embed_init != "timm":
        raise ValueError(f"pos_embed_init must be one of grid, sincos, timm; got {cfg.pos_embed_init!r}")
    if cfg.block_layer0_neighbours:
        grid = shapes_task.GRID
        mask_NN = TokenLayout(cls_index=0, dist_index=None, register_slice=(1, 1), patch_start=1, rows=grid, cols=grid).neighbour_block_NN()
        model.blocks[0].attn.register_forward_pre_hook(lambda module, args, kwargs: (args, {**kwargs, "attn_mask": mask_NN}), with_kwargs=True)
    return model


def grid_fourier_pos_embed(grid: int, dim: int) -> torch.Tensor:
    """``[grid², dim]`` 2D Fourier features ``sin/cos(ω·row), sin/cos(ω·col)`` with ``dim / 4``
    frequencies ω evenly spaced in (0, π] radians per patch, i.e. all resolvable on the grid (timm's
    sin-cos table spaces them geometrically down to 1e-4, most of which are flat across 8 patches)."""
    omega_K = torch.pi * torch.arange(1, dim // 4 + 1, dtype=torch.float64) / (dim // 4)
    rows_P, cols_P = (t.flatten().double() for t in torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij"))
    angles = [rows_P[:, None] * omega_K, cols_P[:, None] * omega_K]
    return torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1).float()


def shapes_hub_config(cfg: ShapesOrganismConfig) -> dict:
    """``config.json``: the CIFAR organism's hub config with this task's classes."""
    config = timm_hub_config(cfg.loop_config())
    n_classes = len(shapes_task.CLASSES)
    config["num_classes"] = n_classes
    config["model_args"] = cfg.model_args()
    config["pretrained_cfg"].update(num_classes=n_classes, label_names=list(shapes_task.CLASSES))
    config["class_groups"] = {name: sorted(classes) for name, classes in GROUPS.items()}
    if cfg.block_layer0_neighbours:
        config["neighbour_blocked_layers"] = [0]
    return config


@torch.inference_mode()
def predict(model: torch.nn.Module, images_ICHW: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Predicted classes of a timm model on uint8 images, with the eval preprocessing."""
    model.eval()
    return torch.cat([model(normalize_images(images_ICHW[s : s + batch_size])).argmax(-1) for s in range(0, len(images_ICHW), batch_size)])


def accuracy_report(predictions_I: torch.Tensor, labels_I: torch.Tensor) -> dict:
    """Overall, per-group and per-class accuracy."""
    correct_I = (predictions_I == labels_I).double()
    report = {"accuracy": float(correct_I.mean())}
    for name, classes in GROUPS.items():
        report[f"{name}_accuracy"] = float(correct_I[torch.isin(labels_I, torch.tensor(sorted(classes)))].mean())
    report["per_class_accuracy"] = {name: float(correct_I[labels_I == k].mean()) for k, name in enumerate(shapes_task.CLASSES)}
    return report


def reproduce_command(cfg: ShapesOrganismConfig, out_dir: str | os.PathLike) -> str:
    """Shell command (run from the current directory) that reproduces this run."""
    defaults = ShapesOrganismConfig()
    flags = [f"--{f.name.replace('_', '-')} {getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)
             if f.name == "seed" or getattr(cfg, f.name) != getattr(defaults, f.name)]
    return " ".join(["vitcircuits train-organism shapes", f"--out {os.path.relpath(out_dir)}", *flags])


def train_shapes_organism(cfg: ShapesOrganismConfig, out_dir: str | os.PathLike, *, progress: bool = True) -> dict:
    """Train the organism; write ``config.json``/``model.safetensors``/``training.json`` to `out_dir`.

    Returns the metrics recorded in ``training.json``. Test accuracy (overall, per group, per
    class) is measured after every epoch. Sets torch's thread count to ``cfg.threads`` meanwhile.
    """
    start_time = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        train_images, train_labels = shapes_task.dataset(cfg.train_data_seed, cfg.n_train, max_pairs=cfg.train_max_pairs)
        test_images, test_labels = shapes_task.dataset(cfg.test_data_seed, cfg.n_test)
        data_time = time.perf_counter() - start_time
        torch.manual_seed(cfg.seed)
        generator = torch.Generator().manual_seed(cfg.seed)
        model = build_model(cfg)
        optimizer = create_optimizer_v2(model, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps_per_epoch = cfg.n_train // cfg.batch_size
        if steps_per_epoch == 0:
            raise ValueError(f"need at least batch_size={cfg.batch_size} training images, got {cfg.n_train}")
        total_steps = cfg.epochs * steps_per_epoch if cfg.max_steps is None else min(cfg.epochs * steps_per_epoch, cfg.max_steps)
        warmup_steps = max(1, round(cfg.warmup_epochs * steps_per_epoch))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup_steps, total_steps))
        history, step = [], 0
        test_inputs = normalize_images(test_images) if cfg.checkpoints else None
        recorder = SeriesRecorder(Path(out_dir), total_steps, cfg.checkpoints, model, shapes_hub_config(cfg),
                                  lambda: group_metrics(model, test_inputs, test_labels, GROUPS, cfg.eval_batch_size))

        while step < total_steps:
            steps = min(steps_per_epoch, total_steps - step)
            (epoch,) = train_loop(cfg.loop_config(), model, optimizer, scheduler, train_images, train_labels, generator, steps_per_epoch, steps,
                                  progress, recorder)
            step += steps
            test = accuracy_report(predict(model, test_images, cfg.eval_batch_size), test_labels)
            history.append({**epoch, "epoch": len(history) + 1, "step": step, "elapsed_s": round(time.perf_counter() - start_time, 1),
                            **{k: v for k, v in test.items() if k != "per_class_accuracy"}})
            if progress:
                print(json.dumps(history[-1]), flush=True)
    finally:
        torch.set_num_threads(previous_threads)

    metrics = {
        "config": dataclasses.asdict(cfg),
        "seed": cfg.seed,
        "task": {"classes": list(shapes_task.CLASSES), "compositional": sorted(shapes_task.COMPOSITIONAL),
                 "single_patch": sorted(shapes_task.SINGLE_PATCH), "generator": "vitcircuits.organisms.shapes_task"},
        "steps": total_steps,
        "threads": cfg.threads,
        "wall_time_s": round(time.perf_counter() - start_time, 1),
        "data_generation_s": round(data_time, 1),
        "num_params": sum(p.numel() for p in model.parameters()),
        "num_train_images": cfg.n_train,
        "num_test_images": cfg.n_test,
        "final_train_loss": history[-1]["train_loss"],
        "final_train_accuracy": history[-1]["train_accuracy"],
        "test_accuracy": test["accuracy"],
        "test_compositional_accuracy": test["compositional_accuracy"],
        "test_single_patch_accuracy": test["single_patch_accuracy"],
        "test_per_class_accuracy": test["per_class_accuracy"],
        "history": history,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__, "numpy": np.__version__},
        "command": reproduce_command(cfg, out_dir),
    }
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    write_json(out_path / "config.json", shapes_hub_config(cfg))
    state_dict = {k: v.contiguous() for k, v in model.state_dict().items()}
    write_with(out_path / "model.safetensors", lambda tmp: save_file(state_dict, str(tmp)))
    write_json(out_path / "training.json", metrics)
    return metrics
