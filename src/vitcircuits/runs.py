"""Run folders: creation rules and ``manifest.json`` (files are written by :mod:`vitcircuits.files`).

Every command writes into one run folder. A non-empty folder is refused unless it is a run folder
(it has a ``manifest.json``) and ``force`` (start over, keeping nothing the command would
overwrite) or ``resume`` (keep what is there; the manifest keeps the sections of the stages that
are not run again) is given.
"""
from __future__ import annotations

import platform
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from vitcircuits.files import read_json, write_json
from vitcircuits.layout import LAYOUT


class RunFolderError(RuntimeError):
    """The output folder cannot be used as asked."""


def environment() -> dict[str, str]:
    """Versions of Python and the packages whose numerics matter."""
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for package in ("vitcircuits", "torch", "timm", "numpy", "safetensors", "transformers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


@dataclass
class Run:
    """An output folder and the manifest being collected for it."""

    path: Path
    command: str
    config: dict = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    timings: dict = field(default_factory=dict)

    @classmethod
    def create(cls, path: str | Path, command: str, config: dict, *, force: bool = False, resume: bool = False) -> Run:
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise RunFolderError(f"{path}: exists and is not a folder")
        if path.is_dir() and any(path.iterdir()):
            if not (force or resume):
                raise RunFolderError(f"{path}: folder is not empty; pass --force to overwrite or --resume to continue")
            if not (path / LAYOUT.manifest).is_file():
                raise RunFolderError(f"{path}: not a run folder (no manifest.json); --force and --resume only reuse run folders")
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path=path, command=command, config=config)
        manifest = path / LAYOUT.manifest
        if resume and not force and manifest.is_file():
            previous = read_json(manifest)
            run.manifest = {k: v for k, v in previous.items() if k not in ("command", "versions", "config", "timings_s")}
        return run

    def file(self, name: str) -> Path:
        return self.path / name

    @contextmanager
    def timed(self, stage: str):
        start = time.time()
        try:
            yield
        finally:
            self.timings[stage] = round(time.time() - start, 3)

    def write_manifest(self, **sections: Any) -> Path:
        """Write ``manifest.json`` with the environment, config, timings and the given sections
        (``model``, ``images``, ``seed``, outputs …); later calls add to earlier ones."""
        self.manifest.update(sections)
        self.timings["total"] = round(time.time() - self.started, 3)
        body = {
            "command": self.command,
            "versions": environment(),
            "config": self.config,
            **self.manifest,
            "timings_s": self.timings,
        }
        return write_json(self.file(LAYOUT.manifest), body)
