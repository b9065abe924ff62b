"""Shared fixtures of the organism tests."""
import dataclasses
import shlex

import pytest
from typer.testing import CliRunner

from vitcircuits.cli import app


@pytest.fixture()
def recorded_config(monkeypatch):
    """``recorded_config(command, trainer)``: the config that a recorded ``vitcircuits
    train-organism`` command builds, with the trainer (its dotted path) replaced so nothing trains."""
    def build(command: str, trainer: str) -> dict:
        seen = {}
        monkeypatch.setattr(trainer, lambda config, *args, **kwargs: seen.setdefault("config", config) and {})
        argv = shlex.split(command)
        assert argv[:2] == ["vitcircuits", "train-organism"]
        CliRunner().invoke(app, argv[1:])
        return dataclasses.asdict(seen["config"])
    return build
