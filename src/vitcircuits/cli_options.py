"""Options shared by every command, with the same meaning everywhere, and the one-line error exit."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

console = Console(stderr=True)

ModelArg = Annotated[str, typer.Option("--model", "-m", help="timm name, hub id, folder, or weights file (with --arch)")]
ImagesArg = Annotated[str, typer.Option("--images", "-i", help="file, folder, list .txt, glob, bundled:NAME or hf:DATASET[:SPLIT]")]
OutArg = Annotated[Path, typer.Option("--out", "-o", help="run folder to write")]
ArchOpt = Annotated[Optional[str], typer.Option("--arch", help="timm architecture of a bare weights file")]
ImgSizeOpt = Annotated[Optional[int], typer.Option("--img-size", help="input size; position embeddings are resampled as timm does")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (cuda if present, else cpu), cpu, cuda, cuda:N")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="float32, float16 or bfloat16")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="images per forward pass")]
MaxImagesOpt = Annotated[Optional[int], typer.Option("--max-images", min=1, help="use the first N images")]
SeedOpt = Annotated[int, typer.Option("--seed", help="seed for everything random")]
WorkersOpt = Annotated[int, typer.Option("--num-workers", min=0, help="image-decoding worker processes")]
RandomOpt = Annotated[bool, typer.Option("--random-weights", help="use seeded random weights (stated in the manifest)")]
ForceOpt = Annotated[bool, typer.Option("--force", help="write into a non-empty --out folder")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="continue a run in a non-empty --out folder")]
TaskMetricOpt = Annotated[str, typer.Option("--task-metric", help="what an edge must move to matter: auto (a classifier's margin, a "
                                            "backbone's final tokens), margin, embedding, or probe (a linear probe on labelled images)")]


def fail(err: Exception) -> None:
    """Print ``err`` as one red line and exit with status 2."""
    console.print(f"[bold red]error:[/] {err}", markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)
