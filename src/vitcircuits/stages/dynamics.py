"""``vitcircuits dynamics``: when do the circuit's heads and edges form during training, and does
the compositional classes' loss drop with them?

The run treats the series' **last checkpoint as the model**: the overview, the head atlas and the
composition verdicts of ``hunt`` run on it (the verdicts name the supported edges to follow). Then
every checkpoint is measured over the same images (:mod:`vitcircuits.dynamics.measure`), each one
into ``dynamics/steps/step_N/`` with a ``key.json`` of what produced it (the checkpoint's weights'
sha256, the image list, the settings); ``--resume`` measures only the checkpoints whose folder is
missing or was produced from something else. On a Ray engine the checkpoints are measured in
parallel, one per worker. The formation fits (:mod:`vitcircuits.dynamics.formation`), their
figures and the report's Formation section follow.
"""
from __future__ import annotations

import csv
import io
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from vitcircuits.dynamics.figures import plot_formation
from vitcircuits.dynamics.formation import Edge, Formation, FormationConfig, formation
from vitcircuits.dynamics.measure import MeasureConfig, StepMeasures, measure_checkpoint
from vitcircuits.engine import EngineOptions
from vitcircuits.files import read_json, write_json, write_text
from vitcircuits.hunt import STAGES, HuntConfig
from vitcircuits.inputs import ImageOptions, ImageSet, ModelOptions
from vitcircuits.layout import LAYOUT
from vitcircuits.models.checkpoints import sha256_file
from vitcircuits.models.hooked_vit import HookedViT
from vitcircuits.models.loading import LoadedModel, bundled_model_folder, load_model
from vitcircuits.organisms.packed import PACKED, unpack_series
from vitcircuits.organisms.series import SERIES, read_series
from vitcircuits.runs import Run
from vitcircuits.stages import StageRunner
from vitcircuits.stages.composition import read_circuits


@dataclass(frozen=True)
class DynamicsConfig:
    """Settings of a dynamics run."""

    hunt: HuntConfig = field(default_factory=HuntConfig)
    """The overview, atlas and composition of the final checkpoint (its other stages do not run)."""
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    """What every checkpoint is measured for."""
    formation: FormationConfig = field(default_factory=FormationConfig)
    """The formation fits."""


ATLAS_COLUMNS = ("layer", "head", "kind", "modular_score", "modular_score_lo", "modular_score_hi", "neighbour_mass", "neighbour_mass_lo",
                 "neighbour_mass_hi", "peak_dy", "peak_dx", "peak_mass")
"""The columns of ``atlas_by_step.csv`` (beside the step)."""
FINAL_STAGES = ("overview", "heads", "composition")
"""The ``hunt`` stages run on the final checkpoint."""


def resolve_checkpoints(spec: str, run: Run) -> list[tuple[int, Path]]:
    """The series named by ``--checkpoints``: ``bundled:NAME`` (a packed series shipped with a
    bundled organism, unpacked into the run once per packed index) or what
    :func:`~vitcircuits.organisms.series.read_series` reads."""
    if not spec.startswith("bundled:"):
        return read_series(spec)
    organism = bundled_model_folder(spec.removeprefix("bundled:"))
    packed = organism / SERIES
    if not (packed / PACKED).is_file():
        raise FileNotFoundError(f"--checkpoints {spec}: the bundled organism has no checkpoint series")
    out = run.file(LAYOUT.dynamics_checkpoints)
    marker = out / "unpacked_from.json"
    digest = sha256_file(packed / PACKED)
    if not (marker.is_file() and read_json(marker)["packed_sha256"] == digest):
        shutil.rmtree(out, ignore_errors=True)
        unpack_series(packed, organism, out)
        write_json(marker, {"packed_sha256": digest})
    return read_series(out)


