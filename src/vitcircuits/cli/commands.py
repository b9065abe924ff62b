"""The ``vitcircuits`` commands. Every command that writes a run takes the shared options of
:func:`~vitcircuits.cli.options.run_options` with the same meaning everywhere, writes the run
folder of :data:`~vitcircuits.layout.LAYOUT` under ``--out``, and fails with one line
(:mod:`vitcircuits.cli.errors`)."""
from __future__ import annotations

import logging
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from vitcircuits.cli.dynamics import dynamics_cmd
from vitcircuits.cli.errors import DEBUG, Typer
from vitcircuits.cli.necessity import necessity_cmd
from vitcircuits.cli.options import ArchOpt, DeviceOpt, DtypeOpt, ImgSizeOpt, MaxImagesOpt, RandomOpt, RunOptions, TaskMetricOpt, run_options
from vitcircuits.cli.organisms import organism_app
from vitcircuits.cli.sae import sae_app
from vitcircuits.inputs import ModelOptions, images_manifest
from vitcircuits.layout import LAYOUT

app = Typer(add_completion=False, no_args_is_help=True, help="Mechanistic interpretability of Vision Transformers.")
app.add_typer(sae_app, name="sae")
app.add_typer(organism_app, name="train-organism")
app.command(name="necessity")(necessity_cmd)
app.command(name="dynamics")(dynamics_cmd)
ORGANISMS = {"cifar10": ("bundled:cifar10-vit", "bundled:cifar10"), "shapes": ("bundled:shapes-vit", "bundled:shapes")}
"""``vitcircuits demo --organism NAME``: the bundled model and images of each organism."""
QUICK_IMAGES = 256


@app.callback()
def _setup(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False,
           debug: Annotated[bool, typer.Option("--debug", help="show the traceback of an error instead of one line")] = False) -> None:
    DEBUG["traceback"] = debug
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@app.command()
def info(
    model: Annotated[str, typer.Argument(help="timm name, hub id, folder, or weights file (with --arch)")],
    arch: ArchOpt = None,
    img_size: ImgSizeOpt = None,
    random_weights: RandomOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
) -> None:
    """Architecture, token layout and hook names of a model."""
    loaded = ModelOptions(model=model, arch=arch, img_size=img_size, random_weights=random_weights, device=device, dtype=dtype).load()
    cfg, layout = loaded.model.cfg, loaded.model.layout
    out = Console()
    table = Table(title=f"{loaded.model_id}", show_header=False)
    for key, value in [
        ("family", loaded.family), ("architecture", str(loaded.arch)),
        ("weights sha256", loaded.weights_sha256 or "RANDOM (--random-weights)"),
        *[(k, str(v)) for k, v in cfg.to_dict().items()],
        ("grid (rows, cols)", f"{layout.rows} x {layout.cols}"),
        ("token layout", f"cls={layout.cls_index} dist={layout.dist_index} registers={list(range(*layout.register_slice))} "
                         f"patches={layout.patch_start}..{layout.n_tokens - 1}"),
    ]:
        table.add_row(key, value)
    out.print(table)
    block_hooks = sorted({n.split(".", 2)[2] for n in loaded.model.hook_names if n.startswith("blocks.0.")})
    other = [n for n in loaded.model.hook_names if not n.startswith("blocks.")]
    out.print("hook names: " + ", ".join(other))
    out.print(f"per block (blocks.{{0..{cfg.n_layers - 1}}}.): " + ", ".join(block_hooks))


@app.command()
@run_options(resume=True)
def cache(
    options: RunOptions,
    hooks: Annotated[str, typer.Option("--hooks", help="comma-separated per-token hook names")],
    include_prefix: Annotated[bool, typer.Option("--include-prefix", help="also keep CLS/registers (row=col=-1)")] = False,
    shard_rows: Annotated[int, typer.Option("--shard-rows", min=1, help="rows per shard")] = 65536,
) -> None:
    """Cache per-token activations to safetensors shards (in activations/), keeping (image, row, col) per row."""
    from vitcircuits.cache import CacheConfig, clear_cache, harvest
    from vitcircuits.inputs import provenance
    from vitcircuits.models.hooks import check_hooks

    cache_cfg = CacheConfig(tuple(h.strip() for h in hooks.split(",") if h.strip()), include_prefix, shard_rows)
    run, loaded, images = options.open("cache", {"cache": asdict(cache_cfg)})
    check_hooks(loaded.model, cache_cfg.hooks)
    if options.force:
        clear_cache(run.file(LAYOUT.cache))
    with run.timed("cache"):
        index, streamed = harvest(run.file(LAYOUT.cache), images, loaded, cache_cfg, provenance(loaded, images))
    shards = index.index["shards"]
    run.write_manifest(images=images_manifest(streamed.summary), outputs={"shards": len(shards), "rows": sum(s["rows"] for s in shards)})
    Console(stderr=True).print(f"wrote {len(shards)} shard(s) to {run.file(LAYOUT.cache)}")


