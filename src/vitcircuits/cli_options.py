"""Options shared by every command, with the same meaning everywhere, and the one error wrapper:
every command registered on a :class:`Typer` turns any exception into one line naming the file or
option and the reason, with exit status 2 (``vitcircuits --debug …`` shows the traceback instead)."""
from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import click
import typer
from rich.console import Console
from rich.markup import escape

console = Console(stderr=True)
DEBUG = {"traceback": False}
"""Set by ``--debug``: let exceptions through with their traceback."""
EXPECTED = (ValueError, OSError, RuntimeError, KeyError)
"""Exceptions whose message is written for the user; others are prefixed with their type."""

ModelArg = Annotated[str, typer.Option("--model", "-m", help="timm name, hub id, folder, or weights file (with --arch)")]
ImagesArg = Annotated[str, typer.Option("--images", "-i", help="file, folder, list .txt, glob, bundled:NAME or hf:DATASET[:SPLIT]")]
OutArg = Annotated[Path, typer.Option("--out", "-o", help="run folder to write")]
ArchOpt = Annotated[Optional[str], typer.Option("--arch", help="timm architecture of a bare weights file")]
ImgSizeOpt = Annotated[Optional[int], typer.Option("--img-size", help="input size; position embeddings are resampled as timm does")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (cuda if present, else cpu), cpu, cuda, cuda:N")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="float32, float16 or bfloat16")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="images per forward pass")]
MaxImagesOpt = Annotated[Optional[int], typer.Option("--max-images", min=1, help="use the first N images")]
SeedOpt = Annotated[int, typer.Option("--seed", min=0, help="seed for everything random")]
WorkersOpt = Annotated[int, typer.Option("--num-workers", min=0, help="image-decoding worker processes")]
RandomOpt = Annotated[bool, typer.Option("--random-weights", help="use seeded random weights (stated in the manifest)")]
ForceOpt = Annotated[bool, typer.Option("--force", help="write into a non-empty --out folder")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="continue a run in a non-empty --out folder")]
TaskMetricOpt = Annotated[str, typer.Option("--task-metric", help="what an edge must move to matter: auto (a classifier's margin, a "
                                            "backbone's final tokens), margin, embedding, or probe (a linear probe on labelled images)")]


def one_line(err: BaseException) -> str:
    """``err`` as one printable line: whitespace collapsed, other control characters escaped."""
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, KeyError) and len(err.args) == 1:
        text = f"missing key {err.args[0]!r}"
    if not isinstance(err, EXPECTED):
        text = f"{type(err).__name__}: {text} (--debug shows the traceback)"
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def one_line_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a command: an exception becomes one red line on stderr and exit status 2."""
    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as err:
            if DEBUG["traceback"]:
                raise
            console.print(f"[bold red]error:[/] {escape(one_line(err))}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None
    return run


class Typer(typer.Typer):
    """A Typer whose commands all go through :func:`one_line_errors`."""

    def command(self, *args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        register = super().command(*args, **kwargs)
        return lambda command: register(one_line_errors(command))