@dataclass(frozen=True)
class MeasureStep:
    """Measure one checkpoint into its step folder (the work item of the engine: it runs on a
    replica, which loads the checkpoint on its own device and dtype)."""

    images: ImageSet
    config: MeasureConfig
    steps_dir: Path

    def __call__(self, model: HookedViT, item: tuple[int, Path, dict]) -> int:
        step, folder, key = item
        loaded = load_model(str(folder), device=model.device, dtype=model.dtype)
        measures = measure_checkpoint(loaded.model, self.images.batches(progress=False), self.config, loaded.model_id)
        out = self.steps_dir / f"step_{step:08d}"
        (out / "key.json").unlink(missing_ok=True)  # written last: a folder without it is measured again
        measures.save(out)
        write_json(out / "key.json", key)
        return step


def weights_sha256(checkpoints: list[tuple[int, Path]]) -> list[str]:
    """Each checkpoint's weights' sha256 (read once per run: they key the run and every step)."""
    return [sha256_file(folder / "model.safetensors") for _, folder in checkpoints]


def measure_series(run: Run, loaded: LoadedModel, images: ImageSet, checkpoints: list[tuple[int, Path]], weights: list[str],
                   config: MeasureConfig, dtype: str) -> list[StepMeasures]:
    """Every checkpoint's measurements (``weights``: their sha256), reusing the step folders whose
    key matches."""
    steps_dir = run.file(LAYOUT.dynamics_steps)
    todo = []
    for (step, folder), sha256 in zip(checkpoints, weights):
        key = {"weights_sha256": sha256, "image_list_sha256": images.image_list_sha256, "measure": asdict(config), "dtype": dtype}
        done = steps_dir / f"step_{step:08d}" / "key.json"
        if not (done.is_file() and read_json(done) == key):
            todo.append((step, folder, key))
    console = Console(stderr=True)
    console.print(f"dynamics: {len(checkpoints) - len(todo)} of {len(checkpoints)} checkpoints already measured")
    columns = (TextColumn("dynamics: checkpoints"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("checkpoints", total=len(todo))
        images.engine.map_items(loaded.model, MeasureStep(images, config, steps_dir), todo, lambda: bar.advance(task))
    measures = [StepMeasures.load(steps_dir / f"step_{step:08d}") for step, _ in checkpoints]
    for (step, folder), m in zip(checkpoints, measures):
        if m.heads_ILHM.shape != measures[-1].heads_ILHM.shape or m.edges_ISJLHU.shape != measures[-1].edges_ISJLHU.shape:
            raise ValueError(f"{folder}: its layers, heads or measured images differ from the last checkpoint's; a series is one model's training")
    return measures


def supported_edges(run: Run) -> list[Edge]:
    """The supported edges of the final checkpoint's composition, each read at its first query set."""
    return [(*c["senders"][0], *c["receivers"][0], c["kind"], c["read_at"][0]) for c in read_circuits(run.path)
            if c["verdict"] == "supported"]


def run_dynamics_stage(run: Run, loaded: LoadedModel, images: ImageSet, checkpoints: list[tuple[int, Path]], weights: list[str],
                       config: DynamicsConfig, dtype: str) -> Formation:
    """Measure the series, fit formation and write ``dynamics/`` (formation tables and figures)."""
    measures = measure_series(run, loaded, images, checkpoints, weights, config.measure, dtype)
    groups = dict(loaded.pretrained_cfg.get("class_groups") or {})
    result = formation([step for step, _ in checkpoints], measures, supported_edges(run), groups, config.formation)
    rows = [m.row() for m in result.metrics]
    write_json(run.file(LAYOUT.formation_json), {
        "steps": result.steps_G.tolist(), "groups": groups, "metrics": [{**row, "curve": m.curve_G.tolist()} for row, m in zip(rows, result.metrics)],
        "lags": result.lags, "phase": asdict(config.formation.phase)})
    write_text(run.file(LAYOUT.formation_csv), _csv(rows))
    write_text(run.file(LAYOUT.atlas_by_step_csv), _csv([{"step": step, **{k: r.as_dict()[k] for k in ATLAS_COLUMNS}}
                                                          for (step, _), m in zip(checkpoints, measures) for r in m.atlas.rows]))
    write_text(run.file(LAYOUT.lags_csv), _csv(result.lags))
    figures = plot_formation(result, run.file(LAYOUT.dynamics))
    write_json(run.file(LAYOUT.dynamics_figures), [(str(path.relative_to(run.path)), caption) for path, caption in figures])
    circuit = next((m for m in result.metrics if m.kind == "circuit"), None)
    run.write_manifest(dynamics={"checkpoints": len(checkpoints), "steps": [s for s, _ in checkpoints],
                                 "circuit": circuit.row() if circuit else None, "lags": result.lags})
    return result


def _csv(rows: list[dict]) -> str:
    """Rows as CSV, the columns in order of first appearance; floats to 6 significant digits, None empty."""
    if not rows:
        return ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else f"{v:.6g}" if isinstance(v, float) else v for k, v in r.items()} for r in rows)
    return buf.getvalue()


