"""Run folders: creation rules, atomic writes and ``manifest.json``.

Every command writes into one run folder. A non-empty folder is refused unless it is a run folder
(it has a ``manifest.json``) and ``force`` (start over, keeping nothing the command would
overwrite) or ``resume`` (keep what is there; the manifest keeps the sections of the stages that
are not run again) is given. All files are written
atomically: to a temporary file in the same folder, then renamed, with the permissions the umask
gives a new file. JSON is strict: a non-finite float is written as ``null``, never ``NaN``.
"""
from __future__ import annotations

import hashlib
import json
import math
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path next to ``path``; on success give it the umask's permissions for a
    new file (``mkstemp`` makes it 0600) and rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
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


def strict(obj: Any) -> Any:
    """A copy of ``obj`` that strict JSON can hold: non-finite floats become None, numpy scalars and
    arrays, paths and tuples their plain forms."""
    if isinstance(obj, dict):
        return {str(k): strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return strict(obj.tolist())
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(strict(obj), indent=2, default=_json_default, allow_nan=False) + "\n")


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; a missing, unreadable or invalid one raises one line naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


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
    if hasattr(obj, "to_dict"):
        return strict(obj.to_dict())
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
        if path.is_dir() and any(path.iterdir()):
            if not (force or resume):
                raise RunFolderError(f"{path}: folder is not empty; pass --force to overwrite or --resume to continue")
            if not (path / "manifest.json").is_file():
                raise RunFolderError(f"{path}: not a run folder (no manifest.json); --force and --resume only reuse run folders")
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path=path, command=command, config=config)
        manifest = path / "manifest.json"
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
        return write_json(self.file("manifest.json"), body)
