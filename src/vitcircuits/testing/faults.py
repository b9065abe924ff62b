"""A pass that kills its own worker process once, for the fault-tolerance tests of the engines."""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

from vitcircuits.engine import ImagePass
from vitcircuits.models.hooked_vit import HookedViT


@dataclass(frozen=True)
class KillOnce(ImagePass):
    """Runs ``work``, but the first process to reach the image with index ``at`` creates
    ``marker`` and dies by SIGKILL before stepping on it (a worker lost mid-shard, after it has
    already stepped on the shard's earlier batches). Runs again (the marker exists) step normally."""

    work: ImagePass
    marker: Path
    at: int

    def start(self, model: HookedViT):
        return self.work.start(model)

    def step(self, model: HookedViT, partial, batch):
        if self.at in batch.indices:
            try:
                self.marker.touch(exist_ok=False)
            except FileExistsError:
                pass
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        return self.work.step(model, partial, batch)

    def finish(self, model: HookedViT, partial):
        return self.work.finish(model, partial)

    def merge(self, first, later):
        return self.work.merge(first, later)
