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

import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from vitcircuits.files import read_json, write_json, write_with

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
def group_metrics(model: torch.nn.Module, inputs_ICHW: torch.Tensor, labels_I: torch.Tensor, groups: Mapping[str, frozenset[int]],
                  batch_size: int = 500) -> dict:
    """Test loss (cross-entropy) and accuracy, overall and per class group, of a timm classifier on
    preprocessed images; the model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        logits_IC = torch.cat([model(inputs_ICHW[s : s + batch_size]) for s in range(0, len(inputs_ICHW), batch_size)])
    finally:
        model.train(was_training)
    loss_I = F.cross_entropy(logits_IC.float(), labels_I, reduction="none").double()
    correct_I = (logits_IC.argmax(-1) == labels_I).double()
    report = {"loss": float(loss_I.mean()), "accuracy": float(correct_I.mean())}
    for name, classes in groups.items():
        member_I = torch.isin(labels_I, torch.tensor(sorted(classes)))
        report[f"{name}_loss"], report[f"{name}_accuracy"] = float(loss_I[member_I].mean()), float(correct_I[member_I].mean())
    return report


def write_checkpoint(series: Path, step: int, state: Mapping[str, torch.Tensor], hub_config: dict, record: dict) -> Path:
    """One checkpoint of the series in the folder ``series`` (module docstring), float16 weights;
    adds its step to ``series.json``."""
    out = series / f"step_{step:08d}"
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", hub_config)
    half = {k: torch.as_tensor(v).detach().to(torch.float16).contiguous() for k, v in state.items()}
    write_with(out / "model.safetensors", lambda tmp: save_file(half, str(tmp)))
    write_json(out / "checkpoint.json", {"step": step, **record})
    index = series / "series.json"
    steps = read_json(index)["steps"] if index.exists() else []
    write_json(index, {"steps": sorted(set(steps) | {step})})
    return out


def read_series(spec: str | Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every checkpoint, in training order, from: a series folder (with
    ``series.json``), an organism folder holding one (``checkpoints/``), a ``.txt`` file listing
    checkpoint folders one per line, or checkpoint folders separated by commas. A listed folder's
    step is its ``checkpoint.json``'s, else the number in its name ``step_N``."""
    text = str(spec)
    path = Path(text)
    if path.is_dir() and not (path / "series.json").is_file() and (path / SERIES / "series.json").is_file():
        path = path / SERIES
    if path.is_dir() and (path / "series.json").is_file():
        folders = [path / f"step_{step:08d}" for step in read_json(path / "series.json")["steps"]]
    elif path.is_file() and path.suffix == ".txt":
        folders = [Path(line.strip()) for line in path.read_text().splitlines() if line.strip()]
    elif "," in text or (path.is_dir() and (path / "model.safetensors").is_file()):
        folders = [Path(part.strip()) for part in text.split(",") if part.strip()]
    else:
        raise FileNotFoundError(f"--checkpoints {text}: not a series folder (series.json), an organism folder with {SERIES}/, "
                                "a .txt list of checkpoint folders, or comma-separated checkpoint folders")
    series = sorted((_step_of(folder), folder) for folder in folders)
    if len({step for step, _ in series}) != len(series) or len(series) < 2:
        raise ValueError(f"--checkpoints {text}: need at least 2 checkpoints with distinct steps, got steps {[s for s, _ in series]}")
    return series


def _step_of(folder: Path) -> int:
    if not (folder / "model.safetensors").is_file() or not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: not a checkpoint (needs config.json and model.safetensors)")
    if (folder / "checkpoint.json").is_file():
        return int(read_json(folder / "checkpoint.json")["step"])
    match = re.fullmatch(r"step_0*(\d+)", folder.name)
    if match is None:
        raise ValueError(f"{folder}: no checkpoint.json and no step in its name (step_N)")
    return int(match.group(1))


class SeriesRecorder:
    """Saves a training run's series: call it after every optimiser step with that step's loss
    (the ``on_step`` of the trainers' loop). At the wanted steps (:func:`checkpoint_steps`) it
    writes a checkpoint with the mean training loss since the previous one and ``evaluate()``."""

    def __init__(self, folder: Path, total_steps: int, n: int, model: torch.nn.Module, hub_config: dict, evaluate: Callable[[], dict]):
        clear_series(folder)
        self.folder, self.model, self.hub_config, self.evaluate = folder, model, hub_config, evaluate
        self.wanted, self.step, self.losses = set(checkpoint_steps(total_steps, n)), 0, []

    def __call__(self, _n: int, loss: float) -> None:
        self.step += 1
        self.losses.append(loss)
        if self.step in self.wanted:
            record = {"train_loss": float(np.mean(self.losses)), **self.evaluate()}
            write_checkpoint(self.folder / SERIES, self.step, self.model.state_dict(), self.hub_config, record)
            self.losses.clear()