@app.command()
@run_options()
def heads(
    options: RunOptions,
    radius: Annotated[int, typer.Option("--radius", min=1, help="Chebyshev radius of the neighbourhood")] = 1,
    n_boot: Annotated[int, typer.Option("--n-boot", min=2, help="bootstrap replicates for intervals")] = 200,
) -> None:
    """Head atlas: offset kernels, metrics with intervals, kinds and figures for every head (in heads/)."""
    from vitcircuits.heads.atlas import AtlasConfig
    from vitcircuits.heads.scan import print_summary
    from vitcircuits.stages.heads import run_heads

    atlas_cfg = AtlasConfig(radius=radius, n_boot=n_boot, seed=options.model.seed)
    run, loaded, images = options.open("heads", {"atlas": asdict(atlas_cfg)})
    with run.timed("heads"):
        atlas = run_heads(run, loaded, images, atlas_cfg)
    print_summary(atlas)


@app.command()
@run_options()
def compose(
    options: RunOptions,
    heads_from: Annotated[Optional[Path], typer.Option("--heads-from", help="a heads or hunt run whose atlas labels the senders")] = None,
    ablation: Annotated[str, typer.Option("--ablation", help="mean (over images and positions), position_mean, zero, resample")] = "mean",
    max_patch_images: Annotated[int, typer.Option("--max-patch-images", min=1, help="images for path patching")] = 64,
    task_metric: TaskMetricOpt = "auto",
) -> None:
    """Composition: a verdict for every edge (composes and matters, each against its null), weights, shuffle control (in composition/)."""
    from vitcircuits.composition.config import ComposeConfig
    from vitcircuits.composition.patching import PatchingConfig
    from vitcircuits.heads.atlas import AtlasConfig
    from vitcircuits.stages.composition import run_compose
    from vitcircuits.stages.heads import run_heads

    seed = options.model.seed
    config = ComposeConfig(patching=PatchingConfig(ablation=ablation, seed=seed), max_patch_images=max_patch_images, task_metric=task_metric)
    if heads_from is not None and not (heads_from / LAYOUT.atlas).is_file():
        raise FileNotFoundError(f"{heads_from}: no {LAYOUT.atlas} (expected a `vitcircuits heads`, `compose` or `hunt` run)")
    run, loaded, images = options.open("compose", {"compose": asdict(config), "heads_from": str(heads_from) if heads_from else None})
    if heads_from is None:
        with run.timed("heads"):
            run_heads(run, loaded, images, AtlasConfig(seed=seed))
    with run.timed("composition"):
        run_compose(run, loaded, images, config, atlas_from=heads_from)
    Console().print(f"wrote {run.file(LAYOUT.circuits)}")


@app.command(name="hunt")
@run_options(resume=True)
def hunt_cmd(
    options: RunOptions,
    quick: Annotated[bool, typer.Option("--quick", help=f"small, fast pass: at most {QUICK_IMAGES} images unless --max-images, lighter settings")] = False,
    truth: Annotated[Optional[Path], typer.Option("--truth", help="known causal edges (truth.json) to set the verdicts against")] = None,
    task_metric: TaskMetricOpt = "auto",
) -> None:
    """Run every stage on a model and images and write report.html."""
    from vitcircuits.hunt import HuntConfig, hunt

    images = options.images
    if quick and images.max_images is None:
        images = replace(images, max_images=QUICK_IMAGES)
    config = HuntConfig.quick() if quick else HuntConfig()
    config = replace(config, compose=replace(config.compose, task_metric=task_metric))
    report = hunt(str(options.out), options.model, images, config, force=options.force, resume=options.resume, truth=truth,
                  engine=options.engine)
    Console().print(f"report: {report}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="run folder to write")] = Path("runs/demo"),
    organism: Annotated[str, typer.Option("--organism", help=f"bundled organism: {', '.join(ORGANISMS)}")] = "shapes",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    max_images: MaxImagesOpt = None,
    force: Annotated[bool, typer.Option("--force/--no-force", help="overwrite --out")] = True,
) -> None:
    """`hunt` on a bundled organism and its bundled images, offline (shapes: with its known circuit)."""
    from vitcircuits.models.loading import bundled_model_folder

    if organism not in ORGANISMS:
        raise ValueError(f"--organism {organism!r}: choose one of {', '.join(ORGANISMS)}")
    model, images = ORGANISMS[organism]
    truth = bundled_model_folder(model.removeprefix("bundled:")) / LAYOUT.truth
    hunt_cmd(model=model, images=images, out=out, device=device, dtype=dtype, max_images=max_images, batch_size=100, force=force,
             truth=truth if truth.is_file() else None)


@app.command()
def serve(
    run_dir: Annotated[Path, typer.Argument(help="a run folder (hunt, heads, compose …) to explore")],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="model for live attention (default: the run's, from manifest.json)")] = None,
    images: Annotated[Optional[str], typer.Option("--images", "-i", help="image source (default: the run's, from manifest.json)")] = None,
    host: Annotated[str, typer.Option("--host", help="address to bind; the default serves this machine only")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="port (0: any free port)")] = 8765,
    device: DeviceOpt = "auto",
    no_browser: Annotated[bool, typer.Option("--no-browser", help="do not open a web browser")] = False,
) -> None:
    """A local explorer of a run: live attention from any patch, the head atlas, circuits and features."""
    from vitcircuits.serve import serve as serve_run

    serve_run(run_dir, model=model, images=images, host=host, port=port, device=device, open_browser=not no_browser)
