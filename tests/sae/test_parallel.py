"""Data-parallel SAE training (gloo, 2 CPU processes) gives the single-process run: the same loss
at every logged step and the same weights, to float rounding (stated tolerance: 1e-5 relative on
the losses, 1e-5 absolute on the weights after 40 steps)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from typer.testing import CliRunner

from vitcircuits.cli import app
from vitcircuits.sae.io import load_sae
from vitcircuits.sae.model import SAEConfig
from vitcircuits.sae.parallel import DataParallel
from vitcircuits.sae.train import TrainConfig, train_sae

TRAIN = TrainConfig(lr=3e-3, warmup_steps=5, total_steps=40, batch_size=64, seed=3, checkpoint_every=0, log_every=5,
                    init_sample_rows=512)


def _data() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2000, 16, generator=g) @ torch.randn(16, 16, generator=g)


def _config(architecture: str) -> SAEConfig:
    return SAEConfig(d_in=16, d_sae=64, architecture=architecture, k=4, l1_coefficient=1e-3, dead_steps_threshold=10)


def _rank(rank: int, world: int, store: str, out: str, architecture: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        sae, history = train_sae(_data(), _config(architecture), TRAIN, progress=False)
        torch.save({"history": history, "state": sae.state_dict()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("architecture", ["topk", "relu"])
def test_two_processes_train_the_single_process_sae(tmp_path, architecture):
    mp.spawn(_rank, args=(2, str(tmp_path / "store"), str(tmp_path / "out"), architecture), nprocs=2, join=True)
    sae, history = train_sae(_data(), _config(architecture), TRAIN, progress=False)
    ranks = [torch.load(tmp_path / f"out.{r}", weights_only=True) for r in range(2)]
    for key, value in sae.state_dict().items():
        torch.testing.assert_close(ranks[0]["state"][key], value, rtol=0, atol=1e-5, msg=key)
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key])  # the ranks stay identical
    assert [h["step"] for h in ranks[0]["history"]] == [h["step"] for h in history]
    for mine, theirs in zip(ranks[0]["history"], history):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5) and mine["mse"] == pytest.approx(theirs["mse"], rel=1e-5)


def test_a_batch_that_does_not_split_evenly_is_refused():
    with pytest.raises(ValueError, match="does not split into 3 equal parts"):
        DataParallel(0, 3).local(torch.zeros(64, 4))


def test_sae_train_with_two_processes_writes_the_one_process_sae(tmp_path):
    args = ["sae", "train", "--model", "bundled:cifar10-vit", "--images", "bundled:cifar10", "--max-images", "40", "--hook",
            "blocks.2.hook_resid_post", "--epochs", "1", "--sae-batch", "256", "--expansion", "2", "--k", "8", "--device", "cpu"]
    for n in (1, 2):
        result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / f"p{n}"), "--processes", str(n)])
        assert result.exit_code == 0, result.output
    one, two = (load_sae(tmp_path / f"p{n}" / "sae" / "sae") for n in (1, 2))
    for key, value in one.state_dict().items():
        torch.testing.assert_close(two.state_dict()[key], value, rtol=0, atol=1e-5, msg=key)
    history = [json.loads((tmp_path / f"p{n}" / "sae" / "metrics.json").read_text())["history"] for n in (1, 2)]
    assert [h["loss"] for h in history[1]] == pytest.approx([h["loss"] for h in history[0]], rel=1e-5)
