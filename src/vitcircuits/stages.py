"""Resumable stages of a run: a finished stage records a hash of everything it depends on in
``stages.json``; a later run with the same hash skips it, a changed hash re-runs it (and every
stage after it, since their inputs changed)."""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable

from rich.console import Console

from vitcircuits.runs import Run, write_json


def config_hash(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class StageRunner:
    """Runs stages in order, skipping the finished ones whose inputs are unchanged."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.path = run.file("stages.json")
        self.done: dict = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.upstream_changed = False
        self.console = Console(stderr=True)

    def stage(self, name: str, depends_on: object, fn: Callable[[], None]) -> bool:
        """Run ``fn`` unless ``name`` finished before with the same inputs; returns True if it ran."""
        digest = config_hash(depends_on)
        previous = self.done.get(name)
        if previous and previous["hash"] == digest and not self.upstream_changed:
            self.console.print(f"stage {name}: already done, skipped")
            return False
        self.upstream_changed = True
        self.console.print(f"stage {name}: running")
        start = time.time()
        with self.run.timed(name):
            fn()
        self.done[name] = {"hash": digest, "seconds": round(time.time() - start, 3), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        write_json(self.path, self.done)
        return True
