"""The stages of a run, one module each (``overview``, ``heads``, ``composition``, ``necessity``,
``sae``, ``features``, ``report``), and the runner that makes them resumable. A stage body takes
the run, the model, the images and its config, reads its upstream outputs from the run folder
(:data:`~vitcircuits.layout.LAYOUT`) and writes its own; the analysis it calls takes tensors and
configs only. ``hunt`` is the ordered list :data:`vitcircuits.hunt.STAGES`; the standalone
commands call the same bodies.

A stage records in ``stages.json`` a hash of everything it depends on when it starts and when it
finishes. A later run:

- skips a finished stage whose hash is unchanged and whose outputs are all there (unless an
  earlier stage ran again, since then its inputs changed);
- resumes an unfinished stage with the same hash, keeping its outputs: a stage that can resume
  (the activation harvest, SAE checkpoints) checks its own artefacts' keys;
- otherwise deletes the stage's outputs and the manifest sections it wrote, then runs it, so
  nothing from other inputs survives (``--force`` runs start with no record at all).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rich.console import Console

from vitcircuits.files import read_json, write_json
from vitcircuits.layout import LAYOUT
from vitcircuits.runs import Run


def config_hash(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Stage:
    """One stage of ``hunt``."""

    name: str
    outputs: tuple[str, ...]
    """Files and folders it writes (:data:`~vitcircuits.layout.LAYOUT` paths)."""
    reads: tuple[str, ...]
    """Upstream outputs it reads."""
    depends_on: Callable[..., dict]
    """``depends_on(config, done)``: what its outputs depend on beside the model, weights and images
    (the parts of the hunt config it uses, which include those of the upstream stages it reads;
    ``done`` is ``stages.json`` so far)."""
    body: Callable[..., None]
    """``body(run, loaded, images, config)``."""


class StageRunner:
    """Runs stages in order, skipping the finished ones whose inputs are unchanged."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.path = run.file(LAYOUT.stages)
        self.done: dict = read_json(self.path) if self.path.exists() else {}
        self.upstream_changed = False
        self.console = Console(stderr=True)

    def stage(self, name: str, depends_on: object, fn: Callable[[], None], outputs: Sequence[str] = (), reads: Sequence[str] = ()) -> bool:
        """Run ``fn`` unless ``name`` finished before with the same inputs; returns True if it ran.
        ``outputs``: the files and folders (relative to the run) that the stage writes; ``reads``:
        the upstream outputs it needs."""
        missing = [path for path in reads if not self.run.file(path).exists()]
        if missing:
            raise FileNotFoundError(f"{self.run.path}: stage {name} needs {', '.join(missing)}, which an earlier stage did not write")
        digest = config_hash(depends_on)
        previous = self.done.get(name) or {}
        same = previous.get("hash") == digest and not self.upstream_changed
        if same and previous.get("finished") and all(self.run.file(o).exists() for o in outputs):
            self.console.print(f"stage {name}: already done, skipped")
            return False
        self.upstream_changed = True
        if same:
            self.console.print(f"stage {name}: resuming")
        else:
            self._clear(previous, outputs)
            self.console.print(f"stage {name}: running")
        before = dict(self.run.manifest)
        self.done[name] = {"hash": digest, "finished": None}
        write_json(self.path, self.done)
        start = time.time()
        with self.run.timed(name):
            fn()
        sections = sorted(set(previous.get("manifest_sections", [])) |
                          {k for k, v in self.run.manifest.items() if k not in before or before[k] is not v})
        self.done[name] = {"hash": digest, "seconds": round(time.time() - start, 3), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                           "manifest_sections": sections}
        write_json(self.path, self.done)
        return True

    def _clear(self, previous: dict, outputs: Sequence[str]) -> None:
        """Delete a stage's outputs and the manifest sections it wrote before it runs afresh."""
        for relative in outputs:
            path = self.run.file(relative)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
        for section in previous.get("manifest_sections", []):
            self.run.manifest.pop(section, None)
