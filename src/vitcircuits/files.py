"""Files written atomically and read strictly: every output goes to a temporary file in the same
folder and is renamed into place, with the permissions the umask gives a new file; JSON is strict
(a non-finite float is written as ``null``, never ``NaN``), and a file that cannot be parsed raises
one line naming it."""
from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


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
