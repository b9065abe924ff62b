"""``vitcircuits train-organism shapes|cifar10``: the organism trainers, one option per field of
their frozen config dataclass (type, default and help taken from the field and its docstring), so
a config gains a flag by gaining a field."""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from vitcircuits.cli.errors import Typer
from vitcircuits.organisms.cifar import CifarOrganismConfig
from vitcircuits.organisms.shapes import ShapesOrganismConfig

organism_app = Typer(add_completion=False, no_args_is_help=True, help="Train an organism (a small ViT with a measurable circuit) on the CPU.")


def field_docs(config_class: type) -> dict[str, str]:
    """The docstring under each field of a dataclass, first sentence only."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(config_class)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = " ".join(str(after.value.value).split()).split(". ")[0].rstrip(".")
    return docs


def config_options(config_class: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command one option per field of ``config_class``; it receives the built config as
    the keyword argument ``config``."""
    hints, docs = typing.get_type_hints(config_class), field_docs(config_class)
    fields = dataclasses.fields(config_class)

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in inspect.signature(command, eval_str=True).parameters.values()
               if p.name != "config"]
        added = []
        for f in fields:
            flag = f"--{f.name.replace('_', '-')}"
            option = typer.Option(f"{flag}/--no-{f.name.replace('_', '-')}" if hints[f.name] is bool else flag, help=docs.get(f.name))
            added.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[hints[f.name], option], default=f.default))

        @functools.wraps(command)
        def run(**kwargs: Any) -> Any:
            config = config_class(**{f.name: kwargs.pop(f.name, f.default) for f in fields})
            return command(config=config, **kwargs)

        run.__signature__ = inspect.Signature([*own, *added])
        return run
    return decorate


@organism_app.command()
@config_options(ShapesOrganismConfig)
def shapes(
    config: ShapesOrganismConfig,
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder (timm hub layout)")],
    images_out: Annotated[Optional[Path], typer.Option("--images-out", help="also write the bundled evaluation images here")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress output")] = False,
) -> None:
    """The shapes organism: compositional and single-patch classes of bars on a grid (docs/shapes.md)."""
    from vitcircuits.organisms import shapes_task
    from vitcircuits.organisms.shapes import BUNDLED_IMAGES_COUNT, BUNDLED_IMAGES_SEED, train_shapes_organism

    if images_out is not None:
        shapes_task.write_image_folder(images_out, BUNDLED_IMAGES_SEED, BUNDLED_IMAGES_COUNT)
    metrics = train_shapes_organism(config, out, progress=not quiet)
    Console().print(f"test accuracy {metrics['test_accuracy']:.4f} (compositional {metrics['test_compositional_accuracy']:.4f}, "
                    f"single-patch {metrics['test_single_patch_accuracy']:.4f}); checkpoint in {out}")


@organism_app.command()
@config_options(CifarOrganismConfig)
def cifar10(
    config: CifarOrganismConfig,
    zip_path: Annotated[Path, typer.Option("--zip", help="CIFAR-10 JPEG zip ({train,test}/<class>/NNNN.jpg)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder (timm hub layout)")],
    images_out: Annotated[Optional[Path], typer.Option("--images-out", help="also export the bundled test images here")] = None,
) -> None:
    """The CIFAR-10 organism, the negative control (bit-reproducible from the seed and thread count)."""
    from vitcircuits.organisms.cifar import export_bundled_images, train_cifar_organism

    if images_out is not None:
        export_bundled_images(zip_path, images_out)
    metrics = train_cifar_organism(config, zip_path, out)
    Console().print(f"test accuracy {metrics['test_accuracy']:.4f}; checkpoint in {out}")


@organism_app.command("pack")
def pack(
    organism: Annotated[Path, typer.Option("--organism", help="a trained organism folder with a checkpoint series (--checkpoints N)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="the bundled organism folder to write")],
    alpha: Annotated[float, typer.Option("--alpha", min=0, help="quantisation step of the differences, in standard deviations of each final tensor")] = 2**-5,
) -> None:
    """Pack an organism's checkpoint series small enough to bundle (quantised differences backwards from its last checkpoint)."""
    from vitcircuits.organisms.packed import pack_organism

    index = pack_organism(organism, out, alpha)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    Console().print(f"{len(index['checkpoints']) + 1} checkpoints packed into {out} ({size / 1e6:.2f} MB with the final model)")
