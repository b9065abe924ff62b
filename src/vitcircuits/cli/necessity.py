"""``vitcircuits necessity``: accuracy per class group with a run's circuit heads ablated, against random heads."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from vitcircuits.cli.options import RunOptions, run_options
from vitcircuits.inputs import check_folder_classes, images_manifest
from vitcircuits.layout import LAYOUT


def parse_heads(text: str) -> list[tuple[int, int]]:
    """``"1.2,3.0"`` (``layer.head`` pairs) -> ``[(1, 2), (3, 0)]``."""
    try:
        return [(int(layer), int(head)) for layer, head in (item.strip().split(".") for item in text.split(",") if item.strip())]
    except ValueError:
        raise ValueError(f"--heads {text!r}: expected comma-separated LAYER.HEAD pairs, e.g. 1.2,3.0") from None


def parse_groups(items: list[str], label_names: list[str] | None) -> dict[str, list[int]]:
    """``["shape=0,1,2", "colour=3,4"]`` -> ``{"shape": [0, 1, 2], "colour": [3, 4]}``; a class may
    be given by index or by its label name."""
    names = {name: i for i, name in enumerate(label_names or [])}
    groups = {}
    for item in items:
        name, sep, classes = item.partition("=")
        if not sep or not name or not classes:
            raise ValueError(f"--group {item!r}: expected NAME=CLASS,CLASS,… (class indices or label names)")
        try:
            groups[name] = [names[c] if c in names else int(c) for c in (c.strip() for c in classes.split(","))]
        except ValueError:
            raise ValueError(f"--group {item!r}: unknown class (use indices or one of the model's label names)") from None
    return groups


@run_options(batch_size=100)
def necessity_cmd(
    options: RunOptions,
    circuits: Annotated[Optional[Path], typer.Option("--circuits", help="a compose or hunt run whose supported circuits name the heads")] = None,
    heads: Annotated[Optional[str], typer.Option("--heads", help="heads to ablate instead, as LAYER.HEAD,LAYER.HEAD")] = None,
    group: Annotated[Optional[list[str]], typer.Option("--group", help="class group NAME=CLASS,… (repeatable; default: the model's class_groups)")] = None,
    draws: Annotated[int, typer.Option("--draws", min=0, help="random same-layer head sets to compare with")] = 20,
    ablation: Annotated[str, typer.Option("--ablation", help="mean (over images and positions), position_mean, zero, resample")] = "mean",
) -> None:
    """Is the circuit necessary? Accuracy per class group with its heads ablated, against random heads of the same layers (in necessity/)."""
    from vitcircuits.composition.necessity import NecessityConfig, circuit_heads, format_report
    from vitcircuits.stages.composition import read_circuits
    from vitcircuits.stages.necessity import run_necessity

    if (circuits is None) == (heads is None):
        raise ValueError("give exactly one of --circuits RUN or --heads LAYER.HEAD,…")
    config = NecessityConfig(draws=draws, ablation=ablation, seed=options.model.seed)
    chosen = parse_heads(heads) if heads is not None else circuit_heads(read_circuits(circuits))
    run, loaded, images = options.open("necessity", {"necessity": asdict(config), "circuits": str(circuits) if circuits else None, "heads": chosen})
    groups = parse_groups(group, loaded.label_names) if group else dict(loaded.pretrained_cfg.get("class_groups") or {})
    check_folder_classes(loaded, images)
    with run.timed("necessity"):
        report, summary = run_necessity(run, loaded, images, chosen, groups, config)
    run.write_manifest(images=images_manifest(summary))
    typer.echo(format_report(report))
    Console().print(f"wrote {run.file(LAYOUT.necessity_json)}")