def dynamics(out: str, checkpoints: str, model: ModelOptions, images: ImageOptions, config: DynamicsConfig, *, force: bool = False,
             resume: bool = False, engine: EngineOptions = EngineOptions()) -> str:
    """The whole run (module docstring); ``model`` gives the device, dtype and seed (its ``model``
    is the final checkpoint, filled in here). Returns the report's path."""
    run = Run.create(out, "dynamics", {"checkpoints": checkpoints, "images": images.to_dict(), "dynamics": asdict(config),
                                       "device": model.device, "dtype": model.dtype, "seed": model.seed}, force=force, resume=resume)
    if force:
        run.file(LAYOUT.stages).unlink(missing_ok=True)
        shutil.rmtree(run.file(LAYOUT.dynamics), ignore_errors=True)
    series = resolve_checkpoints(checkpoints, run)
    final = replace(model, model=str(series[-1][1]))
    run.config["model"] = final.to_dict()  # the run's model is the last checkpoint (the explorer opens it)
    with run.timed("load_model"):
        loaded = final.load()
    started = engine.start(final, loaded)
    run.write_manifest(model=loaded.manifest(), seed=model.seed, engine=started.describe(),
                       series={"spec": checkpoints, "steps": [s for s, _ in series], "folders": [str(f) for _, f in series]})
    image_set = images.open(loaded, started)
    runner = StageRunner(run)
    key = {"weights": loaded.weights_sha256, "images": images.to_dict(), "image_list_sha256": image_set.image_list_sha256,
           "dtype": model.dtype}
    for stage in (s for s in STAGES if s.name in FINAL_STAGES):
        runner.stage(stage.name, {**key, **stage.depends_on(config.hunt, runner.done)},
                     lambda stage=stage: stage.body(run, loaded, image_set, config.hunt), outputs=stage.outputs, reads=stage.reads)
    weights = weights_sha256(series)
    series_key = {**key, "checkpoints": [(s, sha256) for (s, _), sha256 in zip(series, weights)],
                  "measure": asdict(config.measure), "formation": asdict(config.formation), "compose": asdict(config.hunt.compose)}
    runner.stage("dynamics", series_key, lambda: run_dynamics_stage(run, loaded, image_set, series, weights, config, model.dtype),
                 outputs=(LAYOUT.formation_json, LAYOUT.formation_csv, LAYOUT.atlas_by_step_csv, LAYOUT.dynamics_figures),
                 reads=(LAYOUT.circuits,))
    report = STAGES[-1]
    runner.stage(report.name, report.depends_on(config.hunt, runner.done),
                 lambda: report.body(run, loaded, image_set, config.hunt), outputs=report.outputs, reads=report.reads)
    run.write_manifest(outputs={"report": LAYOUT.report, "stages": runner.done})
    started.close()
    return str(run.file(LAYOUT.report))
