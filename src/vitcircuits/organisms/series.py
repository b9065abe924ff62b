"""A series of checkpoints through an organism's training, for the formation of its circuit.

Checkpoints are spaced log-uniformly in optimiser steps (step 1 to the last, so the early steps
are dense) and saved in the timm hub layout the loaders read (``config.json``,
``model.safetensors`` in float16, which halves the series' size), one folder per step:
``checkpoints/step_XXXXXXXX/``. Beside the weights, ``checkpoint.json`` records the step, the
running training loss, and the test loss and accuracy overall and per class group; and
``checkpoints/series.json`` lists the steps in order. Saving is read-only for the training: the
evaluation runs in inference mode and restores the model's mode, so a run with checkpoints trains
the same weights as one without.
"""
from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from vitcircuits.files import read_json, write_json, write_with
from vitcircuits.organisms.cifar import normalize_images

SERIES = "checkpoints"
"""The series' folder inside the organism's folder."""


def clear_series(folder: Path) -> None:
    """Remove a series left in ``folder`` by an earlier training run (it would mix with the new one)."""
    shutil.rmtree(folder / SERIES, ignore_errors=True)


def checkpoint_steps(total_steps: int, n: int) -> list[int]:
    """About ``n`` distinct steps from 1 to ``total_steps``, log-uniformly spaced (both ends included)."""
    if n <= 0 or total_steps <= 0:
        return []
    return sorted({int(s) for s in np.round(np.logspace(0, np.log10(total_steps), n))} | {total_steps})


@torch.inference_mode()
def group_metrics(model: torch.nn.Module, images_ICHW: torch.Tensor, labels_I: torch.Tensor, groups: Mapping[str, frozenset[int]],
                  batch_size: int = 500) -> dict:
    """Test loss (cross-entropy) and accuracy, overall and per class group, of a timm classifier on
    uint8 images; the model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        logits_IC = torch.cat([model(normalize_images(images_ICHW[s : s + batch_size])) for s in range(0, len(images_ICHW), batch_size)])
    finally:
        model.train(was_training)
    loss_I = F.cross_entropy(logits_IC.float(), labels_I, reduction="none").double()
    correct_I = (logits_IC.argmax(-1) == labels_I).double()
    report = {"loss": float(loss_I.mean()), "accuracy": float(correct_I.mean())}
    for name, classes in groups.items():
        member_I = torch.isin(labels_I, torch.tensor(sorted(classes)))
        report[f"{name}_loss"], report[f"{name}_accuracy"] = float(loss_I[member_I].mean()), float(correct_I[member_I].mean())
    return report


def write_checkpoint(folder: Path, step: int, model: torch.nn.Module, hub_config: dict, record: dict) -> Path:
    """One checkpoint of the series (module docstring); adds its step to ``series.json``."""
    out = folder / SERIES / f"step_{step:08d}"
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", hub_config)
    state_dict = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    write_with(out / "model.safetensors", lambda tmp: save_file(state_dict, str(tmp)))
    write_json(out / "checkpoint.json", {"step": step, **record})
    index = folder / SERIES / "series.json"
    steps = read_json(index)["steps"] if index.exists() else []
    write_json(index, {"steps": sorted(set(steps) | {step})})
    return out
