"""Options shared by the commands, with the same meaning everywhere.

Every command that writes a run from a model and images takes the same options; :func:`run_options`
adds them to a command's signature and hands the command one :class:`RunOptions`, whose
:meth:`RunOptions.open` is the opening every such command shares: create the run folder, load the
model, start the manifest. This is a single shared Typer decorator rather than tyro, because the
commands keep Typer's help, completion-free parsing and one-line errors (:mod:`vitcircuits.cli.errors`)
while the option records stay the frozen, keyword-only dataclasses of :mod:`vitcircuits.inputs`.
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from vitcircuits.engine import EngineOptions
from vitcircuits.inputs import ImageOptions, ImageSet, ModelOptions
from vitcircuits.models.loading import LoadedModel
from vitcircuits.runs import Run

ArchOpt = Annotated[Optional[str], typer.Option("--arch", help="timm architecture of a bare weights file")]
ImgSizeOpt = Annotated[Optional[int], typer.Option("--img-size", help="input size; position embeddings are resampled as timm does")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (cuda if present, else cpu), cpu, cuda, cuda:N")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="float32, float16 or bfloat16")]
MaxImagesOpt = Annotated[Optional[int], typer.Option("--max-images", min=1, help="use the first N images")]
SeedOpt = Annotated[int, typer.Option("--seed", min=0, help="seed for everything random")]
RandomOpt = Annotated[bool, typer.Option("--random-weights", help="use seeded random weights (stated in the manifest)")]
OutArg = Annotated[Path, typer.Option("--out", "-o", help="run folder to write")]
TaskMetricOpt = Annotated[str, typer.Option("--task-metric", help="what an edge must move to matter: auto (a classifier's margin, a "
                                            "backbone's final tokens), margin, embedding, or probe (a linear probe on labelled images)")]

_SHARED = (
    ("model", Annotated[str, typer.Option("--model", "-m", help="timm name, hub id, folder, or weights file (with --arch)")], inspect.Parameter.empty),
    ("images", Annotated[str, typer.Option("--images", "-i", help="file, folder, list .txt, glob, bundled:NAME or hf:DATASET[:SPLIT]")],
     inspect.Parameter.empty),
    ("out", OutArg, inspect.Parameter.empty),
    ("arch", ArchOpt, None),
    ("img_size", ImgSizeOpt, None),
    ("device", DeviceOpt, "auto"),
    ("dtype", DtypeOpt, "float32"),
    ("max_images", MaxImagesOpt, None),
    ("seed", SeedOpt, 0),
    ("num_workers", Annotated[int, typer.Option("--num-workers", min=0, help="image-decoding worker processes")], 0),
    ("random_weights", RandomOpt, False),
    ("engine", Annotated[str, typer.Option("--engine", help="where image passes run: local (this process) or ray (model replicas on a Ray cluster)")],
     "local"),
    ("ray_address", Annotated[Optional[str], typer.Option("--ray-address", help="Ray cluster to join (auto: the one `ray start` runs here); "
                                                          "default: start a local one")], None),
    ("workers", Annotated[int, typer.Option("--workers", min=1, help="model replicas with --engine ray")], 2),
    ("gpus_per_worker", Annotated[float, typer.Option("--gpus-per-worker", min=0, help="GPUs per replica with --engine ray (then on cuda)")], 0.0),
    ("force", Annotated[bool, typer.Option("--force", help="start over in a non-empty --out run folder")], False),
)
"""``(name, annotation, default)`` of the options every run-writing command takes."""
_RESUME = ("resume", Annotated[bool, typer.Option("--resume", help="continue a run in a non-empty --out run folder")], False)


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """The shared options of one command invocation."""

    model: ModelOptions
    """How to get the model."""
    images: ImageOptions
    """Which images, batched how."""
    out: Path
    """The run folder."""
    engine: EngineOptions = EngineOptions()
    """Where the image passes run."""
    force: bool = False
    """Start over in a non-empty run folder."""
    resume: bool = False
    """Continue a run in a non-empty run folder."""

    def open(self, command: str, config: dict) -> tuple[Run, LoadedModel, ImageSet]:
        """Create the run folder, load the model, start the engine, start the manifest (model, seed,
        engine) and resolve the images."""
        run = Run.create(self.out, command, {"model": self.model.to_dict(), "images": self.images.to_dict(), **config},
                         force=self.force, resume=self.resume)
        loaded = self.model.load()
        engine = self.engine.start(self.model, loaded)
        run.write_manifest(model=loaded.manifest(), seed=self.model.seed, engine=engine.describe())
        return run, loaded, self.images.open(loaded, engine)


MODEL_OPTIONS = ("model", "arch", "img_size", "random_weights")
"""The shared options that name the model (a command whose models come otherwise goes without)."""


def run_options(*, batch_size: int = 32, resume: bool = False, model: bool = True) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command the shared options (``--model``, ``--images``, ``--out``, ``--arch``,
    ``--img-size``, ``--device``, ``--dtype``, ``--batch-size`` (default ``batch_size``),
    ``--max-images``, ``--seed``, ``--num-workers``, ``--random-weights``, ``--engine``,
    ``--ray-address``, ``--workers``, ``--gpus-per-worker``, ``--force`` and, with
    ``resume``, ``--resume``; without ``model``, none of :data:`MODEL_OPTIONS`, and
    ``options.model.model`` is empty for the command to fill); the command takes them as one
    keyword argument ``options``."""
    batch = ("batch_size", Annotated[int, typer.Option("--batch-size", min=1, help="images per forward pass")], batch_size)
    shared = [*_SHARED[:7], batch, *_SHARED[7:], *([_RESUME] if resume else [])]
    if not model:
        shared = [option for option in shared if option[0] not in MODEL_OPTIONS]

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in inspect.signature(command, eval_str=True).parameters.values()
               if p.name != "options"]
        added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)
                 for name, annotation, default in shared]

        @functools.wraps(command)
        def run(**kwargs: Any) -> Any:
            v = {"model": "", "arch": None, "img_size": None, "random_weights": False,
                 **{name: kwargs.pop(name, default) for name, _, default in shared}}
            options = RunOptions(
                model=ModelOptions(model=v["model"], arch=v["arch"], img_size=v["img_size"], random_weights=v["random_weights"],
                                   device=v["device"], dtype=v["dtype"], seed=v["seed"]),
                images=ImageOptions(images=v["images"], batch_size=v["batch_size"], max_images=v["max_images"], num_workers=v["num_workers"]),
                engine=EngineOptions(engine=v["engine"], ray_address=v["ray_address"], workers=v["workers"],
                                     gpus_per_worker=v["gpus_per_worker"]),
                out=v["out"], force=v["force"], resume=v.get("resume", False))
            return command(options=options, **kwargs)

        run.__signature__ = inspect.Signature([*added, *own])
        return run
    return decorate
