"""``vitcircuits sae train`` and ``vitcircuits sae analyze``."""
from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from vitcircuits.cli.errors import Typer
from vitcircuits.cli.options import DeviceOpt, DtypeOpt, RunOptions, SeedOpt, run_options
from vitcircuits.files import read_json
from vitcircuits.inputs import ImageOptions, ModelOptions
from vitcircuits.layout import LAYOUT
from vitcircuits.runs import Run

sae_app = Typer(add_completion=False, no_args_is_help=True, help="Sparse autoencoders: train at a hook, analyse features.")
CircuitsOpt = Annotated[Optional[Path], typer.Option("--circuits", help="a compose or hunt run whose circuits.json names the circuit heads")]


@sae_app.command()
@run_options(resume=True)
def train(
    options: RunOptions,
    hook: Annotated[Optional[str], typer.Option("--hook", help="e.g. blocks.6.hook_resid_post (default: chosen from --circuits)")] = None,
    circuits: CircuitsOpt = None,
    architecture: Annotated[str, typer.Option("--arch-sae", "--sae-arch", help="topk, batchtopk or relu")] = "topk",
    k: Annotated[int, typer.Option("--k", min=1, help="active latents per token (topk, batchtopk)")] = 32,
    expansion: Annotated[int, typer.Option("--expansion", min=1, help="dictionary size / hook width")] = 8,
    l1: Annotated[float, typer.Option("--l1", help="L1 coefficient (relu)")] = 5.0,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="passes over the training rows")] = 4,
    sae_batch: Annotated[int, typer.Option("--sae-batch", min=8, help="rows per optimiser step")] = 1024,
    lr: Annotated[float, typer.Option("--lr", help="peak learning rate")] = 4e-4,
    views: Annotated[int, typer.Option("--views", min=1, help="views per image: 1 + random crops/flips")] = 1,
    holdout_every: Annotated[int, typer.Option("--holdout-every", min=2, help="hold out images with index % N == 0")] = 10,
    processes: Annotated[int, typer.Option("--processes", min=1, help="data-parallel training processes (gloo on cpu, one GPU each on cuda)")] = 1,
) -> None:
    """Harvest a hook, train an SAE on it (SAELens layout), and measure it on held-out images (in sae/)."""
    from vitcircuits.stages.composition import read_circuits
    from vitcircuits.stages.sae import SAEStageConfig, choose_hook, run_sae_train

    config = SAEStageConfig(hook=hook, architecture=architecture, k=k, expansion=expansion, l1_coefficient=l1, epochs=epochs,
                            batch_size=sae_batch, lr=lr, views=views, holdout_every=holdout_every, seed=options.model.seed,
                            processes=processes)
    if hook is None and circuits is None:
        raise ValueError("give --hook, or --circuits RUN to train after the strongest composition receiver")
    run, loaded, images = options.open("sae-train", {"sae": asdict(config), "circuits": str(circuits) if circuits else None})
    chosen, reason = (hook, "given") if hook else choose_hook(read_circuits(circuits), loaded.model.cfg.n_layers)
    with run.timed("sae_train"):
        metrics = run_sae_train(run, loaded, images, replace(config, hook=chosen), chosen, reason)
    held = metrics["held_out"]
    run.write_manifest(outputs={"sae": LAYOUT.sae_weights, "metrics": LAYOUT.sae_metrics, "held_out": held})
    Console().print(f"{chosen}: L0 {held['l0']:.1f}, explained variance {held['explained_variance']:.3f}, dead {held['dead_fraction']:.3f}; "
                    f"SAE in {run.file(LAYOUT.sae_weights)}")


@sae_app.command()
def analyze(
    sae_dir: Annotated[Path, typer.Argument(help="a `vitcircuits sae train` run folder")],
    images: Annotated[Optional[str], typer.Option("--images", "-i", help="images (default: those the SAE was trained on)")] = None,
    circuits: CircuitsOpt = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="model (default: the one the SAE was trained on)")] = None,
    n_features: Annotated[int, typer.Option("--n-features", min=1, help="features tested for circuit dependence")] = 64,
    n_examples: Annotated[int, typer.Option("--n-examples", min=1, help="top patches per feature")] = 8,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="images per forward pass")] = 32,
    seed: SeedOpt = 0,
) -> None:
    """Feature statistics, circuit dependence, the compositional ranking and galleries (in SAE_DIR/sae/features)."""
    from vitcircuits.sae.dependence import DependenceConfig
    from vitcircuits.stages.composition import read_circuits
    from vitcircuits.stages.features import AnalyzeConfig, run_features

    manifest = read_json(sae_dir / LAYOUT.manifest) if (sae_dir / LAYOUT.manifest).is_file() else None
    if manifest is None or manifest.get("command") != "sae-train":
        raise FileNotFoundError(f"{sae_dir}: not a `vitcircuits sae train` run (no manifest.json from sae-train)")
    trained = manifest["config"]
    model_opts = replace(ModelOptions(**trained["model"]), device=device, dtype=dtype)
    if model is not None:
        model_opts = replace(model_opts, model=model)
    image_opts = replace(ImageOptions(**trained["images"]), batch_size=batch_size)
    if images is not None:
        image_opts = replace(image_opts, images=images)
    config = AnalyzeConfig(dependence=DependenceConfig(n_features=n_features, n_examples=n_examples, seed=seed))
    run = Run.create(sae_dir / LAYOUT.features, "sae-analyze", {"model": model_opts.to_dict(), "images": image_opts.to_dict(),
                                                           "analyze": asdict(config), "circuits": str(circuits) if circuits else None}, force=True)
    loaded = model_opts.load()
    run.write_manifest(model=loaded.manifest(), seed=seed)
    with run.timed("sae_analyze"):
        summary = run_features(sae_dir, loaded, image_opts.open(loaded), read_circuits(circuits) if circuits else None, config)
    run.write_manifest(outputs={"features": LAYOUT.features_json, "n_compositional": summary["n_compositional"]})
    Console().print(f"{summary['n_compositional']} of {summary['n_features_analysed']} analysed features are compositional; "
                    f"see {sae_dir / LAYOUT.features_json}")
