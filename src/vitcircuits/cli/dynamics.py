"""``vitcircuits dynamics``: the formation of modular heads and composition edges over a training series."""
from __future__ import annotations

from dataclasses import replace
from typing import Annotated

import typer
from rich.console import Console

from vitcircuits.cli.options import RunOptions, run_options


@run_options(batch_size=100, resume=True, model=False)
def dynamics_cmd(
    options: RunOptions,
    checkpoints: Annotated[str, typer.Option("--checkpoints", "-c", help="a series folder (series.json), an organism folder with "
                                             "checkpoints/, a .txt list or comma-separated checkpoint folders, or bundled:NAME")],
    quick: Annotated[bool, typer.Option("--quick", help="lighter settings for the final checkpoint's composition and the atlases")] = False,
) -> None:
    """Per checkpoint: head atlas, composition edges, per-group loss and accuracy; then formation steps with intervals (in dynamics/)."""
    from vitcircuits.dynamics.measure import MeasureConfig
    from vitcircuits.hunt import HuntConfig
    from vitcircuits.stages.dynamics import DynamicsConfig, dynamics

    hunt = HuntConfig.quick() if quick else HuntConfig()
    config = DynamicsConfig(hunt=hunt, measure=replace(MeasureConfig(), atlas=replace(hunt.atlas, seed=options.model.seed)))
    report = dynamics(str(options.out), checkpoints, options.model, options.images, config, force=options.force, resume=options.resume,
                      engine=options.engine)
    Console().print(f"report: {report}")
