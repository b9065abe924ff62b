"""Run folders: creation rules, atomic writes and ``manifest.json``.

Every command writes into one run folder. A non-empty folder is refused unless ``force``
(start over, keeping nothing the command would overwrite) or ``resume`` (keep what is there).
All files are written atomically: to a temporary file in the same folder, then renamed.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np


class RunFolderError(RuntimeError):
    """The output folder cannot be used as asked."""


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path next to ``path``; on success rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def write_npz(path: str | Path, **arrays: np.ndarray) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
    return Path(path)


def write_with(path: str | Path, writer: Callable[[Path], None]) -> Path:
    """Atomically create ``path`` with a function that writes to a given path (e.g. savefig)."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, (Path, tuple)):
        return str(obj) if isinstance(obj, Path) else list(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    return str(obj)


def sha256_strings(items: list[str]) -> str:
    digest = hashlib.sha256()
    for item in items:
        digest.update(item.encode("utf-8") + b"\n")
    return digest.hexdigest()


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
        if path.is_dir() and any(path.iterdir()) and not (force or resume):
            raise RunFolderError(f"{path}: folder is not empty; pass --force to overwrite or --resume to continue")
        path.mkdir(parents=True, exist_ok=True)
        return cls(path=path, command=command, config=config)

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
        return write_json(self.file("manifest.json"), body)
