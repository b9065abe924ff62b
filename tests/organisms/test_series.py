"""Checkpoints through an organism's training: log-uniform steps, per-group test metrics, weights
the loaders read, and the same trained model as without them."""
import json

import torch
from safetensors.torch import load_file

from vitcircuits.models.loading import load_model
from vitcircuits.organisms.series import SERIES, checkpoint_steps
from vitcircuits.organisms.shapes import ShapesOrganismConfig, train_shapes_organism

TINY = dict(epochs=2, batch_size=16, embed_dim=16, depth=2, num_heads=2, n_train=160, n_test=60, threads=1)


def test_steps_are_log_uniform_from_one_to_the_last():
    steps = checkpoint_steps(1000, 30)
    assert steps[0] == 1 and steps[-1] == 1000 and steps == sorted(set(steps))
    gaps = [b / a for a, b in zip(steps[10:], steps[11:])]
    assert max(gaps) / min(gaps) < 1.5  # equal ratios where rounding no longer merges steps
    assert checkpoint_steps(1000, 0) == [] and checkpoint_steps(5, 30) == [1, 2, 3, 4, 5]


def test_a_series_is_saved_without_changing_the_training(tmp_path):
    stale = tmp_path / "a" / SERIES / "step_00000999"
    stale.mkdir(parents=True)  # left by an earlier run into the same folder
    with_series = train_shapes_organism(ShapesOrganismConfig(**TINY, checkpoints=6), tmp_path / "a", progress=False)
    without = train_shapes_organism(ShapesOrganismConfig(**TINY), tmp_path / "b", progress=False)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    timeless = lambda history: [{k: v for k, v in epoch.items() if k != "elapsed_s"} for epoch in history]  # noqa: E731
    assert timeless(with_series["history"]) == timeless(without["history"])
    total = with_series["steps"]
    series = json.loads((tmp_path / "a" / SERIES / "series.json").read_text())
    assert series["steps"] == checkpoint_steps(total, 6) and not (tmp_path / "b" / SERIES).exists() and not stale.exists()
    last = tmp_path / "a" / SERIES / f"step_{total:08d}"
    record = json.loads((last / "checkpoint.json").read_text())
    assert record["step"] == total and {"train_loss", "loss", "accuracy", "compositional_loss", "compositional_accuracy",
                                        "single_patch_loss", "single_patch_accuracy"} <= record.keys()
    assert record["accuracy"] == with_series["test_accuracy"]  # the last checkpoint is the final model
    final, saved = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(last / "model.safetensors"))
    assert all(saved[k].dtype == torch.float16 and torch.allclose(saved[k].float(), final[k], atol=1e-2, rtol=1e-2) for k in final)
    loaded = load_model(str(last), device="cpu")
    assert loaded.model.cfg.n_layers == 2 and loaded.pretrained_cfg["label_names"][0] == "H_left_of_V"
